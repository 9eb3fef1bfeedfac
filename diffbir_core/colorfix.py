"""Colour fix of the diffusion output (paper section 3 / official post-processing) and final uint8 output.

What it is
    The diffusion output keeps its high frequencies and takes the low frequencies (colour, illumination)
    from the stage-1 result I_reg ("wavelet", official default), or is renormalised per channel to I_reg's
    mean/std ("adain"). Plus the official final conversion to uint8 (resize, x255, clamp, TRUNCATION).

Mirrors
    ``wavelet_blur``, ``wavelet_decomposition``, ``wavelet_reconstruction``, ``calc_mean_std`` /
    ``adaptive_instance_normalization`` of DiffBIR ``utils/common.py`` / ``utils/image/align_color.py``
    (v2.0.0; originally from StableSR's colorfix), and the tail of ``Pipeline.run``.
    ``wavelet_blur`` accepts any channel count (the official one hard-codes 3; identical for RGB).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .imageio import resize

Tensor = torch.Tensor
_KERNEL = ((0.0625, 0.125, 0.0625), (0.125, 0.25, 0.125), (0.0625, 0.125, 0.0625))


def _check_nchw(x: Tensor, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be an NCHW batch, got shape {tuple(x.shape)}")


def wavelet_blur(x: Tensor, radius: int) -> Tensor:
    """Replicate-pad by ``radius``, depthwise 3x3 [1,2,1]x[1,2,1]/16 cross-correlation with dilation ``radius``."""
    _check_nchw(x, "image")
    c = x.shape[1]
    k = torch.tensor(_KERNEL, dtype=x.dtype, device=x.device)[None, None].repeat(c, 1, 1, 1)  # [C,1,3,3]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(x, k, groups=c, dilation=radius)


def wavelet_decomposition(x: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """(high, low): low = blur at radii 1, 2, 4, ..., 2^(levels-1) applied in cascade; high = x - low."""
    _check_nchw(x, "image")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        low = wavelet_blur(x, 2**i)
        high += x - low
        x = low
    return high, low


def wavelet_reconstruction(content: Tensor, style: Tensor) -> Tensor:
    """High frequencies of ``content`` (diffusion output) + low frequencies of ``style`` (stage-1 output)."""
    _check_nchw(content, "content")
    _check_nchw(style, "style")
    if content.shape != style.shape:
        raise ValueError(f"content {tuple(content.shape)} and style {tuple(style.shape)} must have the same shape")
    content_high, _ = wavelet_decomposition(content)
    _, style_low = wavelet_decomposition(style)
    return content_high + style_low


def _mean_std(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    b, c = x.shape[:2]
    var = x.reshape(b, c, -1).var(dim=2) + eps  # unbiased variance, as the official code
    return x.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1), var.sqrt().reshape(b, c, 1, 1)


def adain_color_fix(content: Tensor, style: Tensor) -> Tensor:
    """AdaIN: per-channel (content - mean_c) / std_c * std_s + mean_s (std with eps 1e-5 on the variance)."""
    _check_nchw(content, "content")
    _check_nchw(style, "style")
    if content.shape[:2] != style.shape[:2]:
        raise ValueError(f"content {tuple(content.shape)} and style {tuple(style.shape)} need equal batch/channels")
    s_mean, s_std = _mean_std(style)
    c_mean, c_std = _mean_std(content)
    return (content - c_mean) / c_std * s_std + s_mean


def color_fix(content: Tensor, style: Tensor, mode: Literal["wavelet", "adain", "none"] = "wavelet") -> Tensor:
    """Dispatch on ``mode``; both inputs in the same value range (the pipeline uses [0, 1])."""
    if mode == "wavelet":
        return wavelet_reconstruction(content, style)
    if mode == "adain":
        return adain_color_fix(content, style)
    if mode == "none":
        return content
    raise ValueError(f"color fix mode must be 'wavelet', 'adain' or 'none', got {mode!r}")


def to_uint8_official(x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Official final conversion of a [0,1] NCHW image: optional bicubic antialiased resize to ``size``,
    x255, clamp to [0,255], cast to uint8 (TRUNCATION, not rounding), NHWC. Returns a uint8 tensor."""
    _check_nchw(x, "image")
    if size is not None:
        x = resize(x, tuple(size), mode="bicubic")
    return (x * 255.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

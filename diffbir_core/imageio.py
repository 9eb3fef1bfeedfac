"""Image input/output shared by every stage: any file a user drops in becomes a clean RGB float image.

`read_image` handles what real photos bring: EXIF orientation, grayscale, palette, RGBA / LA (alpha
kept aside and re-attached on save), 16-bit PNG/TIFF, CMYK. Unreadable input raises `ImageReadError`
with the file name and the reason; nothing is half-loaded.

`pad_to_multiple` / `crop_to` let a network that needs sizes divisible by N run on any size: pad
(reflect, falling back to replicate for tiny images) and crop the padding away afterwards (the
official SwinIR leaves its padding in; we do not).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageReadError", "LoadedImage", "read_image", "save_image", "to_tensor", "to_numpy",
           "pad_to_multiple", "crop_to", "IMAGE_EXTENSIONS", "resize"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# Pillow refuses images above ~179 Mpx as a decompression-bomb guard; keep a generous, explicit limit.
MAX_PIXELS = 12000 * 12000


class ImageReadError(ValueError):
    """The file is not an image we can read (corrupt, truncated, empty, not an image)."""


@dataclass
class LoadedImage:
    """An RGB image in [0, 1], HxWx3 float32, plus its alpha channel (HxW, [0,1]) if it had one."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    path: str | None = None
    bit_depth: int = 8

    @property
    def size(self) -> tuple[int, int]:  # (height, width)
        return self.rgb.shape[0], self.rgb.shape[1]


def _to_float(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None, int]:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        g = np.clip(arr / peak, 0, 1).astype(np.float32)
        return np.repeat(g[..., None], 3, axis=2), None, 16 if peak > 255 else 8
    if mode == "F":
        g = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
        return np.repeat(g[..., None], 3, axis=2), None, 32
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[..., :3].copy(), rgba[..., 3].copy(), 8
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return arr, None, 8


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read any supported image file as RGB float32 in [0, 1] (EXIF orientation applied)."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{p}: empty file (0 bytes)")
    # 16-bit PNGs: Pillow opens RGB 16-bit as 8-bit; read those through OpenCV to keep precision.
    try:
        with Image.open(p) as img:
            img.load()
            if img.width * img.height > MAX_PIXELS:
                raise ImageReadError(f"{p}: {img.width}x{img.height} is larger than the {MAX_PIXELS} pixel limit")
            fmt = img.format
            img = ImageOps.exif_transpose(img)
            rgb, alpha, depth = _to_float(img)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"{p}: not a readable image ({type(e).__name__}: {e})") from e
    if fmt == "PNG" and rgb.ndim == 3 and depth == 8:
        deep = _read_16bit_png(p)
        if deep is not None:
            rgb, alpha, depth = deep[0], deep[1] if deep[1] is not None else alpha, 16
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageReadError(f"{p}: image has no pixels")
    return LoadedImage(rgb=np.ascontiguousarray(rgb), alpha=alpha, path=str(p), bit_depth=depth)


def _read_16bit_png(p: Path) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Return (rgb, alpha) for a 16-bit colour PNG, else None (8-bit files are left to Pillow)."""
    import cv2

    arr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3:
        return None
    arr = arr.astype(np.float32) / 65535.0
    alpha = arr[..., 3].copy() if arr.shape[2] == 4 else None
    rgb = arr[..., :3][..., ::-1].copy()  # BGR -> RGB
    # OpenCV ignores EXIF orientation for PNG, and so does the PNG standard: nothing to transpose.
    return rgb, alpha


def save_image(path: str | os.PathLike, rgb: np.ndarray, alpha: np.ndarray | None = None) -> Path:
    """Save an HxWx3 float [0,1] (or uint8) image as 8-bit PNG (RGBA when ``alpha`` is given).

    Float -> uint8 truncates like the official pipelines (HEAD ``diffbir/pipeline.py:312-316``:
    ``(x * 255).clamp(0, 255).to(torch.uint8)``), so the same float image gives the same PNG."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb.astype(np.float32, copy=False), 0, 1) * np.float32(255.0)).astype(np.uint8)
    if alpha is not None:
        if alpha.shape[:2] != rgb.shape[:2]:
            alpha = np.asarray(Image.fromarray((np.clip(alpha, 0, 1) * 255).astype(np.uint8)).resize(
                (rgb.shape[1], rgb.shape[0]), Image.BICUBIC), dtype=np.float32) / 255.0
        a8 = (np.clip(alpha, 0, 1) * 255.0).round().astype(np.uint8)
        Image.fromarray(np.dstack([rgb, a8]), "RGBA").save(p)
    else:
        Image.fromarray(rgb, "RGB").save(p)
    return p


def to_tensor(rgb: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """HxWx3 [0,1] numpy -> 1x3xHxW float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None].to(device)


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """1x3xHxW tensor -> HxWx3 float32 numpy, clamped to [0, 1]."""
    return x.detach().float().clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad NCHW ``x`` at the bottom/right so H and W are multiples of ``multiple``.

    Returns the padded tensor and the original (H, W) for `crop_to`. Reflect padding needs the pad
    to be smaller than the side; otherwise (tiny images) replicate padding is used.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    use = mode if (mode != "reflect" or (ph < h and pw < w)) else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=use), (h, w)


def crop_to(x: torch.Tensor, hw: tuple[int, int], scale: int = 1) -> torch.Tensor:
    """Undo `pad_to_multiple` (optionally after a network that scaled the image by ``scale``)."""
    return x[..., : hw[0] * scale, : hw[1] * scale]


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize NCHW to (H, W) with antialiasing (as the official pipeline's `F.interpolate(..., antialias=True)`)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode in ("bicubic", "bilinear"):
        return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return F.interpolate(x, size=size, mode=mode)

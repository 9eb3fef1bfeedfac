"""Image input/output shared by every stage: any file a user drops in becomes a clean RGB float image.

`read_image` handles what real photos bring: EXIF orientation (every bit depth, 16-bit PNG/TIFF too),
grayscale, palette, RGBA / LA (alpha kept aside and re-attached on save), 16-bit PNG/TIFF, float TIFF
(range-detected: 0-1, 0-255 or 0-65535, otherwise refused), CMYK, multi-frame files (frame 1, with a
notice). The pixel limit is checked on the header, before anything is decoded. Unreadable input raises
`ImageReadError` with the file name and the reason; nothing is half-loaded. TIFFs Pillow cannot read
exactly (float RGB, >8-bit colour) go through tifffile (installed with scikit-image). `save_image` writes
through the one atomic writer (`diffbir_core.atomic`): an output is complete or absent.

`as_loaded_image` turns anything a library caller may hold (LoadedImage, path, PIL image, numpy / torch array) into
a `LoadedImage` with the same rules as files (EXIF orientation, value-range detection), or refuses it by name.
`pad_to_multiple` / `crop_to` let a network that needs sizes divisible by N run on any size: pad
(reflect, falling back to replicate for tiny images) and crop the padding away afterwards (the
official SwinIR leaves its padding in; we do not).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .atomic import atomic_path

__all__ = [
    "ImageReadError",
    "LoadedImage",
    "read_image",
    "as_loaded_image",
    "save_image",
    "to_tensor",
    "to_numpy",
    "pad_to_multiple",
    "crop_to",
    "to_pil",
    "IMAGE_EXTENSIONS",
    "resize",
    "MAX_PIXELS",
    "orient_array",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# Decompression limit, checked on the header before decoding (Pillow's own guard refuses ~179 Mpx at open;
# below that we apply this generous, explicit limit). `read_image(max_pixels=...)` overrides it per call.
MAX_PIXELS = 12000 * 12000

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that displays the stored pixels upright (as `PIL.ImageOps.exif_transpose`).
_ORIENT_PIL = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageReadError(ValueError):
    """The file is not an image we can read (corrupt, truncated, empty, not an image, too large)."""


@dataclass
class LoadedImage:
    """An RGB image in [0, 1], HxWx3 float32, plus its alpha channel (HxW, [0,1]) if it had one."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    path: str | None = None
    bit_depth: int = 8
    notices: list[str] = field(default_factory=list)  # what was assumed while reading (frames, value range)

    @property
    def size(self) -> tuple[int, int]:  # (height, width)
        return self.rgb.shape[0], self.rgb.shape[1]


def orient_array(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF ``orientation`` (1-8) to an H x W (x C) array, as `PIL.ImageOps.exif_transpose` does."""
    t = np.swapaxes(arr, 0, 1)  # transpose: (x, y) -> (y, x)
    out = {2: arr[:, ::-1], 3: arr[::-1, ::-1], 4: arr[::-1], 5: t, 6: t[:, ::-1], 7: t[::-1, ::-1], 8: t[::-1]}.get(
        int(orientation), arr
    )
    return np.ascontiguousarray(out)


def _unit_range(
    arr: np.ndarray, p: Path, notices: list[str], known_peak: float | None = None
) -> tuple[np.ndarray, int]:
    """Scale integer or float samples to [0, 1]; returns (array, bit depth). Floats and integers of unknown
    depth are range-detected: max <= 1 -> 0-1, <= 255 -> 0-255, <= 65535 -> 0-65535, else refused."""
    a = np.asarray(arr, dtype=np.float64)
    if a.size and not np.isfinite(a).all():
        raise ImageReadError(f"{p}: the image holds NaN or infinite values")
    hi = float(a.max()) if a.size else 0.0
    lo = float(a.min()) if a.size else 0.0
    is_float = np.issubdtype(np.asarray(arr).dtype, np.floating)
    if known_peak is not None:
        peak = known_peak
    elif is_float and hi <= 1.0:
        peak = 1.0
    elif hi <= 255.0:
        peak = 255.0
    elif hi <= 65535.0:
        peak = 65535.0
    else:
        raise ImageReadError(
            f"{p}: sample values reach {hi:g}, beyond a 0-1, 0-255 or 0-65535 image "
            "(HDR or raw data?); convert it to an 8/16-bit or 0-1 float image first"
        )
    if is_float and known_peak is None and peak > 1.0:
        notices.append(f"float image with values up to {hi:g}: read as a 0-{peak:g} image")
    if lo < 0:
        notices.append(f"negative sample values (down to {lo:g}) clipped to 0")
    depth = {1.0: 32, 255.0: 8, 65535.0: 16}.get(peak, 16)
    if is_float:
        depth = 32
    return np.clip(a / peak, 0.0, 1.0).astype(np.float32), depth


def _channels_to_rgb(a: np.ndarray, p: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """H x W or H x W x C in [0, 1] -> (rgb, alpha): C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA."""
    if a.ndim == 2:
        a = a[..., None]
    c = a.shape[2]
    if c == 1:
        return np.repeat(a, 3, axis=2), None
    if c == 2:
        return np.repeat(a[..., :1], 3, axis=2), a[..., 1].copy()
    if c == 3:
        return a, None
    if c == 4:
        return a[..., :3].copy(), a[..., 3].copy()
    raise ImageReadError(f"{p}: {c} channels per pixel; expected gray, gray+alpha, RGB or RGBA")


def _to_float(img: Image.Image, p: Path, notices: list[str]) -> tuple[np.ndarray, np.ndarray | None, int]:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        g, depth = _unit_range(np.asarray(img), p, notices, 65535.0 if mode.startswith("I;16") else None)
        return np.repeat(g[..., None], 3, axis=2), None, depth
    if mode == "F":
        g, depth = _unit_range(np.asarray(img, dtype=np.float32), p, notices)
        return np.repeat(g[..., None], 3, axis=2), None, depth
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[..., :3].copy(), rgba[..., 3].copy(), 8
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return arr, None, 8


def _check_size(p: Path, w: int, h: int, limit: int) -> None:
    if w * h > limit:
        raise ImageReadError(f"{p}: {w}x{h} is larger than the {limit} pixel limit (not decoded)")


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None) -> LoadedImage:
    """Read any supported image file as RGB float32 in [0, 1] (EXIF orientation applied).

    ``max_pixels`` (default `MAX_PIXELS`) is checked on the header size before any pixel is decoded.
    Assumptions made while reading (first frame of an animation, value range of a float file) are listed in
    ``LoadedImage.notices``.
    """
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: no such file")
    if p.stat().st_size == 0:
        raise ImageReadError(f"{p}: empty file (0 bytes)")
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    notices: list[str] = []
    tiff_exact = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies below
            opened = Image.open(p)  # reads the header only
        with opened as img:
            _check_size(p, img.width, img.height, limit)
            fmt = img.format
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                notices.append(f"{frames} frames ({fmt}); frame 1 is used")
            bits = img.tag_v2.get(258) if fmt == "TIFF" and hasattr(img, "tag_v2") else None
            tiff_exact = (
                bool(bits) and max(bits if isinstance(bits, tuple) else (bits,)) > 8 and img.mode in ("RGB", "RGBA")
            )  # Pillow would truncate >8-bit colour TIFF to 8 bits
            if not tiff_exact:
                img.load()
                orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
                if orientation in _ORIENT_PIL:
                    img = img.transpose(_ORIENT_PIL[orientation])
                rgb, alpha, depth = _to_float(img, p, notices)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{p}: larger than the pixel limit, not decoded ({e})") from e
    except UnidentifiedImageError as e:
        if p.suffix.lower() not in (".tif", ".tiff"):
            raise ImageReadError(f"{p}: not a readable image ({type(e).__name__}: {e})") from e
        tiff_exact = True  # e.g. float RGB TIFF: Pillow has no such mode
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{p}: not a readable image ({type(e).__name__}: {e})") from e
    if tiff_exact:
        rgb, alpha, depth = _read_tiff_exact(p, limit, notices)
    elif fmt == "PNG" and rgb.ndim == 3 and depth == 8:
        deep = _read_16bit_png(p, orientation)
        if deep is not None:
            rgb, alpha, depth = deep[0], deep[1] if deep[1] is not None else alpha, 16
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageReadError(f"{p}: image has no pixels")
    return LoadedImage(rgb=np.ascontiguousarray(rgb), alpha=alpha, path=str(p), bit_depth=depth, notices=notices)


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    extra = f" shape {tuple(shape)} dtype {dtype}" if shape is not None else ""
    return f"{type(x).__module__}.{type(x).__name__}{extra}"


def _from_pil(img: Image.Image, label: str) -> LoadedImage:
    """A PIL image (any mode) -> LoadedImage, EXIF orientation applied as `read_image` does for files."""
    notices: list[str] = []
    try:
        img.load()
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{label}: the PIL image cannot be decoded ({type(e).__name__}: {e})") from e
    if orientation in _ORIENT_PIL:
        img = img.transpose(_ORIENT_PIL[orientation])
    rgb, alpha, depth = _to_float(img, Path(label), notices)
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageReadError(f"{label}: image has no pixels")
    return LoadedImage(rgb=np.ascontiguousarray(rgb), alpha=alpha, bit_depth=depth, notices=notices)


def _from_array(a: np.ndarray, label: str, *, layout: str = "HWC") -> LoadedImage:
    """H x W or H x W x C (C = 1..4) numpy samples -> LoadedImage. uint8 / uint16 / bool have a known range;
    other integers and floats are range-detected like float files (`_unit_range`: 0-1, 0-255, 0-65535)."""
    notices: list[str] = []
    if a.dtype.kind not in "biuf":
        raise ImageReadError(f"{label}: dtype {a.dtype} is not an image sample type (use uint8, uint16 or float)")
    if a.ndim not in (2, 3) or (a.ndim == 3 and not 1 <= a.shape[2] <= 4):
        hint = ""
        if a.ndim == 3 and a.shape[0] in (1, 3, 4) and layout == "HWC":
            hint = " (it looks channel-first: pass a.transpose(1, 2, 0), or a torch tensor, which may be CHW)"
        raise ImageReadError(
            f"{label}: expected H x W or H x W x C with C = 1, 2, 3 or 4, got shape {tuple(a.shape)}{hint}"
        )
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ImageReadError(f"{label}: image has no pixels (shape {tuple(a.shape)})")
    if a.dtype == np.bool_:
        unit, depth = a.astype(np.float32), 1
    elif a.dtype == np.uint8:
        unit, depth = _unit_range(a, Path(label), notices, 255.0)
    elif a.dtype == np.uint16:
        unit, depth = _unit_range(a, Path(label), notices, 65535.0)
    else:
        unit, depth = _unit_range(a, Path(label), notices)
    rgb, alpha = _channels_to_rgb(unit, Path(label))
    return LoadedImage(rgb=np.ascontiguousarray(rgb, dtype=np.float32), alpha=alpha, bit_depth=depth, notices=notices)


def _from_tensor(t: torch.Tensor, label: str) -> LoadedImage:
    """CHW / 1xCxHxW / HWC / HxW tensor (C = 1..4) -> LoadedImage; CHW wins when both readings fit (torch's
    convention). Values as for arrays: float range-detected (0-1 expected), uint8 = 0-255."""
    x = t.detach().cpu()
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ImageReadError(f"{label}: a batch of {x.shape[0]} images; pass one image (1 x C x H x W) at a time")
        x = x[0]
    if x.ndim == 3 and 1 <= x.shape[0] <= 4:
        x = x.permute(1, 2, 0)  # CHW -> HWC
    elif not (x.ndim == 2 or (x.ndim == 3 and 1 <= x.shape[2] <= 4)):
        raise ImageReadError(
            f"{label}: expected C x H x W, 1 x C x H x W, H x W x C (C = 1..4) or H x W, got shape {tuple(t.shape)}"
        )
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return _from_array(x.numpy(), label, layout="tensor")


def as_loaded_image(x, *, max_pixels: int | None = None) -> LoadedImage:
    """Whatever a caller holds -> `LoadedImage` (RGB float32 [0, 1] + alpha), with the rules of `read_image`.

    Accepted: a `LoadedImage` (returned as is); a path (str / os.PathLike -> `read_image`); a ``PIL.Image.Image`` of
    any mode (EXIF orientation applied); a numpy array H x W or H x W x C (C = 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA)
    of uint8 (0-255), uint16 (0-65535), bool, or float / other integers (range-detected: max <= 1 -> 0-1,
    <= 255 -> 0-255, <= 65535 -> 0-65535, else refused; a notice says when a float was read as 0-255 / 0-65535);
    a torch tensor C x H x W, 1 x C x H x W, H x W x C or H x W (float [0, 1] expected, same range rules).
    Anything else raises TypeError naming what was given; bad shapes / values raise `ImageReadError`."""
    if isinstance(x, LoadedImage):
        return x
    if isinstance(x, (str, os.PathLike)):
        return read_image(x, max_pixels=max_pixels)
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    label = f"input {_describe(x)}"
    if isinstance(x, Image.Image):
        _check_size(Path(label), x.width, x.height, limit)
        return _from_pil(x, label)
    if isinstance(x, torch.Tensor):
        out = _from_tensor(x, label)
    elif isinstance(x, np.ndarray):
        out = _from_array(x, label)
    else:
        raise TypeError(
            f"cannot restore a {_describe(x)}: give a file path, a PIL.Image.Image, a numpy array "
            "(H x W [x C], uint8 / uint16 / float), a torch tensor (C x H x W, float in [0, 1]) or a "
            "diffbir_core.imageio.LoadedImage"
        )
    _check_size(Path(label), out.size[1], out.size[0], limit)
    return out


def _read_16bit_png(p: Path, orientation: int = 1) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Return (rgb, alpha) for a 16-bit colour PNG, else None (8-bit files are left to Pillow).

    Pillow decodes 16-bit colour PNG to 8 bits; OpenCV keeps 16 but ignores the PNG eXIf orientation,
    which Pillow read (``orientation``) and is applied here."""
    import cv2

    arr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3:
        return None
    arr = orient_array(arr.astype(np.float32) / 65535.0, orientation)
    alpha = arr[..., 3].copy() if arr.shape[2] == 4 else None
    rgb = arr[..., :3][..., ::-1].copy()  # BGR -> RGB
    return rgb, alpha


def _read_tiff_exact(p: Path, limit: int, notices: list[str]) -> tuple[np.ndarray, np.ndarray | None, int]:
    """TIFFs Pillow cannot read exactly (float RGB, 16-bit colour), through tifffile: header size checked
    before decoding, range detection for floats, the Orientation tag applied."""
    try:
        import tifffile
    except ImportError as e:  # pragma: no cover - tifffile comes with scikit-image
        raise ImageReadError(f"{p}: this TIFF needs the tifffile package (pip install tifffile)") from e
    try:
        with tifffile.TiffFile(p) as tf:
            page = tf.pages[0]
            _check_size(p, int(page.imagewidth), int(page.imagelength), limit)
            if len(tf.pages) > 1:
                notices.append(f"{len(tf.pages)} pages (TIFF); page 1 is used")
            if int(page.photometric) not in (0, 1, 2):  # MINISWHITE, MINISBLACK, RGB
                raise ImageReadError(
                    f"{p}: TIFF photometric {page.photometric!r} with {page.dtype} samples "
                    "is not supported; save it as RGB or grayscale"
                )
            tag = page.tags.get(274)
            orientation = int(tag.value) if tag is not None else 1
            arr = page.asarray()
            axes = page.axes
    except ImageReadError:
        raise
    except Exception as e:  # tifffile raises a variety of errors for damaged files
        raise ImageReadError(f"{p}: not a readable image ({type(e).__name__}: {e})") from e
    if "S" in axes and axes.index("S") != len(axes) - 1:
        arr = np.moveaxis(arr, axes.index("S"), -1)  # planar (S, Y, X) -> (Y, X, S)
    arr = np.squeeze(arr) if arr.ndim > 3 else arr
    if arr.dtype == np.uint8:
        a, depth = _unit_range(arr, p, notices, 255.0)
    elif arr.dtype == np.uint16:
        a, depth = _unit_range(arr, p, notices, 65535.0)
    elif arr.dtype == bool:
        a, depth = arr.astype(np.float32), 1
    else:
        a, depth = _unit_range(arr, p, notices)
    rgb, alpha = _channels_to_rgb(orient_array(a, orientation), p)
    return rgb, alpha, depth


def save_image(
    path: str | os.PathLike, rgb: np.ndarray, alpha: np.ndarray | None = None, text: dict[str, str] | None = None
) -> Path:
    """Save an HxWx3 float [0,1] (or uint8) image as 8-bit PNG (RGBA when ``alpha`` is given), atomically:
    the file at ``path`` is either the complete new image or whatever was there before. ``text``: PNG text
    chunks (``Image.open(p).text``), e.g. the parameters that made the image. Float -> uint8 truncates like the
    official pipelines (HEAD ``diffbir/pipeline.py:312-316``), so the same float image gives the same PNG."""
    p = Path(path)
    im = to_pil(rgb, alpha)
    info = None
    if text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in text.items():
            info.add_itxt(k, v)  # iTXt: UTF-8 (prompts may hold any character)
    with atomic_path(p) as tmp:
        im.save(tmp, format="PNG", pnginfo=info)
    return p


def to_pil(rgb: np.ndarray, alpha: np.ndarray | None = None) -> Image.Image:
    """HxWx3 float [0,1] (or uint8) -> 8-bit ``PIL.Image`` (RGBA when ``alpha`` is given), truncated as official."""
    if rgb.dtype != np.uint8:
        rgb = (np.clip(rgb.astype(np.float32, copy=False), 0, 1) * np.float32(255.0)).astype(np.uint8)  # truncation
    if alpha is None:
        return Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if alpha.shape[:2] != rgb.shape[:2]:
        alpha = (
            np.asarray(
                Image.fromarray((np.clip(alpha, 0, 1) * 255).astype(np.uint8)).resize(
                    (rgb.shape[1], rgb.shape[0]), Image.BICUBIC
                ),
                dtype=np.float32,
            )
            / 255.0
        )
    a8 = (np.clip(alpha, 0, 1) * 255.0).round().astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, a8]), "RGBA")


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


def pil_resize_uint8(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """HEAD ``bsr_loop.py:55-59`` / ``bid_loop.py:48-52`` / ``bfr_loop.py:30-34``: PIL bicubic resize of the
    8-bit LQ to (H, W) (an exact copy when the size is unchanged), returned as float32 in [0, 1]."""
    if tuple(rgb.shape[:2]) == tuple(hw):
        return rgb
    u8 = (np.clip(rgb, 0, 1) * 255.0).round().astype(np.uint8)
    out = Image.fromarray(u8, "RGB").resize((int(hw[1]), int(hw[0])), Image.BICUBIC)
    return np.asarray(out, dtype=np.float32) / 255.0

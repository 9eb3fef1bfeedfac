"""Face restoration with plain callables: aligned 512 crops, or whole photos (detect -> align -> restore -> paste).

    face_fn(face_512_hwc01) -> face_512_hwc01          (diffusion, a cleaner, identity...)
    background_fn(img_hwc01, (H, W)) -> img_HxWx3_01   (the general path, a cleaner, bicubic)
Whole photo (`FaceRestorer.restore_whole`): 1. output size = round(input x upscale), crops from the bicubic
upscale; 2. detect faces + 5 landmarks (`detect.py`), drop eye distance < ``min_eye_distance``, keep the centre
face or the ``max_faces`` largest; 3. per face: similarity onto the FFHQ-512 template (`align.py`), warp,
``face_fn``; 4. ``background_fn`` (no face: the background is the result, with a notice); 5. paste through
M^-1 with feather (or min(parsing, feather)) x validity mask. Aligned: resize to 512, ``face_fn``, resize to
input x upscale. Options: `config.FaceOptions`; detector / parser: `FaceModels` (cached by `FacePipeline`).

Mirrors: official HEAD diffbir/inference/bfr_loop.py (aligned), unaligned_bfr_loop.py + diffbir/utils/face.py
(whole photos; facexlib FaceRestoreHelper; v2.0.0 utils/face_restoration_helper.py, v1 inference_face.py).
With identity callables and upscale 1 the result is the input up to the warp round trip (tests/test_face.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..cleaners import load_cleaner
from ..config import FACE_MASKS, FaceOptions
from ..imageio import resize, to_numpy, to_tensor
from . import align
from .detect import DetectedFace, FaceBackendError, FaceParser, load_backend

__all__ = [
    "FaceModels",
    "FaceInfo",
    "FaceResult",
    "FaceRestorer",
    "restore_faces",
    "MASKS",
    "bicubic_background",
    "cleaner_background_fn",
    "cleaner_face_fn",
    "background_fn_for",
    "face_fn_for",
    "looks_aligned",
]

MASKS = FACE_MASKS
FaceFn = Callable[[np.ndarray], np.ndarray]
BackgroundFn = Callable[[np.ndarray, tuple[int, int]], np.ndarray]


def _check_upscale(upscale: Any) -> float:
    if isinstance(upscale, bool) or not (
        isinstance(upscale, (int, float)) and math.isfinite(upscale) and 0 < upscale <= 16
    ):
        raise ValueError(f"face upscale must be a number in (0, 16], got {upscale!r}")
    return float(upscale)


@dataclass
class FaceInfo:
    """One restored face. Geometry is in OUTPUT pixels; ``affine`` maps output image -> 512 crop."""

    index: int
    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray
    kind: str
    affine: np.ndarray
    align_error_px: float  # RMS distance of the warped landmarks to the template (crop pixels)
    seconds: float  # face_fn time
    cropped: np.ndarray | None = None
    restored: np.ndarray | None = None


@dataclass
class FaceResult:
    """Result of a face restore: the image (HxWx3 float32 [0,1]) plus what happened."""

    image: np.ndarray
    mode: str  # "aligned" | "whole"
    faces: list[FaceInfo] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    background: np.ndarray | None = None
    backend: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# plain callables for the two restore paths


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 float image -> ``size`` (H, W), antialiased bicubic (`imageio.resize`)."""
    if img.shape[:2] == tuple(size):
        return np.asarray(img, dtype=np.float32)
    return to_numpy(resize(to_tensor(img), tuple(size)))


def bicubic_background(img: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
    """The cheapest background path: antialiased bicubic resize to ``out_size``."""
    return _resize(img, out_size)


def cleaner_background_fn(cleaner: Callable) -> BackgroundFn:
    """Wrap a cleaner (``cleaner(x_1x3xHxW, out_size=(H, W)) -> 1x3xHxW``) as a background_fn."""

    def background_fn(img: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
        with torch.inference_mode():
            return to_numpy(cleaner(to_tensor(img), out_size=tuple(out_size)))

    return background_fn


def cleaner_face_fn(cleaner: Callable, in_size: int | None = None) -> FaceFn:
    """Wrap a cleaner as a face_fn (512 -> 512).

    ``in_size``: resize the 512 crop to this size before the cleaner (default: 512 // ``cleaner.scale``
    for super-resolution cleaners such as the x4 RRDBNet, whose cost grows with the input size; the
    crop comes from a bicubic upscale, so little is lost).
    """
    size = in_size or max(1, align.FACE_SIZE // max(1, int(getattr(cleaner, "scale", 1) or 1)))

    def face_fn(face: np.ndarray) -> np.ndarray:
        x = _resize(face, (size, size))
        with torch.inference_mode():
            return to_numpy(cleaner(to_tensor(x), out_size=(align.FACE_SIZE, align.FACE_SIZE)))

    return face_fn


def background_fn_for(kind: str, **cleaner_kw) -> BackgroundFn:
    """ "bicubic", or any cleaner name of `diffbir_core.cleaners.load_cleaner` (e.g. "offline")."""
    if kind == "bicubic":
        return bicubic_background
    return cleaner_background_fn(load_cleaner(kind, **cleaner_kw))


def face_fn_for(kind: str, **cleaner_kw) -> FaceFn:
    """A face_fn from a cleaner name (e.g. "offline"); "identity" returns the crop unchanged."""
    if kind == "identity":
        return lambda face: face
    return cleaner_face_fn(load_cleaner(kind, **cleaner_kw))


# ---------------------------------------------------------------------------------------------------


def _as_rgb01(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(
            f"face restore needs an HxWx3 RGB image (HxW grey is accepted), got shape {img.shape}; "
            "read files with diffbir_core.imageio.read_image (it splits off alpha)"
        )
    if img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"image {img.shape[1]}x{img.shape[0]} is too small for face restoration")
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    img = img.astype(np.float32, copy=False)
    if not np.isfinite(img).all():
        raise ValueError("image contains NaN or inf")
    return np.clip(img, 0.0, 1.0)


def _check_output(out: Any, shape: tuple[int, ...], who: str) -> np.ndarray:
    out = np.asarray(out, dtype=np.float32)
    if out.shape != shape:
        raise ValueError(f"{who} returned an array of shape {out.shape}; expected {shape} (HxWx3, [0, 1])")
    if not np.isfinite(out).all():
        raise ValueError(f"{who} returned NaN or inf")
    return np.clip(out, 0.0, 1.0)


def _near_identity(m: np.ndarray, size: int = align.FACE_SIZE) -> bool:
    """Is the alignment of an already-aligned crop: scale within 1.25x, rotation < 12 deg, shift < 8%."""
    scale, angle, _ = align.similarity_params(m)
    c = np.array([[(size - 1) / 2, (size - 1) / 2]])
    shift = float(np.linalg.norm(align.transform_points(m, c) - c))
    return abs(math.log(scale)) < math.log(1.25) and abs(angle) < 12.0 and shift < 0.08 * size


def looks_aligned(img: np.ndarray, backend=None) -> tuple[bool, str]:
    """Decide whether ``img`` is an aligned face crop. Returns (aligned, reason).

    Not square (within 2%) -> whole photo. Square -> resized to 512 and searched with ``backend``:
    a face whose alignment is near the identity -> aligned; faces but none aligned -> whole photo;
    no face found (or no backend) -> aligned, by its shape. (A 512x512 whole photo such as a portrait
    is thus not mistaken for a crop.)
    """
    h, w = img.shape[:2]
    if abs(h - w) > 0.02 * max(h, w):
        return False, f"{w}x{h} is not square"
    if backend is None:
        return True, f"{w}x{h} is square (no face detector to confirm)"
    face = _resize(img, (align.FACE_SIZE, align.FACE_SIZE))
    faces = backend.detect(face)
    if not faces:
        return True, f"{w}x{h} is square and no face was detected in it"
    for f in faces:
        m = align.estimate_similarity(f.landmarks, align.template_for(f.kind))
        if _near_identity(m):
            return True, f"{w}x{h}: the face already sits on the FFHQ template"
    return False, f"{w}x{h}: {len(faces)} face(s) found, none on the FFHQ template"


class FaceModels:
    """The face detector and parser for one backend choice, built on first use (shared by many restores)."""

    def __init__(self, backend_name: str = "auto", *, backend=None, parser=None, device="cpu", model_dir=None):
        self.backend_name, self.device, self.model_dir = backend_name, device, model_dir
        self._backend = backend
        self._parser = parser
        self._parser_tried = parser is not None
        self.load_notices: list[str] = []

    @property
    def backend(self):
        """The face detector (built on first use; raises `FaceBackendError` when none works)."""
        if self._backend is None:
            self._backend, notes = load_backend(self.backend_name, model_dir=self.model_dir, device=self.device)
            self.load_notices += notes
        return self._backend

    @property
    def parser(self):
        """facexlib face parser, or None (with a notice) when its weights are not available."""
        if not self._parser_tried:
            self._parser_tried = True
            try:
                self._parser = FaceParser(self.model_dir, device=self.device)
            except FaceBackendError as e:
                why = str(e).splitlines()[0].removeprefix("facexlib face backend: ")
                self.load_notices.append(
                    f"face parsing unavailable ({why}); pasting faces with a feathered square mask"
                )
        return self._parser


class FaceRestorer:
    """One face restore configuration: ``FaceRestorer(options, upscale=...)(img, face_fn, background_fn)``.

    ``models``: a shared `FaceModels` (default: a new one for ``options.backend``; ``backend`` / ``parser``
    inject ready models). The options are fixed for the restorer's life (build another for other options).
    """

    def __init__(
        self,
        options: FaceOptions | None = None,
        *,
        upscale: float = 1.0,
        models: FaceModels | None = None,
        backend=None,
        parser=None,
        device="cpu",
        model_dir=None,
    ):
        self.options = options if options is not None else FaceOptions()
        if not isinstance(self.options, FaceOptions):
            raise TypeError(f"options must be a config.FaceOptions, got {type(self.options).__name__}")
        self.upscale = _check_upscale(upscale)
        if models is not None and (backend is not None or parser is not None):
            raise ValueError("pass either models= or backend= / parser=, not both")
        self.models = models or FaceModels(
            self.options.backend, backend=backend, parser=parser, device=device, model_dir=model_dir
        )

    @property
    def backend(self):
        return self.models.backend

    @property
    def parser(self):
        return self.models.parser

    # ------------------------------------------------------------------ entry points
    def __call__(self, img: np.ndarray, face_fn: FaceFn, background_fn: BackgroundFn | None = None) -> FaceResult:
        img = _as_rgb01(img)
        t0 = time.perf_counter()
        notices: list[str] = []
        aligned = self.options.aligned
        if aligned is None:
            try:
                backend = self.backend
            except FaceBackendError as e:
                backend = None
                notices.append(f"no face detector ({str(e).splitlines()[0]}); deciding aligned/whole by shape")
            aligned, why = looks_aligned(img, backend)
            notices.append(f"face mode: {'aligned crop' if aligned else 'whole photo'} ({why})")
        t_decide = time.perf_counter() - t0
        if aligned:
            res = self.restore_aligned(img, face_fn)
        else:
            res = self.restore_whole(img, face_fn, background_fn)
        res.notices[:0] = [n for n in self.models.load_notices + notices if n not in res.notices]
        res.timings["decide"] = t_decide
        res.timings["total"] = time.perf_counter() - t0
        return res

    def restore_aligned(self, img: np.ndarray, face_fn: FaceFn) -> FaceResult:
        """Aligned crop: resize to 512 if needed, ``face_fn``, resize to input size x upscale."""
        img = _as_rgb01(img)
        h, w = img.shape[:2]
        s = align.FACE_SIZE
        out_hw = (max(1, round(h * self.upscale)), max(1, round(w * self.upscale)))
        notices = []
        face = img
        if (h, w) != (s, s):
            face = _resize(img, (s, s))
            notices.append(f"aligned face {w}x{h} resized to {s}x{s} for the face restorer")
        t = time.perf_counter()
        out = _check_output(face_fn(face), (s, s, 3), "face_fn")
        dt = time.perf_counter() - t
        if out_hw != (s, s):
            out = _resize(out, out_hw)
            notices.append(f"restored face resized to {out_hw[1]}x{out_hw[0]}")
        info = FaceInfo(
            index=0,
            box=(0.0, 0.0, out_hw[1] - 1.0, out_hw[0] - 1.0),
            score=1.0,
            landmarks=align.template_for("retinaface5") * np.array([out_hw[1] / s, out_hw[0] / s]),
            kind="retinaface5",
            affine=np.array([[s / out_hw[1], 0, 0], [0, s / out_hw[0], 0]]),
            align_error_px=0.0,
            seconds=dt,
            cropped=face if self.options.keep_crops else None,
            restored=out if self.options.keep_crops else None,
        )
        return FaceResult(image=out, mode="aligned", faces=[info], notices=notices, timings={"faces": dt})

    def _select(self, faces: list[DetectedFace], hw: tuple[int, int], notices: list[str]) -> list[DetectedFace]:
        p = self.options
        kept = [f for f in faces if f.eye_distance >= p.min_eye_distance]
        if len(kept) < len(faces):
            notices.append(f"skipped {len(faces) - len(kept)} face(s) with eye distance < {p.min_eye_distance:g} px")
        kept.sort(key=lambda f: (f.box[0], f.box[1]))  # left to right: stable face indices
        if p.only_center_face and len(kept) > 1:
            c = np.array([(hw[1] - 1) / 2, (hw[0] - 1) / 2])
            d = [np.linalg.norm(np.array([(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2]) - c) for f in kept]
            notices.append(f"only_center_face: kept 1 of {len(kept)} faces")
            kept = [kept[int(np.argmin(d))]]
        if p.max_faces is not None and len(kept) > p.max_faces:
            order = sorted(range(len(kept)), key=lambda i: -kept[i].eye_distance)[: p.max_faces]
            notices.append(f"max_faces={p.max_faces}: kept the {p.max_faces} largest of {len(kept)} faces")
            kept = [kept[i] for i in sorted(order)]
        return kept

    def restore_whole(self, img: np.ndarray, face_fn: FaceFn, background_fn: BackgroundFn | None = None) -> FaceResult:
        """Whole photo: steps 1-5 of the module docstring."""
        img = _as_rgb01(img)
        p = self.options
        background_fn = background_fn or bicubic_background
        h, w = img.shape[:2]
        out_hw = (max(1, round(h * self.upscale)), max(1, round(w * self.upscale)))  # 1. output size
        timings: dict[str, float] = {}
        notices: list[str] = []

        t = time.perf_counter()  # 2. detect + select, in input pixels; then to output pixels
        backend = self.backend
        faces = self._select(backend.detect(img), (h, w), notices)
        faces = [f.scaled(out_hw[1] / w, out_hw[0] / h) for f in faces]
        timings["detect"] = time.perf_counter() - t

        infos: list[FaceInfo] = []
        restored: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (face, M, mask)
        if faces:
            up = bicubic_background(img, out_hw)  # H x W x 3, the crops' source
            feather = align.feather_mask()
            parser = self.parser if p.mask == "parsing" else None
            t_faces = 0.0
            for i, f in enumerate(faces):  # 3. align, crop, restore
                tmpl = align.template_for(f.kind)
                m = align.estimate_similarity(f.landmarks, tmpl)  # output image -> crop
                crop = align.warp_face(up, m)
                t = time.perf_counter()
                out = _check_output(face_fn(crop), crop.shape, "face_fn")
                dt = time.perf_counter() - t
                t_faces += dt
                mask = feather if parser is None else np.minimum(parser.mask(out), feather)
                mask = mask * align.validity_mask(m, out_hw)
                restored.append((out, m, mask))
                infos.append(
                    FaceInfo(
                        index=i,
                        box=f.box,
                        score=f.score,
                        landmarks=f.landmarks,
                        kind=f.kind,
                        affine=m,
                        align_error_px=align.alignment_error(m, f.landmarks, f.kind),
                        seconds=dt,
                        cropped=crop if p.keep_crops else None,
                        restored=out if p.keep_crops else None,
                    )
                )
            timings["faces"] = t_faces
        else:
            notices.append("no face found: the whole image went through the background path")

        t = time.perf_counter()  # 4. background
        bg = _check_output(background_fn(img, out_hw), (*out_hw, 3), "background_fn")
        timings["background"] = time.perf_counter() - t

        t = time.perf_counter()  # 5. paste back
        canvas = bg
        for out, m, mask in restored:
            canvas = align.paste_face(canvas, out, m, mask)
        timings["paste"] = time.perf_counter() - t
        return FaceResult(
            image=np.clip(canvas, 0.0, 1.0),
            mode="whole",
            faces=infos,
            notices=list(self.models.load_notices) + notices,
            background=bg,
            backend=backend.name,
            timings=timings,
        )


def restore_faces(
    img: np.ndarray,
    face_fn: FaceFn,
    background_fn: BackgroundFn | None = None,
    options: FaceOptions | None = None,
    *,
    upscale: float = 1.0,
    **restorer_kw,
) -> FaceResult:
    """One-shot face restore (builds a `FaceRestorer`; keep one, or a `FaceModels`, to reuse the models)."""
    return FaceRestorer(options, upscale=upscale, **restorer_kw)(img, face_fn, background_fn)

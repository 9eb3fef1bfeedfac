"""Face alignment geometry: FFHQ 512 templates, similarity estimate, warp, inverse warp, soft paste-back.

Mirrors the geometry of the official DiffBIR face helper (``diffbir/utils/face.py``, itself from
facexlib / GFPGAN): 5 landmarks -> similarity transform (rotation + uniform scale + translation,
``cv2.estimateAffinePartial2D`` with LMEDS, as the official code) onto the FFHQ 512x512 template ->
``cv2.warpAffine`` crop with a grey constant border -> restore -> inverse warp and soft-mask blend.

Conventions (all in this module):
- Images are HxWx3 float32 RGB in [0, 1]. Points are (x, y) in pixels, pixel centres at integer
  coordinates (OpenCV's convention); ``M`` (2x3) maps IMAGE -> CROP, ``invert(M)`` maps back.
- Two templates describe the same FFHQ 512 frame with different point sets:
  ``retinaface5`` (facexlib / GFPGAN ``face_template``: eye centres, nose tip, mouth corners) and
  ``dlib5`` (dlib's 5-point model: eye corners and the nose bottom; the official helper's dlib
  template for 1024, halved). See `diffbir_core.face.detect` for which backend yields which.
- Deviations from the official helper, on purpose: crops are taken from the image at OUTPUT
  resolution, so the inverse warp is the exact matrix inverse (no "+0.5*upscale" offset patch); warps
  use bicubic interpolation (round trip warp -> inverse warp is closer to identity than bilinear);
  the paste mask fades to zero where the crop saw pixels outside the image (no grey seams at the
  image edge).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "FACE_SIZE",
    "FFHQ_512_TEMPLATE",
    "FFHQ_512_DLIB5_TEMPLATE",
    "TEMPLATES",
    "BORDER_VALUE",
    "template_for",
    "estimate_similarity",
    "similarity_params",
    "transform_points",
    "warp_face",
    "invert",
    "feather_mask",
    "validity_mask",
    "paste_face",
    "alignment_error",
]

FACE_SIZE = 512

# facexlib / GFPGAN FFHQ-512 template, RetinaFace point order: image-left eye, image-right eye,
# nose tip, image-left mouth corner, image-right mouth corner.
FFHQ_512_TEMPLATE = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)

# dlib 5-point order (shape_predictor_5_face_landmarks): image-right eye outer corner, image-right eye
# inner corner, image-left eye outer corner, image-left eye inner corner, nose bottom (subnasale).
# Official helper's FFHQ-1024 dlib template / 2. Checked on shared/data/faces/aligned: dlib's points on
# those FFHQ-aligned crops average within 3 px of it (tests/test_face.py). Eye-corner midpoints sit
# ~5 px below the RetinaFace eye centres and the nose bottom ~25 px below the nose tip, which is why
# dlib points are mapped onto this template rather than onto FFHQ_512_TEMPLATE's eyes + nose.
FFHQ_512_DLIB5_TEMPLATE = (
    np.array(
        [
            [686.77227723, 488.62376238],
            [586.77227723, 493.59405941],
            [337.91089109, 488.38613861],
            [437.95049505, 493.51485149],
            [513.58415842, 678.5049505],
        ],
        dtype=np.float64,
    )
    / 2.0
)

TEMPLATES = {"retinaface5": FFHQ_512_TEMPLATE, "dlib5": FFHQ_512_DLIB5_TEMPLATE}

# Official crop border colour (BGR 135,133,132 in the helper) as RGB in [0, 1].
BORDER_VALUE = (132 / 255.0, 133 / 255.0, 135 / 255.0)


def template_for(kind: str, size: int = FACE_SIZE) -> np.ndarray:
    """The Kx2 template for landmark ``kind`` ("retinaface5" | "dlib5") in a ``size`` x ``size`` crop."""
    if kind not in TEMPLATES:
        raise ValueError(f"unknown landmark kind {kind!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[kind] * (size / FACE_SIZE)


def _umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Closed-form least-squares similarity src -> dst (Umeyama 1991, no reflection). Returns 2x3."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s <= 1e-12:
        raise ValueError("landmarks are degenerate (all points coincide): cannot estimate a similarity")
    cov = d.T @ s / len(src)  # 2x2
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    scale = (sig * np.diag(e)).sum() / var_s
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity (rotation, uniform scale, translation) mapping points ``src`` onto ``dst``.

    ``cv2.estimateAffinePartial2D(method=LMEDS)`` as the official helper (robust to one bad point);
    falls back to the closed-form least-squares fit when OpenCV finds no model (2 points, or degenerate
    samples).
    """
    import cv2

    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need matching point sets with >= 2 points, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks contain NaN or inf")
    m = None
    if len(src) >= 3:
        m, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    if m is None or not np.isfinite(m).all() or abs(np.linalg.det(m[:, :2])) < 1e-12:
        m = _umeyama(src, dst)
    return np.asarray(m, dtype=np.float64)


def similarity_params(m: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(scale, rotation in degrees, translation) of a 2x3 similarity."""
    scale = math.hypot(m[0, 0], m[1, 0])
    angle = math.degrees(math.atan2(m[1, 0], m[0, 0]))
    return scale, angle, m[:, 2].copy()


def transform_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine to Kx2 points."""
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    return pts @ m[:, :2].T + m[:, 2]


def invert(m: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine (CROP -> IMAGE when ``m`` is IMAGE -> CROP)."""
    a = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(a)[:2]


def warp_face(img: np.ndarray, m: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """Crop the aligned ``size`` x ``size`` face: out(p) = img(invert(m) p), grey outside the image."""
    import cv2

    out = cv2.warpAffine(
        np.ascontiguousarray(img, dtype=np.float32),
        m,
        (size, size),
        flags=cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=BORDER_VALUE,
    )
    return np.clip(out, 0.0, 1.0)


def alignment_error(m: np.ndarray, landmarks: np.ndarray, kind: str, size: int = FACE_SIZE) -> float:
    """RMS distance (crop pixels) between the warped landmarks and their template points."""
    d = transform_points(m, landmarks) - template_for(kind, size)
    return float(np.sqrt((d**2).sum(1).mean()))


def feather_mask(size: int = FACE_SIZE, inset: float = 0.02, ramp: float = 0.06) -> np.ndarray:
    """Square soft mask in crop space: exactly 0 within ``inset*size`` of the crop border, rising with a
    smoothstep over ``ramp*size`` pixels to 1 inside.

    The official v2.1 helper erodes the warped square by ~1/10 of the face side and blurs by ~1/20;
    this builds the same kind of edge directly in crop space (independent of the output scale).
    """
    idx = np.arange(size, dtype=np.float64)
    d = np.minimum(idx, size - 1 - idx)  # distance to the nearest border, per axis
    t = np.clip((d - inset * size) / (ramp * size), 0.0, 1.0)
    r = t * t * (3 - 2 * t)  # smoothstep
    return np.minimum(r[:, None], r[None, :]).astype(np.float32)


def validity_mask(
    m: np.ndarray, image_hw: tuple[int, int], size: int = FACE_SIZE, inset: float = 2.0, ramp: float = 3.0
) -> np.ndarray:
    """Per crop pixel: 1 where its source lies well inside the image, 0 where it saw the grey border.

    The source point of crop pixel p is invert(m) p; its distance to the nearest image edge (in image
    pixels) is ramped from 0 at ``inset`` to 1 at ``inset + ramp`` (bicubic taps reach 2 pixels).
    """
    h, w = image_hw
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    inv = invert(m)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    dist = np.minimum(np.minimum(sx, (w - 1) - sx), np.minimum(sy, (h - 1) - sy))
    return np.clip((dist - inset) / ramp, 0.0, 1.0).astype(np.float32)


def paste_face(canvas: np.ndarray, face: np.ndarray, m: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Blend ``face`` (crop space, SxSx3) back into ``canvas`` (HxWx3) through the inverse of ``m``.

    ``mask`` (SxS, [0, 1], crop space) is warped with the same inverse; out = mask*face + (1-mask)*canvas.
    Only the bounding box of the warped crop is touched. Returns a new array.
    """
    import cv2

    h, w = canvas.shape[:2]
    s = face.shape[0]
    if face.shape[:2] != (s, s) or mask.shape != (s, s):
        raise ValueError(f"face {face.shape} and mask {mask.shape} must be the same square size")
    inv = invert(m)
    corners = transform_points(inv, np.array([[-1, -1], [s, -1], [-1, s], [s, s]], np.float64))
    x0, y0 = (max(0, int(math.floor(v))) for v in corners.min(0))
    x1, y1 = (int(math.ceil(v)) + 1 for v in corners.max(0))
    x1, y1 = min(w, x1), min(h, y1)
    out = np.array(canvas, dtype=np.float32, copy=True)
    if x1 <= x0 or y1 <= y0:
        return out  # the crop lies entirely outside the canvas
    roi = inv.copy()
    roi[:, 2] -= (x0, y0)  # same map, expressed in the ROI's coordinates
    size = (x1 - x0, y1 - y0)
    fw = cv2.warpAffine(
        np.ascontiguousarray(face, dtype=np.float32), roi, size, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE
    )
    mw = cv2.warpAffine(
        np.ascontiguousarray(mask, dtype=np.float32),
        roi,
        size,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )
    mw = np.clip(mw, 0.0, 1.0)[..., None]  # h x w x 1
    region = out[y0:y1, x0:x1]
    fw = np.clip(fw, 0.0, 1.0).reshape(region.shape)  # OpenCV drops a single channel axis
    out[y0:y1, x0:x1] = mw * fw + (1.0 - mw) * region
    return out

"""Synthetic degradations that turn a clean (HQ) image into a training input (LQ): paper arXiv 2308.15070,
"Degradation model".

Three presets (`DEGRADATIONS`), all returning an LQ image of the SAME size as the input (DiffBIR restores,
it does not up-scale):

* ``realesrgan_2nd_order`` - the paper's Appendix A pipeline (Real-ESRGAN style): two rounds of
  blur -> resize -> noise -> JPEG, then resize back to the original size.
  Blur: isotropic / anisotropic Gaussian (p = 0.5 each), odd kernel size uniform in [7, 21],
  sigma [0.2, 3] (1st) / [0.2, 1.5] (2nd), rotation uniform in [-pi, pi].
  Resize: area / bilinear / bicubic, scale in [0.15, 1.5] (1st) / [0.3, 1.2] (2nd).
  Noise: Gaussian sigma [1, 30] / [1, 25] (0-255 units) or Poisson scale [0.05, 3] / [0.05, 2.5].
  JPEG quality [30, 95].
* ``codeformer_face`` - the official v1/v2 face pipeline (CodeFormer style, `CodeformerDataset`):
  one round, kernel 41, iso/aniso 0.5/0.5, sigma [0.1, 12], bilinear down-sampling by a factor in
  [1, 12], Gaussian noise [0, 15], JPEG [30, 100], bilinear resize back.
* ``face_wide`` - the paper's "wide" face range (down-sampling [1, 12], blur sigma [0.1, 12]) with the
  general pipeline's resize kinds and noise/JPEG model (Gaussian [1, 30] or Poisson [0.05, 3], JPEG
  [30, 95]). The paper names only the two wide ranges; the rest is our choice and is said here.

Where the paper is silent we use Real-ESRGAN's published defaults (as the official
`RealESRGANBatchTransform` does): the resize direction is drawn first (up / down / keep with
p = 0.2/0.7/0.1 in the 1st round, 0.3/0.4/0.3 in the 2nd) and the scale uniformly inside that side of
the range; the 2nd blur happens with p = 0.8; Gaussian vs Poisson noise p = 0.5, grey noise p = 0.4;
every round's resize is relative to the ORIGINAL size (Real-ESRGAN convention; for the 1st round it is
the same as the current size); the final result is clipped and rounded to 8-bit levels. Real-ESRGAN's
sinc filters are not in the paper's list and are not used.

Everything random is drawn from one `numpy.random.Generator`; the same seed gives a bit-identical
image, and ``degrade`` returns every value it drew (kinds, sizes, sigmas, angles, scales, qualities).
Operations use OpenCV on float32 HxWx3 RGB in [0, 1] (JPEG through ``cv2.imencode`` on BGR uint8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DegradationRound", "DegradationConfig", "DEGRADATIONS", "degrade", "gaussian_kernel", "get_degradation"]

_RESIZE_MODES = ("area", "bilinear", "bicubic")
_KERNEL_KINDS = ("iso", "aniso")


def _check_range(name: str, r: tuple[float, float] | None, lo: float | None = None) -> None:
    if r is None:
        return
    if len(r) != 2 or not (r[0] <= r[1]):
        raise ValueError(f"{name} must be a (low, high) pair with low <= high, got {r!r}")
    if lo is not None and r[0] < lo:
        raise ValueError(f"{name} must not go below {lo}, got {r!r}")


def _check_probs(name: str, probs: tuple[float, ...], n: int) -> None:
    if len(probs) != n or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"{name} must be {n} non-negative probabilities summing to 1, got {probs!r}")


@dataclass(frozen=True)
class DegradationRound:
    """One round of blur -> resize -> noise -> JPEG. ``None`` for a range switches that step off."""

    # -- blur
    blur_prob: float = 1.0
    kernel_size: tuple[int, int] = (7, 21)  # odd sizes drawn uniformly from this closed range
    kernel_kinds: tuple[str, ...] = _KERNEL_KINDS
    kernel_probs: tuple[float, ...] = (0.5, 0.5)
    blur_sigma: tuple[float, float] | None = (0.2, 3.0)  # sigma_x (and sigma_y for aniso), pixels
    rotation: tuple[float, float] = (-math.pi, math.pi)  # aniso kernel angle, radians
    # -- resize (exactly one of resize_scale / downsample, or neither)
    resize_modes: tuple[str, ...] = _RESIZE_MODES  # drawn uniformly
    resize_scale: tuple[float, float] | None = (0.15, 1.5)  # output side / original side
    resize_updown_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    downsample: tuple[float, float] | None = None  # original side / output side, uniform
    # -- noise (Gaussian with p = gaussian_prob, else Poisson)
    gaussian_prob: float = 0.5
    gaussian_sigma: tuple[float, float] | None = (1.0, 30.0)  # 0-255 units
    poisson_scale: tuple[float, float] | None = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    # -- JPEG
    jpeg_quality: tuple[int, int] | None = (30, 95)  # integer quality, closed range

    def __post_init__(self) -> None:
        for name in ("blur_prob", "gaussian_prob", "gray_noise_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"DegradationRound.{name} must be a probability in [0, 1], got {v}")
        k0, k1 = self.kernel_size
        if k0 > k1 or k0 < 1 or not any(k % 2 == 1 for k in range(k0, k1 + 1)):
            raise ValueError(f"kernel_size {self.kernel_size!r} must be a (low, high) range holding an odd size")
        bad = [k for k in self.kernel_kinds if k not in _KERNEL_KINDS]
        if bad:
            raise ValueError(f"unknown kernel kinds {bad}; choose from {_KERNEL_KINDS}")
        _check_probs("kernel_probs", self.kernel_probs, len(self.kernel_kinds))
        _check_range("blur_sigma", self.blur_sigma, lo=1e-3)
        _check_range("rotation", self.rotation)
        bad = [m for m in self.resize_modes if m not in _RESIZE_MODES]
        if bad or not self.resize_modes:
            raise ValueError(f"resize_modes {self.resize_modes!r}: choose one or more of {_RESIZE_MODES}")
        if self.resize_scale is not None and self.downsample is not None:
            raise ValueError("set either resize_scale (Real-ESRGAN style) or downsample (CodeFormer style), not both")
        _check_range("resize_scale", self.resize_scale, lo=1e-3)
        _check_probs("resize_updown_probs", self.resize_updown_probs, 3)
        _check_range("downsample", self.downsample, lo=1.0)
        _check_range("gaussian_sigma", self.gaussian_sigma, lo=0.0)
        _check_range("poisson_scale", self.poisson_scale, lo=0.0)
        if self.gaussian_sigma is None and self.poisson_scale is not None and self.gaussian_prob > 0:
            raise ValueError("gaussian_prob > 0 but gaussian_sigma is None: set gaussian_prob=0 for Poisson only")
        if self.poisson_scale is None and self.gaussian_sigma is not None and self.gaussian_prob < 1:
            raise ValueError("gaussian_prob < 1 but poisson_scale is None: set gaussian_prob=1 for Gaussian only")
        _check_range("jpeg_quality", self.jpeg_quality, lo=0)
        if self.jpeg_quality is not None and self.jpeg_quality[1] > 100:
            raise ValueError(f"jpeg_quality must lie in [0, 100], got {self.jpeg_quality!r}")


@dataclass(frozen=True)
class DegradationConfig:
    """A whole degradation model: rounds applied in order, then resize back to the input size."""

    name: str
    rounds: tuple[DegradationRound, ...]
    final_resize_modes: tuple[str, ...] = ("bicubic",)  # drawn uniformly for the resize back
    quantize: bool = True  # clip + round the result to 8-bit levels (what a real LQ file holds)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.rounds:
            raise ValueError(f"degradation {self.name!r} has no rounds")
        bad = [m for m in self.final_resize_modes if m not in _RESIZE_MODES]
        if bad or not self.final_resize_modes:
            raise ValueError(f"final_resize_modes {self.final_resize_modes!r}: choose from {_RESIZE_MODES}")


_FIRST = DegradationRound()
_SECOND = DegradationRound(
    blur_prob=0.8,
    blur_sigma=(0.2, 1.5),
    resize_scale=(0.3, 1.2),
    resize_updown_probs=(0.3, 0.4, 0.3),
    gaussian_sigma=(1.0, 25.0),
    poisson_scale=(0.05, 2.5),
    jpeg_quality=(30, 95),
)

DEGRADATIONS: dict[str, DegradationConfig] = {
    "realesrgan_2nd_order": DegradationConfig(
        "realesrgan_2nd_order",
        (_FIRST, _SECOND),
        final_resize_modes=("bicubic",),
        description="paper Appendix A: second-order blur/resize/noise/JPEG, resized back",
    ),
    "codeformer_face": DegradationConfig(
        "codeformer_face",
        (
            DegradationRound(
                kernel_size=(41, 41),
                blur_sigma=(0.1, 12.0),
                resize_modes=("bilinear",),
                resize_scale=None,
                downsample=(1.0, 12.0),
                gaussian_prob=1.0,
                gaussian_sigma=(0.0, 15.0),
                poisson_scale=None,
                gray_noise_prob=0.0,
                jpeg_quality=(30, 100),
            ),
        ),
        final_resize_modes=("bilinear",),
        description="official v1/v2 face training pipeline (CodeformerDataset)",
    ),
    "face_wide": DegradationConfig(
        "face_wide",
        (DegradationRound(kernel_size=(41, 41), blur_sigma=(0.1, 12.0), resize_scale=None, downsample=(1.0, 12.0)),),
        final_resize_modes=("bicubic",),
        description="paper's wide face range (down-sampling [1,12], blur sigma [0.1,12]) with the general noise/JPEG",
    ),
}


def get_degradation(cfg: str | DegradationConfig) -> DegradationConfig:
    """A preset by name (or a config passed through)."""
    if isinstance(cfg, DegradationConfig):
        return cfg
    if cfg not in DEGRADATIONS:
        raise KeyError(f"unknown degradation preset {cfg!r}; choose one of {sorted(DEGRADATIONS)}")
    return DEGRADATIONS[cfg]


# ---------------------------------------------------------------------------------------------- kernels
def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Normalised (an)isotropic 2-D Gaussian, ``size x size``: exp(-x^T S^-1 x / 2), S = R diag(sx^2, sy^2) R^T."""
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    xx, yy = np.meshgrid(ax, ax)  # xx varies along columns (x), yy along rows (y)
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    inv = np.linalg.inv(cov)
    q = inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy
    k = np.exp(-0.5 * q)
    return (k / k.sum()).astype(np.float32)


# ---------------------------------------------------------------------------------------------- steps
def _cv2():
    import cv2

    return cv2


def _interp(mode: str) -> int:
    cv2 = _cv2()
    return {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}[mode]


def _resize(img: np.ndarray, hw: tuple[int, int], mode: str) -> np.ndarray:
    if img.shape[:2] == tuple(hw):
        return img
    return _cv2().resize(img, (hw[1], hw[0]), interpolation=_interp(mode))


def _blur(img, r: DegradationRound, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    if r.blur_sigma is None or rng.random() >= r.blur_prob:
        return img, {"applied": False}
    sizes = [k for k in range(r.kernel_size[0], r.kernel_size[1] + 1) if k % 2 == 1]
    size = int(sizes[rng.integers(len(sizes))])
    kind = r.kernel_kinds[rng.choice(len(r.kernel_kinds), p=np.asarray(r.kernel_probs))]
    sx = float(rng.uniform(*r.blur_sigma))
    if kind == "aniso":
        sy = float(rng.uniform(*r.blur_sigma))
        theta = float(rng.uniform(*r.rotation))
    else:
        sy, theta = sx, 0.0
    k = gaussian_kernel(size, sx, sy, theta)
    out = _cv2().filter2D(img, -1, k, borderType=_cv2().BORDER_REFLECT_101)
    return out, {"applied": True, "kind": kind, "kernel_size": size, "sigma_x": sx, "sigma_y": sy, "theta": theta}


def _resize_step(img, r: DegradationRound, orig_hw, rng) -> tuple[np.ndarray, dict]:
    if r.resize_scale is None and r.downsample is None:
        return img, {"applied": False}
    mode = r.resize_modes[rng.integers(len(r.resize_modes))]
    if r.resize_scale is not None:
        lo, hi = r.resize_scale
        direction = ("up", "down", "keep")[rng.choice(3, p=np.asarray(r.resize_updown_probs))]
        if direction == "up":
            scale = float(rng.uniform(max(1.0, lo), hi)) if hi >= 1.0 else 1.0
        elif direction == "down":
            scale = float(rng.uniform(lo, min(1.0, hi))) if lo <= 1.0 else 1.0
        else:
            scale = 1.0
        scale = min(max(scale, lo), hi)
        info = {"applied": True, "direction": direction, "scale": scale}
    else:
        factor = float(rng.uniform(*r.downsample))
        scale = 1.0 / factor
        info = {"applied": True, "direction": "down", "downsample": factor, "scale": scale}
    hw = (max(1, int(orig_hw[0] * scale)), max(1, int(orig_hw[1] * scale)))
    info.update(mode=mode, size=hw)
    return _resize(img, hw, mode), info


def _noise(img, r: DegradationRound, rng) -> tuple[np.ndarray, dict]:
    if r.gaussian_sigma is None and r.poisson_scale is None:
        return img, {"applied": False}
    use_gauss = rng.random() < r.gaussian_prob
    gray = bool(rng.random() < r.gray_noise_prob)
    h, w, _ = img.shape
    if use_gauss:
        sigma = float(rng.uniform(*r.gaussian_sigma))
        shape = (h, w, 1) if gray else (h, w, 3)
        n = rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma / 255.0)
        out = img + n  # (grey noise broadcasts over the 3 channels)
        info = {"applied": True, "kind": "gaussian", "sigma": sigma, "gray": gray}
    else:
        scale = float(rng.uniform(*r.poisson_scale))
        # Poisson (shot) noise as in BasicSR: count the 8-bit levels present, round up to a power of 2,
        # draw Poisson(img * vals) / vals, keep the difference, scaled.
        src = _cv2().cvtColor(img, _cv2().COLOR_RGB2GRAY)[..., None] if gray else img
        q8 = np.clip(np.rint(src * 255.0), 0, 255)
        levels = int(np.count_nonzero(np.bincount(q8.astype(np.uint8).ravel(), minlength=256)))
        vals = float(2 ** math.ceil(math.log2(max(levels, 1))))
        q = q8 / 255.0
        noisy = rng.poisson(q * vals) / vals
        n = ((noisy - q) * scale).astype(np.float32)
        out = img + n
        info = {"applied": True, "kind": "poisson", "scale": scale, "gray": gray}
    return np.clip(out, 0.0, 1.0, out=out), info


def _jpeg(img, r: DegradationRound, rng) -> tuple[np.ndarray, dict]:
    if r.jpeg_quality is None:
        return img, {"applied": False}
    cv2 = _cv2()
    quality = int(rng.integers(r.jpeg_quality[0], r.jpeg_quality[1] + 1))
    bgr = np.rint(np.clip(img[..., ::-1], 0.0, 1.0) * 255.0).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise RuntimeError(f"OpenCV failed to JPEG-encode a {img.shape} image at quality {quality}")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(dec[..., ::-1], dtype=np.float32) * np.float32(1 / 255.0), {
        "applied": True,
        "quality": quality,
    }


# ---------------------------------------------------------------------------------------------- entry
def degrade(
    img: np.ndarray, cfg: str | DegradationConfig = "realesrgan_2nd_order", seed: int | np.random.Generator | None = 0
) -> tuple[np.ndarray, dict[str, Any]]:
    """Degrade an HxWx3 float RGB image in [0, 1]; returns (LQ of the same size, float32) and the drawn params.

    ``seed`` is an int (a fresh ``numpy.random.default_rng(seed)``) or a Generator (advanced in place).
    """
    cfg = get_degradation(cfg)
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(
            f"degrade expects an HxWx3 RGB numpy array, got {type(img).__name__} {getattr(img, 'shape', None)}"
        )
    if img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"image of {img.shape[:2]} pixels is too small to degrade (need at least 2x2)")
    if seed is None:
        raise ValueError("degrade needs an explicit seed (int) or numpy Generator, so the result is reproducible")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    orig_hw = img.shape[:2]
    out = np.ascontiguousarray(img, dtype=np.float32)
    params: dict[str, Any] = {"preset": cfg.name, "input_size": tuple(orig_hw), "rounds": []}
    for r in cfg.rounds:  # 1. each round: blur -> resize -> noise -> JPEG
        rp: dict[str, Any] = {}
        out, rp["blur"] = _blur(out, r, rng)
        out, rp["resize"] = _resize_step(out, r, orig_hw, rng)
        out, rp["noise"] = _noise(out, r, rng)
        out, rp["jpeg"] = _jpeg(out, r, rng)
        params["rounds"].append(rp)
    mode = cfg.final_resize_modes[rng.integers(len(cfg.final_resize_modes))]  # 2. resize back
    params["final_resize"] = {"mode": mode, "from_size": tuple(out.shape[:2])}
    out = _resize(out, orig_hw, mode)
    out = np.clip(out, 0.0, 1.0)
    if cfg.quantize:  # 3. 8-bit levels, as a saved LQ image would have
        out = np.rint(out * 255.0) * np.float32(1 / 255.0)
    return np.ascontiguousarray(out, dtype=np.float32), params

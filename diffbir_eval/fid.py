"""FID: Frechet distance between Gaussians fitted to Inception-V3 pool features (Heusel et al. 2017).

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

Conventions follow clean-fid ("clean" mode, Parmar et al. 2022), as pyiqa's ``fid`` does:
    1. the image as 8-bit RGB (values 0..255),
    2. each channel resized to 299x299 with PIL's bicubic filter in float mode ('F'), clipped to [0, 255],
    3. scaled to (x - 128) / 128,
    4. the TF-FID Inception-V3 (pytorch-fid's port, ``pt_inception-2015-12-05-6726825d.pth``) to its 2048-d pool,
    5. mean and covariance (``np.cov``, N - 1) per set; the reference is a folder of images (the GT folder) or
       ``mu``/``sigma`` statistics (clean-fid's ``ffhq_clean_trainval70k_512.npz`` for the real face sets).

The network is pyiqa's own (``pyiqa.create_metric("fid").net.model``), built by `diffbir_eval.metrics.FIDMetric`;
tests/test_eval_names.py checks our features and FID against pyiqa's ``get_folder_features`` / ``fid``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from torch import nn

from diffbir_core.atomic import atomic_open

__all__ = [
    "FIDInception",
    "clean_resize",
    "feature_stats",
    "fid_from_features",
    "frechet_distance",
    "load_stats",
    "save_stats",
]

FEATURE_DIM = 2048


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Tr((S_1 S_2)^(1/2)) is the sum of the square roots of the eigenvalues of S_1 S_2, which are those of
    the symmetric PSD matrix S_1^(1/2) S_2 S_1^(1/2): two symmetric eigendecompositions instead of
    pytorch-fid's general ``scipy.linalg.sqrtm`` (same value, several times faster on 2048 x 2048, and no
    complex round-off to discard). Tiny negative eigenvalues from round-off are clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    if not (np.isfinite(s1).all() and np.isfinite(s2).all() and np.isfinite(mu1).all() and np.isfinite(mu2).all()):
        raise ValueError("FID statistics contain NaN or inf")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_1^(1/2)
    lam = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_covmean = float(np.sum(np.sqrt(np.clip(lam, 0, None))))
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two feature sets [N1, D] and [N2, D], exactly equal to
    ``frechet_distance(*feature_stats(f1), *feature_stats(f2))`` without forming D x D matrices.

    With centred features A_i and c_i = N_i - 1: S_i = A_i^T A_i / c_i, Tr S_i = ||A_i||_F^2 / c_i, and the
    non-zero eigenvalues of S_1 S_2 are the squared singular values of A_1 A_2^T / sqrt(c_1 c_2), so
    Tr((S_1 S_2)^(1/2)) is the nuclear norm of that N1 x N2 matrix. Used when N < D (small sets, tests).
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(f1.shape[0], f2.shape[0]) < 2:
        raise ValueError(f"FID needs two [N, D] feature sets with N >= 2 and the same D, got {f1.shape}, {f2.shape}")
    c1, c2 = f1.shape[0] - 1, f2.shape[0] - 1
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    diff = f1.mean(0) - f2.mean(0)
    nuclear = float(np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()) / np.sqrt(c1 * c2)
    return float(diff.dot(diff) + (a1 * a1).sum() / c1 + (a2 * a2).sum() / c2 - 2.0 * nuclear)


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] features -> (mu [D], sigma [D, D]) with the unbiased covariance (np.cov, rowvar=False)."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 feature vectors as an [N, D] array, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write statistics in clean-fid's layout (``mu``, ``sigma``)."""
    p = Path(path)
    if not p.name.endswith(".npz"):  # what np.savez itself does with such a name
        p = p.with_name(p.name + ".npz")
    with atomic_open(p, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
    return p


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read reference statistics (``mu``, ``sigma``) from a clean-fid / pytorch-fid ``.npz``."""
    p = Path(path)
    with np.load(p) as d:
        if "mu" not in d or "sigma" not in d:
            raise ValueError(f"{p} is not FID statistics: it holds {sorted(d.keys())}, expected 'mu' and 'sigma'")
        return np.asarray(d["mu"], np.float64), np.asarray(d["sigma"], np.float64)


def clean_resize(rgb01: np.ndarray, size: int = 299) -> np.ndarray:
    """clean-fid "clean" preprocessing of an HxWx3 [0,1] image: 8-bit levels, per-channel PIL bicubic
    in float mode to ``size`` x ``size``, clipped; returns [3, size, size] float32 in 0..255."""
    from PIL import Image

    u8 = np.rint(np.clip(rgb01, 0, 1) * 255.0).astype(np.float32)
    chans = [
        np.asarray(Image.fromarray(u8[..., c], mode="F").resize((size, size), resample=Image.BICUBIC)) for c in range(3)
    ]
    return np.clip(np.stack(chans, 0), 0, 255).astype(np.float32)


class FIDInception(nn.Module):
    """The FID graph's *structure* with random weights (``.net``), to write weight files for tests.

    It is the network pyiqa's ``fid_inception_v3`` builds before loading the TF-FID file (torchvision's
    Inception-V3 with 1008 classes, no aux head, and pyiqa's public ``FIDInception*`` blocks), so its state
    dict has the key layout of ``pt_inception-2015-12-05-6726825d.pth``. Features are never computed with it:
    `diffbir_eval.metrics.FIDMetric` runs pyiqa's own `InceptionV3`."""

    def __init__(self):
        super().__init__()
        import torchvision
        from pyiqa.archs import inception as pi

        net = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b = pi.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = pi.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = pi.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = pi.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = pi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = pi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = pi.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = pi.FIDInceptionE_1(1280)
        net.Mixed_7c = pi.FIDInceptionE_2(2048)
        self.net = net

"""What the stage-1 experiment scripts share: skimage photos, a trained run's checkpoints as an `eval` method,
the fixed held-out degradation draws and the PSNR pair of `diffbir_eval.metrics`.

Protocol of ``results/train_stage1`` (kept so the committed numbers stay reproducible): every held-out HQ image,
full size, is degraded by the run's own pipeline at plain seeds ``1000 + k`` (k < draws); the checkpoint's SwinIR
restores it through `diffbir_core.cleaners.Cleaner` (reflect-padded to its multiple, cropped back, clamped) as an
`diffbir_eval.methods` cleaner method; PSNR is `diffbir_eval.metrics.psnr` on RGB and on BT.601 Y, no border crop, not
quantised.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from diffbir_core.cleaners import Cleaner, CleanerSpec
from diffbir_core.degradation import degrade
from diffbir_core.imageio import read_image
from diffbir_core.models.swinir import SwinIRConfig, load_swinir
from diffbir_core.train import TrainConfig, swinir_config_for
from diffbir_eval.methods import Method, cleaner_method
from diffbir_eval.metrics import psnr

__all__ = ["skimage_rgb", "load_run", "checkpoints", "checkpoint_method", "fixed_draws", "psnr_rgb_y"]

DRAW_SEED = 1000  # draw k of every image uses numpy.random.default_rng(DRAW_SEED + k)


def skimage_rgb(name: str, *, color_only: bool = False) -> np.ndarray:
    """``skimage.data.NAME()`` as HxWx3 uint8 (stereo pairs: the left view; grey images repeated to RGB, or
    refused with ``color_only``)."""
    import skimage.data as skd  # optional: only the data preparation needs scikit-image

    im = getattr(skd, name)()
    if isinstance(im, tuple):  # stereo_motorcycle -> (left, right, disparity)
        im = im[0]
    im = np.asarray(im)
    if color_only and (im.ndim != 3 or im.shape[2] != 3):
        raise ValueError(f"skimage.data.{name} is not an RGB photo (shape {im.shape})")
    if im.ndim == 2:
        im = np.repeat(im[..., None], 3, axis=2)
    return im[..., :3]


def load_run(run: Path) -> tuple[TrainConfig, SwinIRConfig]:
    """The resolved config a training run wrote (``config.json``) and its SwinIR configuration."""
    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    return cfg, swinir_config_for(cfg.swinir, cfg.swinir_overrides)


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (`diffbir_core.train.checkpoint` layout)."""
    found = sorted(p for p in (run / "checkpoints").glob("*") if (p / "train_state.pt").is_file())
    if not found:
        raise SystemExit(f"{run}: no complete checkpoint")
    return found


def checkpoint_method(ckpt: Path, scfg: SwinIRConfig) -> Method:
    """A stage-1 checkpoint (``swinir.pth``, loaded strictly) as a 1x `diffbir_eval.methods` cleaner method."""
    model = load_swinir(ckpt / "swinir.pth", scfg, what=str(ckpt))
    spec = CleanerSpec(
        f"checkpoint:{ckpt.name}",
        "swinir",
        1,
        None,
        f"stage-1 checkpoint {ckpt}",
        multiple=scfg.pad_multiple,
        pad_mode="reflect",
    )
    return cleaner_method(f"checkpoint:{ckpt}", Cleaner(spec, model), scale=1.0, info={"checkpoint": str(ckpt)})


def fixed_draws(files: list[Path], degradation: str, draws: int) -> Iterator[tuple[str, int, np.ndarray, np.ndarray]]:
    """(image name, draw seed, HQ, LQ) for every file and draw; the same LQ for every checkpoint."""
    for f in files:
        hq = read_image(f).rgb
        for k in range(draws):
            lq, _ = degrade(hq, degradation, DRAW_SEED + k)
            yield f.name, DRAW_SEED + k, hq, lq


def psnr_rgb_y(img: np.ndarray, hq: np.ndarray) -> tuple[float, float]:
    """(RGB, Y) PSNR in dB of ``img`` (clipped to [0, 1]) against ``hq``, full image."""
    img = np.clip(img, 0.0, 1.0)
    return psnr(img, hq, channel="rgb"), psnr(img, hq, channel="y")

"""Training tiles of stage-1 CPU run 2 (results/train_stage1/README.md, "Run 2"): colour photos only.

HQ sources: scikit-image's colour photographs (`TRAIN`) at full and half size (antialiased bicubic), cut into
non-overlapping ``TILE x TILE`` tiles; nearly flat or black tiles (luma std < `MIN_STD` or mean < `MIN_MEAN`)
are dropped and at most `MAX_TILES` per (image, scale) kept (evenly, fixed seed) so no picture dominates. The
trainer takes one random ``crop`` patch (+ flip, + degradation) per tile and epoch.
Not used, with the reason: ``chelsea``/``cat`` (held out), greyscale images (run 1 desaturated),
``colorwheel``/``logo`` (synthetic), ../shared/data/real47 (real low-quality test photos, not HQ),
diffbir_demo/bid (visibly noisy). Held out: Set5 HR + ``chelsea`` from `experiments.train_stage1.prepare_data`.
Writes ``<out>/tiles/*.png``, ``<out>/train.txt``, ``<out>/tiles.csv`` (source, scale, box, luma mean/std) and
the full-size photos `FIT_CHECK` for the in-distribution check (``<out>/train_fit/*.png``, ``train_fit.txt``).
Usage: python -m experiments.train_stage1.prepare_data_run2 /tmp/stage1_data_run2
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from diffbir_core.atomic import atomic_open, write_text
from diffbir_core.imageio import resize, save_image, to_numpy, to_tensor
from experiments.train_stage1.common import skimage_rgb

TRAIN = ["astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "stereo_motorcycle"]
SCALES = (1.0, 0.5)
TILE = 128
MIN_STD, MIN_MEAN = 0.04, 0.06
MAX_TILES = 12
SEED = 0
FIT_CHECK = ["astronaut", "coffee", "rocket", "immunohistochemistry", "stereo_motorcycle"]


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # H, W


def main(out: str) -> None:
    root = Path(out)
    (root / "tiles").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    rows, files, fit = [], [], []
    for name in TRAIN:
        im = skimage_rgb(name, color_only=True)  # stereo_motorcycle: the left view
        full = im.astype(np.float32) / 255.0
        if name in FIT_CHECK:
            fit.append(root / "train_fit" / f"{name}.png")
            save_image(fit[-1], im)
        for scale in SCALES:
            h, w = full.shape[:2]
            rgb = (
                full
                if scale == 1.0
                else np.clip(to_numpy(resize(to_tensor(full), (round(h * scale), round(w * scale)))), 0, 1)
            )
            h, w = rgb.shape[:2]
            cand = []
            for top in range(0, h - TILE + 1, TILE):
                for left in range(0, w - TILE + 1, TILE):
                    y = _luma(rgb[top : top + TILE, left : left + TILE])
                    if y.std() >= MIN_STD and y.mean() >= MIN_MEAN:
                        cand.append((top, left, float(y.mean()), float(y.std())))
            if len(cand) > MAX_TILES:
                keep = np.sort(rng.choice(len(cand), MAX_TILES, replace=False))
                cand = [cand[i] for i in keep]
            for top, left, mean, std in cand:
                p = root / "tiles" / f"{name}_s{scale:g}_{top:04d}_{left:04d}.png"
                save_image(p, np.rint(rgb[top : top + TILE, left : left + TILE] * 255).astype(np.uint8))
                files.append(str(p))
                rows.append([p.name, f"skimage.data.{name}", scale, top, left, TILE, round(mean, 4), round(std, 4)])
            print(f"{name} x{scale:g}: {h}x{w}, {len(cand)} tiles")
    write_text(root / "train.txt", "\n".join(files) + "\n")
    write_text(root / "train_fit.txt", "\n".join(map(str, fit)) + "\n")
    with atomic_open(root / "tiles.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tile", "source", "scale", "top", "left", "size", "luma_mean", "luma_std"])
        w.writerows(rows)
    print(f"train: {len(files)} tiles -> {root / 'train.txt'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/stage1_data_run2")

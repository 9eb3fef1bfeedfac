"""Training tiles of stage-1 CPU run 2 (results/train_stage1/README.md, "Run 2"): colour photos only.

HQ sources: the colour photographs bundled with scikit-image (`TRAIN`), at full size and at half size
(antialiased bicubic, `diffbir_core.imageio.resize`; closer to the scale of Set5's small images and a little
cleaner). Each is cut into non-overlapping ``TILE x TILE`` tiles; tiles that are nearly flat or black (luma
std < `MIN_STD` or luma mean < `MIN_MEAN`: retina/hubble background) are dropped and at most `MAX_TILES`
per (image, scale) are kept (evenly, fixed seed) so that no single picture dominates. The trainer takes one
random ``crop`` patch (+ flip, + degradation) per tile and epoch, i.e. several different crops per image.

Not used, with the reason: ``chelsea``/``cat`` (the same photo; held out), the greyscale images (run 1
desaturated), ``colorwheel``/``logo`` (synthetic graphics), ../shared/data/real47 (the paper's real
low-quality test photos: small, JPEG-blocky and blurry - not HQ) and diffbir_demo/bid (inputs of the
denoising demo: visibly noisy). Held out (never trained on): Set5 HR + ``chelsea``, written by run 1's
``results/train_stage1/prepare_data.py`` (same list, same files).
Writes ``<out>/tiles/*.png``, ``<out>/train.txt``, ``<out>/tiles.csv`` (source, scale, box, luma mean/std)
and, for the in-distribution check, the full-size photos `FIT_CHECK` (``<out>/train_fit/*.png``,
``<out>/train_fit.txt``).
Usage: python results/train_stage1/run2/prepare_data.py /tmp/stage1_data_run2
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

TRAIN = ["astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
         "stereo_motorcycle"]
SCALES = (1.0, 0.5)
TILE = 128
MIN_STD, MIN_MEAN = 0.04, 0.06
MAX_TILES = 12
SEED = 0
FIT_CHECK = ["astronaut", "coffee", "rocket", "immunohistochemistry", "stereo_motorcycle"]


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # H, W


def main(out: str) -> None:
    import skimage.data as skd

    from diffbir_core.imageio import resize, save_image, to_numpy, to_tensor

    root = Path(out)
    (root / "tiles").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    rows, files, fit = [], [], []
    for name in TRAIN:
        im = getattr(skd, name)()
        if isinstance(im, tuple):  # stereo_motorcycle -> (left, right, disparity): keep the left view
            im = im[0]
        if im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"skimage.data.{name} is not an RGB photo (shape {im.shape})")
        full = im.astype(np.float32) / 255.0
        if name in FIT_CHECK:
            fit.append(root / "train_fit" / f"{name}.png")
            save_image(fit[-1], im)
        for scale in SCALES:
            h, w = full.shape[:2]
            rgb = full if scale == 1.0 else np.clip(
                to_numpy(resize(to_tensor(full), (round(h * scale), round(w * scale)))), 0, 1)
            h, w = rgb.shape[:2]
            cand = []
            for top in range(0, h - TILE + 1, TILE):
                for left in range(0, w - TILE + 1, TILE):
                    y = _luma(rgb[top:top + TILE, left:left + TILE])
                    if y.std() >= MIN_STD and y.mean() >= MIN_MEAN:
                        cand.append((top, left, float(y.mean()), float(y.std())))
            if len(cand) > MAX_TILES:
                keep = np.sort(rng.choice(len(cand), MAX_TILES, replace=False))
                cand = [cand[i] for i in keep]
            for top, left, mean, std in cand:
                p = root / "tiles" / f"{name}_s{scale:g}_{top:04d}_{left:04d}.png"
                save_image(p, np.rint(rgb[top:top + TILE, left:left + TILE] * 255).astype(np.uint8))
                files.append(str(p))
                rows.append([p.name, f"skimage.data.{name}", scale, top, left, TILE, round(mean, 4), round(std, 4)])
            print(f"{name} x{scale:g}: {h}x{w}, {len(cand)} tiles")
    (root / "train.txt").write_text("\n".join(files) + "\n")
    (root / "train_fit.txt").write_text("\n".join(map(str, fit)) + "\n")
    with (root / "tiles.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tile", "source", "scale", "top", "left", "size", "luma_mean", "luma_std"])
        w.writerows(rows)
    print(f"train: {len(files)} tiles -> {root / 'train.txt'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/stage1_data_run2")

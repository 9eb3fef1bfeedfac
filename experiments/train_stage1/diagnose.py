"""Why run 2's cleaner loses in RGB but gains in Y: colour diagnostics of one stage-1 checkpoint.

For every image of a list, degraded and restored as `evaluate` does (`common`: seeds 1000 + k, k < draws):
the mean per-channel bias of the output (pred - HQ, 8-bit units), the chroma ratio pred/HQ (mean
|RGB - grey|), the RGB PSNR gain (`diffbir_eval.metrics.psnr`), and the gain after subtracting the per-image mean
colour bias. Also the hue coverage of the training tiles vs the list (share of pixels with HSV saturation
> 0.25 per 60-degree hue sector). Writes ``<out>/diagnostics.csv`` and ``<out>/hue_coverage.csv``.
Usage: python -m experiments.train_stage1.diagnose --run /tmp/stage1_run2 --checkpoint 0000410 \\
    --images /tmp/stage1_data/heldout.txt --train /tmp/stage1_data_run2/train.txt --out results/train_stage1/run2
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from diffbir_core.atomic import atomic_open
from diffbir_core.data import list_images
from diffbir_core.imageio import read_image
from diffbir_eval.metrics import psnr
from experiments.train_stage1.common import checkpoint_method, fixed_draws, load_run

SECTORS = ("red", "yellow", "green", "cyan", "blue", "magenta")


def _chroma(x: np.ndarray) -> float:
    return float(np.mean(np.abs(x - x.mean(2, keepdims=True))))


def hue_coverage(files) -> np.ndarray:
    """Share of all pixels that are saturated (S > 64/255) and fall in each 60-degree hue sector."""
    hist, n = np.zeros(len(SECTORS)), 0
    for f in files:
        hsv = cv2.cvtColor(np.rint(read_image(f).rgb * 255).astype(np.uint8), cv2.COLOR_RGB2HSV_FULL)
        hue = hsv[..., 0][hsv[..., 1] > 64].astype(np.float64) * 360 / 256  # degrees
        hist += np.bincount(((hue + 30) % 360 // 60).astype(int), minlength=len(SECTORS))
        n += hsv[..., 0].size
    return hist / max(n, 1)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--draws", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    run, out = Path(args.run), Path(args.out)
    cfg, scfg = load_run(run)
    method = checkpoint_method(run / "checkpoints" / args.checkpoint, scfg)
    per_image: dict[str, dict[str, list]] = {}
    for name, _, hq, lq in fixed_draws(list_images(args.images), cfg.degradation, args.draws):
        pred = method.restore(lq)  # H, W, 3 in [0, 1]
        b = (pred - hq).reshape(-1, 3).mean(0)  # mean colour offset, 3
        lq_psnr = psnr(np.clip(lq, 0, 1), hq, channel="rgb")
        acc = per_image.setdefault(name, {"bias": [], "chroma": [], "gain": [], "gain_unbiased": []})
        acc["bias"].append(b)
        acc["chroma"].append(_chroma(pred) / _chroma(hq))
        acc["gain"].append(psnr(pred, hq, channel="rgb") - lq_psnr)
        acc["gain_unbiased"].append(psnr(np.clip(pred - b, 0, 1), hq, channel="rgb") - lq_psnr)
    rows = []
    for name, acc in per_image.items():
        mb = np.mean(acc["bias"], 0) * 255
        rows.append(
            {
                "image": name,
                "bias_r": round(float(mb[0]), 1),
                "bias_g": round(float(mb[1]), 1),
                "bias_b": round(float(mb[2]), 1),
                "chroma_ratio": round(float(np.mean(acc["chroma"])), 3),
                "gain_rgb": round(float(np.mean(acc["gain"])), 3),
                "gain_rgb_bias_removed": round(float(np.mean(acc["gain_unbiased"])), 3),
            }
        )
        print(rows[-1])
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "diagnostics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tr, ev = hue_coverage(list_images(args.train)), hue_coverage(list_images(args.images))
    with atomic_open(out / "hue_coverage.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["hue_sector", "train_share_pct", "images_share_pct"])
        for name, a, b in zip(SECTORS, tr, ev):
            w.writerow([name, round(100 * a, 1), round(100 * b, 1)])
            print(f"{name:8s} train {100 * a:5.1f}%  images {100 * b:5.1f}%")


if __name__ == "__main__":
    main()

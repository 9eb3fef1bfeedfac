"""Why run 2's cleaner loses in RGB but gains in Y: colour diagnostics of one stage-1 checkpoint.

For every image of a list, degraded like `../evaluate.py` does (same pipeline, seeds 1000 + k, k < 4) and
restored: the mean per-channel bias of the output (pred - HQ, 8-bit units), the chroma ratio pred/HQ
(mean |RGB - grey|), the RGB PSNR gain, and the gain after subtracting the per-image mean colour bias.
Also the hue coverage of the training tiles vs the list (share of pixels with HSV saturation > 0.25 per
60-degree hue sector). Writes ``<out>/diagnostics.csv`` and ``<out>/hue_coverage.csv``.
Usage: python results/train_stage1/run2/diagnose.py --run /tmp/stage1_run2 --checkpoint 0000410 \\
    --images /tmp/stage1_data/heldout.txt --train /tmp/stage1_data_run2/train.txt --out results/train_stage1/run2
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

SECTORS = ("red", "yellow", "green", "cyan", "blue", "magenta")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((np.clip(a, 0, 1) - b) ** 2), 1e-12)))


def _chroma(x: np.ndarray) -> float:
    return float(np.mean(np.abs(x - x.mean(2, keepdims=True))))


def hue_coverage(files) -> np.ndarray:
    """Share of all pixels that are saturated (S > 64/255) and fall in each 60-degree hue sector."""
    import cv2

    from diffbir_core.imageio import read_image

    hist, n = np.zeros(len(SECTORS)), 0
    for f in files:
        hsv = cv2.cvtColor(np.rint(read_image(f).rgb * 255).astype(np.uint8), cv2.COLOR_RGB2HSV_FULL)
        hue = hsv[..., 0][hsv[..., 1] > 64].astype(np.float64) * 360 / 256  # degrees
        hist += np.bincount(((hue + 30) % 360 // 60).astype(int), minlength=len(SECTORS))
        n += hsv[..., 0].size
    return hist / max(n, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--draws", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from diffbir_core.data import list_images
    from diffbir_core.degradation import degrade
    from diffbir_core.imageio import (
        crop_to,
        pad_to_multiple,
        read_image,
        to_numpy,
        to_tensor,
    )
    from diffbir_core.models.swinir import load_swinir
    from diffbir_core.train import TrainConfig, swinir_config_for

    run, out = Path(args.run), Path(args.out)
    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    scfg = swinir_config_for(cfg.swinir, cfg.swinir_overrides)
    model = load_swinir(run / "checkpoints" / args.checkpoint / "swinir.pth", scfg, what=args.checkpoint)
    rows = []
    for f in list_images(args.images):
        hq = read_image(f).rgb
        bias, chroma, gain, gain_unbiased = [], [], [], []
        for k in range(args.draws):
            lq, _ = degrade(hq, cfg.degradation, 1000 + k)
            x, hw = pad_to_multiple(to_tensor(lq), scfg.pad_multiple)
            with torch.no_grad():
                pred = np.clip(to_numpy(crop_to(model(x), hw)), 0, 1)  # H, W, 3
            b = (pred - hq).reshape(-1, 3).mean(0)  # mean colour offset, 3
            bias.append(b)
            chroma.append(_chroma(pred) / _chroma(hq))
            gain.append(_psnr(pred, hq) - _psnr(lq, hq))
            gain_unbiased.append(_psnr(pred - b, hq) - _psnr(lq, hq))
        mb = np.mean(bias, 0) * 255
        rows.append({"image": f.name, "bias_r": round(float(mb[0]), 1), "bias_g": round(float(mb[1]), 1),
                     "bias_b": round(float(mb[2]), 1),
                     "chroma_ratio": round(float(np.mean(chroma)), 3), "gain_rgb": round(float(np.mean(gain)), 3),
                     "gain_rgb_bias_removed": round(float(np.mean(gain_unbiased)), 3)})
        print(rows[-1])
    out.mkdir(parents=True, exist_ok=True)
    with (out / "diagnostics.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tr, ev = hue_coverage(list_images(args.train)), hue_coverage(list_images(args.images))
    with (out / "hue_coverage.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["hue_sector", "train_share_pct", "images_share_pct"])
        for name, a, b in zip(SECTORS, tr, ev):
            w.writerow([name, round(100 * a, 1), round(100 * b, 1)])
            print(f"{name:8s} train {100 * a:5.1f}%  images {100 * b:5.1f}%")


if __name__ == "__main__":
    main()

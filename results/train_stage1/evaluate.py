"""Evaluate the small stage-1 CPU run: PSNR gain of the trained SwinIR over its degraded input on held-out images.

Every held-out HQ image (full size) is degraded with the run's own pipeline at fixed seeds
(1000 + k, k < --draws); the model restores it (reflect-padded to a multiple of 64, cropped back);
PSNR (RGB, [0, 1], no border crop; and of the BT.601 luma Y) of LQ and of the restored image against HQ.
Done for every saved checkpoint (PSNR-vs-step curve) and in detail for the newest one. Writes
``metrics.csv`` (per image and draw, newest checkpoint), ``checkpoints.csv`` (mean per checkpoint),
``summary.json``, ``loss_curve.png`` (training loss + held-out PSNR), ``log.csv`` / ``val.csv`` (copies of
the run's logs) and ``example.png`` (LQ | restored | HQ). ``--checkpoints last`` scores only the newest
checkpoint (e.g. the fit on training images); the loss plot shows the learning rate when it varies.
Usage: python results/train_stage1/evaluate.py --run /tmp/stage1_run --heldout /tmp/stage1_data/heldout.txt
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def _restore(model, lq: np.ndarray, multiple: int) -> np.ndarray:
    from diffbir_core.imageio import crop_to, pad_to_multiple, to_numpy, to_tensor

    x, hw = pad_to_multiple(to_tensor(lq), multiple)
    with torch.no_grad():
        return to_numpy(crop_to(model(x), hw))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from diffbir_core.train import psnr

    t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None]  # noqa: E731
    return float(psnr(t(a), t(b))[0])


def _psnr_y(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of the BT.601 luma (Y of YCbCr, [16, 235] / 255 as BasicSR/MATLAB), no border crop."""
    w = np.array([65.481, 128.553, 24.966], dtype=np.float64) / 255.0
    ya = np.clip(a, 0, 1).astype(np.float64) @ w + 16 / 255.0
    yb = np.clip(b, 0, 1).astype(np.float64) @ w + 16 / 255.0
    return float(10 * np.log10(1.0 / max(np.mean((ya - yb) ** 2), 1e-12)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--out", default="results/train_stage1")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--checkpoints", choices=("all", "last"), default="all")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from diffbir_core.data import list_images
    from diffbir_core.degradation import degrade
    from diffbir_core.imageio import read_image, save_image
    from diffbir_core.models.swinir import load_swinir
    from diffbir_core.train import TrainConfig, swinir_config_for

    run, out = Path(args.run), Path(args.out)
    cfg = TrainConfig(**json.loads((run / "config.json").read_text()))
    scfg = swinir_config_for(cfg.swinir, cfg.swinir_overrides)
    ckpts = sorted(p for p in (run / "checkpoints").glob("*") if (p / "train_state.pt").is_file())
    if not ckpts:
        raise SystemExit(f"{run}: no complete checkpoint")
    if args.checkpoints == "last":
        ckpts = ckpts[-1:]
    files = list_images(args.heldout)
    pairs = []  # fixed degraded inputs, shared by every checkpoint
    for f in files:
        hq = read_image(f).rgb
        for k in range(args.draws):
            lq, params = degrade(hq, cfg.degradation, 1000 + k)
            pairs.append((f.name, k, hq, lq))
    rows_ck, detail = [], []
    for ck in ckpts:
        model = load_swinir(ck / "swinir.pth", scfg, what=str(ck))  # strict
        t0 = time.time()
        res = []
        for name, k, hq, lq in pairs:
            pred = _restore(model, lq, scfg.pad_multiple)
            res.append((name, k, _psnr(lq, hq), _psnr(pred, hq), _psnr_y(lq, hq), _psnr_y(pred, hq)))
        step = int(ck.name)
        mean = [float(np.mean([r[i] for r in res])) for i in range(2, 6)]
        rows_ck.append({"step": step, "psnr_lq": mean[0], "psnr_pred": mean[1], "gain": mean[1] - mean[0],
                        "psnr_y_lq": mean[2], "psnr_y_pred": mean[3], "gain_y": mean[3] - mean[2],
                        "eval_s": time.time() - t0})
        print(rows_ck[-1])
        detail = res
    out.mkdir(parents=True, exist_ok=True)
    with (out / "checkpoints.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows_ck[0]))
        w.writeheader()
        for r in rows_ck:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    with (out / "metrics.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "draw_seed", "psnr_lq", "psnr_pred", "gain", "psnr_y_lq", "psnr_y_pred", "gain_y"])
        for name, k, a, b, ya, yb in detail:
            w.writerow([name, 1000 + k] + [round(v, 4) for v in (a, b, b - a, ya, yb, yb - ya)])
    per_image = {}
    for name, _, a, b, _, _ in detail:
        per_image.setdefault(name, []).append(b - a)
    gains = np.array([r[3] - r[2] for r in detail])
    gains_y = np.array([r[5] - r[4] for r in detail])
    summary = {"checkpoint_step": rows_ck[-1]["step"], "pairs": len(detail), "images": len(files),
               "draws_per_image": args.draws, "degradation": cfg.degradation,
               "mean_psnr_lq": rows_ck[-1]["psnr_lq"], "mean_psnr_pred": rows_ck[-1]["psnr_pred"],
               "mean_gain_db": float(gains.mean()), "median_gain_db": float(np.median(gains)),
               "pairs_improved": int((gains > 0).sum()),
               "mean_psnr_y_lq": rows_ck[-1]["psnr_y_lq"], "mean_psnr_y_pred": rows_ck[-1]["psnr_y_pred"],
               "mean_gain_y_db": float(gains_y.mean()), "pairs_improved_y": int((gains_y > 0).sum()),
               "per_image_mean_gain_db": {k: float(np.mean(v)) for k, v in per_image.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name in ("log.csv", "val.csv"):
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)
    # loss curve + held-out PSNR per checkpoint
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (run / "log.csv").open() as f:
        log_rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in log_rows]
    loss = [float(r["loss"]) for r in log_rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(steps, loss, lw=0.8, label=f"train L2 (mean of {cfg.log_every} steps)")
    if len(loss) >= 10:
        k = 10
        ax[0].plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.5, label="moving avg (10 rows)")
    ax[0].set_yscale("log")
    lrs = [float(r["lr"]) for r in log_rows if r.get("lr")]
    if len(set(lrs)) > 1:
        ax_lr = ax[0].twinx()
        ax_lr.plot(steps, lrs, color="grey", lw=0.8, ls=":")
        ax_lr.set_ylabel("learning rate (dotted)")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("MSE")
    ax[0].legend()
    ax[0].set_title("stage-1 training loss")
    ax[1].plot([r["step"] for r in rows_ck], [r["psnr_pred"] for r in rows_ck], "o-", label="SwinIR output")
    ax[1].plot([r["step"] for r in rows_ck], [r["psnr_lq"] for r in rows_ck], "--", label="degraded input")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("PSNR (dB, RGB)")
    ax[1].set_title(f"held-out: {len(files)} images x {args.draws} draws")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=110)
    # one example: LQ | restored | HQ (butterfly if present)
    name, k, hq, lq = next((p for p in pairs if "butterfly" in p[0]), pairs[0])
    pred = _restore(model, lq, scfg.pad_multiple)
    save_image(out / "example.png", np.concatenate([lq, np.clip(pred, 0, 1), hq], axis=1))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

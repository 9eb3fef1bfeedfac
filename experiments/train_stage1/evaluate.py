"""Evaluate a small stage-1 CPU run: PSNR gain of the trained SwinIR over its degraded input on held-out images.

The protocol of `common` (fixed draws at seeds 1000 + k, the checkpoint as an `diffbir_eval.methods` cleaner method,
`diffbir_eval.metrics.psnr` on RGB and Y of LQ and of the restored image against HQ), for every saved checkpoint
(PSNR-vs-step curve) and in detail for the newest one. Writes ``metrics.csv`` (per image and draw, newest
checkpoint), ``checkpoints.csv`` (mean per checkpoint), ``summary.json``, ``loss_curve.png`` (training loss +
held-out PSNR; the lr when it varies), ``log.csv`` / ``val.csv`` (copies of the run's logs) and
``example.png`` (LQ | restored | HQ). ``--checkpoints last`` scores only the newest checkpoint.
Usage: python -m experiments.train_stage1.evaluate --run /tmp/stage1_run --heldout /tmp/stage1_data/heldout.txt
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffbir_core.atomic import atomic_open, atomic_path, write_bytes, write_text
from diffbir_core.data import list_images
from diffbir_core.imageio import save_image
from experiments.train_stage1.common import checkpoint_method, checkpoints, fixed_draws, load_run, psnr_rgb_y


def plot_curves(run: Path, out: Path, rows_ck: list[dict], n_images: int, draws: int, log_every: int) -> None:
    """``loss_curve.png``: training loss (+ lr when it varies) and held-out PSNR per checkpoint."""
    import matplotlib  # optional: plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with (run / "log.csv").open() as f:
        log_rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in log_rows]
    loss = [float(r["loss"]) for r in log_rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(steps, loss, lw=0.8, label=f"train L2 (mean of {log_every} steps)")
    if len(loss) >= 10:
        k = 10
        ax[0].plot(
            steps[k - 1 :], np.convolve(loss, np.ones(k) / k, mode="valid"), lw=1.5, label="moving avg (10 rows)"
        )
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
    ax[1].set_title(f"held-out: {n_images} images x {draws} draws")
    ax[1].legend()
    fig.tight_layout()
    with atomic_path(out / "loss_curve.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--out", default="results/train_stage1")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--checkpoints", choices=("all", "last"), default="all")
    ap.add_argument("--no-plot", action="store_true", help="skip loss_curve.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    run, out = Path(args.run), Path(args.out)
    cfg, scfg = load_run(run)
    ckpts = checkpoints(run)
    if args.checkpoints == "last":
        ckpts = ckpts[-1:]
    files = list_images(args.heldout)
    pairs = list(fixed_draws(files, cfg.degradation, args.draws))  # fixed degraded inputs, shared by every checkpoint
    rows_ck, detail = [], []
    for ck in ckpts:
        method = checkpoint_method(ck, scfg)
        t0 = time.time()
        res = []
        for name, seed, hq, lq in pairs:
            (lq_rgb, lq_y), (pred_rgb, pred_y) = psnr_rgb_y(lq, hq), psnr_rgb_y(method.restore(lq), hq)
            res.append((name, seed, lq_rgb, pred_rgb, lq_y, pred_y))
        mean = [float(np.mean([r[i] for r in res])) for i in range(2, 6)]
        rows_ck.append(
            {
                "step": int(ck.name),
                "psnr_lq": mean[0],
                "psnr_pred": mean[1],
                "gain": mean[1] - mean[0],
                "psnr_y_lq": mean[2],
                "psnr_y_pred": mean[3],
                "gain_y": mean[3] - mean[2],
                "eval_s": time.time() - t0,
            }
        )
        print(rows_ck[-1])
        detail = res
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "checkpoints.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows_ck[0]))
        w.writeheader()
        for r in rows_ck:
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    with atomic_open(out / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "draw_seed", "psnr_lq", "psnr_pred", "gain", "psnr_y_lq", "psnr_y_pred", "gain_y"])
        for name, seed, a, b, ya, yb in detail:
            w.writerow([name, seed] + [round(v, 4) for v in (a, b, b - a, ya, yb, yb - ya)])
    per_image: dict[str, list[float]] = {}
    for name, _, a, b, _, _ in detail:
        per_image.setdefault(name, []).append(b - a)
    gains = np.array([r[3] - r[2] for r in detail])
    gains_y = np.array([r[5] - r[4] for r in detail])
    summary = {
        "checkpoint_step": rows_ck[-1]["step"],
        "pairs": len(detail),
        "images": len(files),
        "draws_per_image": args.draws,
        "degradation": cfg.degradation,
        "mean_psnr_lq": rows_ck[-1]["psnr_lq"],
        "mean_psnr_pred": rows_ck[-1]["psnr_pred"],
        "mean_gain_db": float(gains.mean()),
        "median_gain_db": float(np.median(gains)),
        "pairs_improved": int((gains > 0).sum()),
        "mean_psnr_y_lq": rows_ck[-1]["psnr_y_lq"],
        "mean_psnr_y_pred": rows_ck[-1]["psnr_y_pred"],
        "mean_gain_y_db": float(gains_y.mean()),
        "pairs_improved_y": int((gains_y > 0).sum()),
        "per_image_mean_gain_db": {k: float(np.mean(v)) for k, v in per_image.items()},
    }
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    for name in ("log.csv", "val.csv"):
        if (run / name).is_file():
            write_bytes(out / name, (run / name).read_bytes())
    if not args.no_plot:
        plot_curves(run, out, rows_ck, len(files), args.draws, cfg.log_every)
    # one example of the newest checkpoint: LQ | restored | HQ (butterfly if present)
    name, _, hq, lq = next((p for p in pairs if "butterfly" in p[0]), pairs[0])
    save_image(out / "example.png", np.concatenate([lq, method.restore(lq), hq], axis=1))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Evaluation harness: datasets, metrics, a resumable runner and reports (PAPER.md "Evaluation").

    python -m diffbir_eval.run --dataset realsrset --root DATA --method bicubic --metrics niqe --out results/RUN
    python -m diffbir_eval.report            # gathers results/*/summary.json into results/README.md

Modules: `diffbir_eval.datasets` (the paper's six test sets, folders, synthetic pairs), `diffbir_eval.metrics` (PSNR, SSIM,
LPIPS, MANIQA, NIQE, FID, IDS and dlib's identity distance), `diffbir_eval.fid` (Frechet distance and Inception
features), `diffbir_eval.arcface` (the ArcFace network of the IDS protocol), `diffbir_eval.methods` (METHOD -> restore),
`diffbir_eval.store` (run folder, rows), `diffbir_eval.loop` (restore and score), `diffbir_eval.summary` (tables), `diffbir_eval.provenance`,
`diffbir_eval.plots`; command lines `diffbir_eval.run`, `diffbir_eval.report`.
Importing the package loads nothing heavy.
"""

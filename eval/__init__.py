"""Evaluation harness: datasets, metrics, a resumable runner and reports (PAPER.md "Evaluation").

    python -m eval.run --dataset realsrset --root DATA --method bicubic --metrics niqe --out results/RUN
    python -m eval.report            # gathers results/*/summary.json into results/README.md

Modules: `eval.datasets` (the paper's six test sets, folders, synthetic pairs), `eval.metrics` (PSNR, SSIM,
LPIPS, MANIQA, NIQE, FID, IDS and dlib's identity distance), `eval.fid` (Frechet distance and Inception
features), `eval.arcface` (the ArcFace network of the IDS protocol), `eval.methods` (METHOD -> restore),
`eval.store` (run folder, rows), `eval.loop` (restore and score), `eval.summary` (tables), `eval.provenance`,
`eval.plots`; command lines `eval.run`, `eval.report`.
Importing the package loads nothing heavy.
"""

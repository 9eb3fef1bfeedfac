"""Evaluation harness: datasets, metrics, a resumable runner and reports (paper arXiv 2308.15070, "Evaluation").

    python -m diffbir_eval.run --dataset realsrset --root DATA --method bicubic --metrics niqe --out results/RUN
    python -m diffbir_eval.report                    # every results/*/summary.json -> results/README.md
    python -m diffbir_eval.table all --write results/README.md   # the paper-layout tables, published numbers beside
    python -m diffbir_eval.data list|check|fetch     # the registered test sets;  python -m diffbir_eval.run_all: all
    python -m diffbir_eval.bench                     # time and peak memory vs output size
Library: `datasets` (test sets), `registry` (their sources, sha256), `metrics` (pyiqa-named metrics, weight files),
`fid`, `arcface`, `methods` (METHOD -> restore), `store` (run folder, rows), `loop` (restore and score), `summary`
(a run's tables), `provenance`, `plots`, `published` (numbers of papers); the packages `table`, `report`,
`run_all`, `bench`, `data` hold a command's library in ``__init__`` and its CLI in ``__main__``; `run` is a CLI.
Importing the package loads nothing heavy.
"""

#!/usr/bin/env bash
# Run 1 of results/train_stage1 (see its README.md, "Run 1"), from the repository root. ~25 min on one CPU thread.
set -euo pipefail
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
.venv/bin/python -m experiments.train_stage1.prepare_data /tmp/stage1_data
# training is capped at 25 minutes wall clock: on SIGTERM it writes a checkpoint and exits; evaluation uses
# the newest complete checkpoint
timeout --kill-after=120 1500 nice -n 10 .venv/bin/python -m diffbir_core.train stage1 --config results/train_stage1/config.toml \
  || echo "training stopped (exit $?): evaluating the newest checkpoint"
nice -n 10 .venv/bin/python -m experiments.train_stage1.evaluate --run /tmp/stage1_run --heldout /tmp/stage1_data/heldout.txt \
  --out results/train_stage1

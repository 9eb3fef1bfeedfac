#!/usr/bin/env bash
# Run 2 of results/train_stage1 (see its README.md, "Run 2"), from the repository root. ~24 min of training
# on 2 shared CPU cores + ~2 min of evaluation.
set -euo pipefail
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
CFG=results/train_stage1/run2/config.toml
RUN=/tmp/stage1_run2
rm -rf $RUN  # a fresh run (the phase-1 stop below watches for checkpoint 0000200)
.venv/bin/python -m experiments.train_stage1.prepare_data /tmp/stage1_data            # held-out list (as run 1)
.venv/bin/python -m experiments.train_stage1.prepare_data_run2 /tmp/stage1_data_run2  # 114 colour training tiles
# Phase 1: the config's 850-step cosine. In the recorded run it was stopped (SIGTERM -> checkpoint) at step 200,
# once 3.4 s/step had been measured (850 steps would have needed ~48 min); here that stop is automated.
# Checkpoint spacing does not change the training (every step reseeds from (seed, step)).
nice -n 5 .venv/bin/python -m diffbir_core.train stage1 --config $CFG --ckpt-every 50 &
pid=$!
while [ ! -f $RUN/checkpoints/0000200/train_state.pt ] && kill -0 $pid 2>/dev/null; do sleep 2; done
kill -TERM $pid 2>/dev/null || true
wait $pid || true
# keep the recorded run's phase-1 checkpoints (150 as ckpt_every, 200 the stop); drop the extra ones
find $RUN/checkpoints -mindepth 1 -maxdepth 1 -name '0*' ! -name 0000150 ! -name 0000200 -exec rm -rf {} +
# Phase 2: resume from step 200 with max_steps 410 (what fits the rest of the 25 min): the remaining steps follow
# the cosine of a 410-step run (lr 4.6e-4 at step 200 -> 3.2e-4 at step 201 -> 1e-5 at 410).
timeout --kill-after=60 790 nice -n 5 .venv/bin/python -m diffbir_core.train stage1 --config $CFG \
  --resume $RUN/checkpoints/0000200 --max-steps 410 || echo "training stopped (exit $?): evaluating the newest checkpoint"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
nice -n 5 .venv/bin/python -m experiments.train_stage1.evaluate --run $RUN --heldout /tmp/stage1_data/heldout.txt \
  --out results/train_stage1/run2
# in-distribution check (full-size training photos) and colour diagnostics of the final checkpoint
nice -n 5 .venv/bin/python -m experiments.train_stage1.evaluate --run $RUN --heldout /tmp/stage1_data_run2/train_fit.txt \
  --out /tmp/stage1_run2_fit --checkpoints last
cp /tmp/stage1_run2_fit/summary.json results/train_stage1/run2/train_fit_summary.json
cp /tmp/stage1_run2_fit/metrics.csv results/train_stage1/run2/train_fit_metrics.csv
nice -n 5 .venv/bin/python -m experiments.train_stage1.diagnose --run $RUN --checkpoint 0000410 \
  --images /tmp/stage1_data/heldout.txt --train /tmp/stage1_data_run2/train.txt --out results/train_stage1/run2

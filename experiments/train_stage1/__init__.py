"""The small stage-1 CPU training runs of ``results/train_stage1/`` (see its README for what made which file)."""

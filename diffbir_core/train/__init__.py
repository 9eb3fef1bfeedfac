"""Training both DiffBIR stages (paper arXiv 2308.15070, "Training"): ``python -m diffbir_core.train stage1|stage2
--config f.toml``.

`config` (TrainConfig, presets, TOML/JSON), `tasks` (stage 1 SwinIR L2; stage 2 control branch of a frozen SD),
`checkpoint` (official-layout weights + resumable train state), `loop` (the accelerate loop), `__main__` (CLI).
"""

from .checkpoint import find_checkpoint
from .config import TRAIN_PRESETS, TrainConfig, load_config, swinir_config_for
from .loop import lr_at, train
from .tasks import Stage1Task, Stage2Task

__all__ = [
    "TrainConfig",
    "TRAIN_PRESETS",
    "load_config",
    "swinir_config_for",
    "train",
    "lr_at",
    "find_checkpoint",
    "Stage1Task",
    "Stage2Task",
]

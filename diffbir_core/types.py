"""Result type and working-size rule shared by the pipeline, the face layer and the front ends (a leaf module).

Mirrors: the official ``auto_resize`` (v2.0.0 utils/image.py; HEAD diffbir/utils/common.py) for `working_size`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import RestoreParams

__all__ = ["RestoreResult", "working_size"]


@dataclass
class RestoreResult:
    """What a restore call returns (images are HxWx3 float32 in [0, 1])."""

    image: np.ndarray
    stage1: np.ndarray
    alpha: np.ndarray | None = None
    seed: int | None = None
    params: RestoreParams | None = None
    notices: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def working_size(out_hw: tuple[int, int], min_side: int) -> tuple[int, int]:
    """Scale (H, W) up so the short edge is at least ``min_side`` (official `auto_resize`)."""
    h, w = out_hw
    short = min(h, w)
    if short >= min_side:
        return h, w
    r = min_side / short
    return int(round(h * r)), int(round(w * r))

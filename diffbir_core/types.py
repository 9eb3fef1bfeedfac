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
    """Scale (H, W) up so the short edge is ``min_side`` when it is smaller (official ``resize_short_edge_to``,
    HEAD ``diffbir/pipeline.py:25-34``: the long side is ``int()``-truncated, 240x180 -> 682x512)."""
    h, w = out_hw
    if min(h, w) >= min_side:
        return h, w
    if h == w:
        return min_side, min_side
    if h < w:
        return min_side, int(w * (min_side / h))
    return int(h * (min_side / w)), min_side

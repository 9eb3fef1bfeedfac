"""TEMPORARY (removed at merge): the old ``tiling.TiledDenoiser(model, cond, uncond, scale, ...)`` call, for
sampling.py (owned by another branch) until its call site is rewritten as the body below:
``CFGDenoiser(TiledModel(model, tile=, stride=, tile_batch=, progress=), cond, uncond, scale, ...)``.
No CFG of its own: the one CFG is `samplers.CFGDenoiser`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..samplers import CFGDenoiser
from .denoiser import TiledModel
from .windows import Progress

__all__ = ["TiledDenoiser"]


def TiledDenoiser(model: Callable, cond: Any, uncond: Any = None, scale: float = 1.0, *,
                  tile: int, stride: int, rescale: bool = False, batched: bool = True, num_timesteps: int = 1000,
                  tile_batch: int = 1, progress: Progress | None = None) -> CFGDenoiser:
    """TEMPORARY: `samplers.CFGDenoiser` around `TiledModel` (the old signature; see the module docstring)."""
    return CFGDenoiser(TiledModel(model, tile=tile, stride=stride, tile_batch=tile_batch, progress=progress),
                       cond, uncond, scale, rescale=rescale, batched=batched and uncond is not None,
                       num_timesteps=num_timesteps)

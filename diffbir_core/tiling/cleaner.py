"""Stage 1 on large images: a `cleaners.Cleaner` whose network runs tile by tile, fused with Gaussian weights.

``tiled_net`` cuts the (padded) input into overlapping tiles, runs the network on each and fuses the outputs
(``scale`` x the tile) with `windows.blend_tiles`; ``TiledCleaner`` keeps the base cleaner's size semantics,
resize, padding and clamping and only replaces its ``_run_net``.

Mirrors: HEAD diffbir/pipeline.py:67 (apply_cleaner with tiled / tile_size / tile_stride),
HEAD diffbir/utils/common.py:172 (make_tiled_fn with scale_type "up").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..cleaners import Cleaner
from .windows import Progress, Window, blend_tiles

Tensor = torch.Tensor

__all__ = ["TiledCleaner", "tiled_net"]


def tiled_net(
    net: Callable[[Tensor], Tensor],
    x: Tensor,
    tile: int,
    overlap: int,
    *,
    scale: int = 1,
    multiple: int = 1,
    progress: Progress | None = None,
) -> Tensor:
    """``net`` on overlapping ``tile`` x ``tile`` input tiles (``overlap`` pixels shared), outputs (``scale`` x
    the tile) fused with Gaussian weights. ``x`` is already padded to ``multiple``; ``tile`` is rounded down to
    a multiple of it (SwinIR: 64)."""
    h, w = x.shape[-2:]
    tile = (int(tile) // multiple) * multiple
    if tile < multiple:
        raise ValueError(f"cleaner tile must be at least {multiple} pixels (the network's size multiple)")
    if not 0 <= overlap < tile:
        raise ValueError(f"cleaner overlap must be in [0, tile={tile}), got {overlap}")
    stride = tile - int(overlap)

    def run(win: Window) -> Tensor:
        h0, h1, w0, w1 = win
        return net(x[..., h0:h1, w0:w1])

    return blend_tiles(run, (h, w), tile, stride, out_scale=scale, stage="cleaner", progress=progress)


class TiledCleaner(Cleaner):
    """A `Cleaner` that runs its network tile by tile (same size semantics, resize, padding and clamping)."""

    def __init__(self, base: Cleaner, tile: int = 512, overlap: int = 32, progress: Progress | None = None) -> None:
        if base.net is None:
            raise ValueError(f"cleaner {base.spec.name!r} has no network to tile")
        super().__init__(base.spec, base.net, base.device)
        self.tile, self.overlap, self.progress = int(tile), int(overlap), progress

    def __repr__(self) -> str:
        return f"TiledCleaner({self.spec.name!r}, tile {self.tile}, overlap {self.overlap})"

    def _run_net(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h <= self.tile and w <= self.tile:
            return self.net(x)
        return tiled_net(
            self.net, x, self.tile, self.overlap, scale=self.scale, multiple=self.multiple, progress=self.progress
        )

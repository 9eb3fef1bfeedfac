"""Tile windows and Gaussian fusion: the official tiling helpers and the generic blend-tiles runner.

``sliding_windows`` / ``gaussian_weights`` are the official helpers exactly, including the asymmetric Gaussian
midpoints ((W-1)/2 across, H/2 down); ``blend_tiles`` fuses overlapping tiles,
``out[p] = sum_k w_k(p) f(tile_k)[p] / sum_k w_k(p)`` with ``w = outer(y, x)``,
``x_j = N((j - (W-1)/2) / W; 0, 0.01)``, ``y_i = N((i - H/2) / H; 0, 0.01)`` (paper arXiv 2308.15070, "Large images").
``TileEvent`` / ``StopTiles``: the per-tile progress protocol shared by every tiled stage.

Mirrors: v2.0.0 utils/common.py:112 (sliding_windows), :129 (gaussian_weights);
HEAD diffbir/utils/common.py:172 (make_tiled_fn, the blend loop).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
Window = tuple[int, int, int, int]  # (h0, h1, w0, w1) in grid units, end exclusive
Progress = Callable[["TileEvent"], None]

__all__ = [
    "Progress",
    "StopTiles",
    "TileEvent",
    "Window",
    "blend_tiles",
    "gaussian_weights",
    "rect_windows",
    "sliding_windows",
]


def _starts(size: int, tile: int, stride: int) -> list[int]:
    s = list(range(0, size - tile + 1, stride))
    if (size - tile) % stride != 0:
        s.append(size - tile)
    return s


def rect_windows(h: int, w: int, th: int, tw: int, sh: int, sw: int) -> list[Window]:
    """`sliding_windows` with a ``th`` x ``tw`` tile and ``sh`` x ``sw`` stride (checked: positive, tile within the
    ``h`` x ``w`` grid, no gaps)."""
    if th < 1 or tw < 1 or sh < 1 or sw < 1:
        raise ValueError(f"tile ({th}x{tw}) and stride ({sh}x{sw}) must be positive")
    if th > h or tw > w:
        raise ValueError(f"tile {th}x{tw} is larger than the {h}x{w} grid; use a smaller tile or no tiling")
    if sh > th or sw > tw:
        raise ValueError(f"stride {sh}x{sw} larger than the tile {th}x{tw} would leave gaps between tiles")
    return [(hi, hi + th, wi, wi + tw) for hi in _starts(h, th, sh) for wi in _starts(w, tw, sw)]


def sliding_windows(h: int, w: int, tile_size: int, tile_stride: int) -> list[Window]:
    """Official ``sliding_windows``: row starts range(0, h-tile+1, stride) plus h-tile when (h-tile) % stride != 0
    (same for columns); all (hi, hi+tile, wi, wi+tile) in row-major order."""
    return rect_windows(h, w, tile_size, tile_size, tile_stride, tile_stride)


def gaussian_weights(tile_width: int, tile_height: int) -> Tensor:
    """Official ``gaussian_weights`` as a float64 ``[H, W]`` tensor (var 0.01, midpoints (W-1)/2 and H/2)."""
    var = 0.01
    j = torch.arange(tile_width, dtype=torch.float64)
    i = torch.arange(tile_height, dtype=torch.float64)
    norm = math.sqrt(2 * math.pi * var)
    x = torch.exp(-((j - (tile_width - 1) / 2) ** 2) / tile_width**2 / (2 * var)) / norm
    y = torch.exp(-((i - tile_height / 2) ** 2) / tile_height**2 / (2 * var)) / norm
    return y[:, None] * x[None, :]  # [H, W]


class StopTiles(Exception):
    """Raised by a progress callback to cut the current round of tiles short. Only for timing probes (the
    benchmark times a few tiles and multiplies): the result of the call is then NOT valid."""


@dataclass(frozen=True)
class TileEvent:
    """Progress report after each tile: ``stage`` (cleaner / vae_encoder / vae_decoder / diffusion),
    ``index`` of ``total`` tiles in round ``pass_index`` of ``passes`` (0: not known in advance); index -1
    announces the start of a round (after its set-up). A callback may raise `StopTiles` to skip the rest of the
    round (timing probes only: the result is then invalid)."""

    stage: str
    index: int
    total: int
    pass_index: int = 0
    passes: int = 1


def blend_tiles(
    fn: Callable[[Window], Tensor],
    grid_hw: tuple[int, int],
    tile: int | tuple[int, int],
    stride: int | tuple[int, int],
    *,
    out_scale: int = 1,
    stage: str = "tiles",
    progress: Progress | None = None,
) -> Tensor:
    """``sum_k W_k * fn(window_k) / sum_k W_k`` over `sliding_windows` of a ``grid_hw`` grid.

    ``fn(window)`` returns the output of one window, ``out_scale`` output pixels per grid unit; the weights are
    ``gaussian_weights(tile_w * out_scale, tile_h * out_scale)``. A tile larger than the grid is clipped to it.
    Accumulation is float32 (also for half-precision tiles); the result has the tiles' dtype.
    """
    gh, gw = grid_hw
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    if sh > th or sw > tw:
        raise ValueError(f"stride {sh}x{sw} larger than the tile {th}x{tw} would leave gaps between tiles")
    th, tw = min(th, gh), min(tw, gw)
    wins = rect_windows(gh, gw, th, tw, min(sh, th), min(sw, tw))
    s = out_scale
    out = count = wt = None
    dtype = None
    stopped = False
    if progress is not None:
        progress(TileEvent(stage, -1, len(wins)))
    for k, (h0, h1, w0, w1) in enumerate(wins):
        y = fn((h0, h1, w0, w1))  # [B,C,(h1-h0)*s,(w1-w0)*s]
        if out is None:
            dtype = y.dtype
            out = torch.zeros((y.shape[0], y.shape[1], gh * s, gw * s), dtype=torch.float32, device=y.device)
            count = torch.zeros((1, 1, gh * s, gw * s), dtype=torch.float32, device=y.device)
            wt = gaussian_weights(tw * s, th * s).to(device=y.device, dtype=torch.float32)[None, None]
        if y.shape[-2:] != wt.shape[-2:]:
            raise RuntimeError(f"tile function returned {tuple(y.shape[-2:])}, expected {tuple(wt.shape[-2:])}")
        out[..., h0 * s : h1 * s, w0 * s : w1 * s] += y.float() * wt
        count[..., h0 * s : h1 * s, w0 * s : w1 * s] += wt
        if progress is not None:
            try:
                progress(TileEvent(stage, k, len(wins)))
            except StopTiles:
                stopped = True
                break
    out.div_(count)
    return (out.nan_to_num_(0.0) if stopped else out).to(dtype)

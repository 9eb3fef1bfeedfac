"""Tiled diffusion: the raw model call ``(x_t, t, cond) -> eps or v`` run tile by tile, fused with Gaussian weights.

``TiledModel`` is a drop-in for the model under `diffusion.cfg.CFGDenoiser`:
``CFGDenoiser(TiledModel(model, tile=64, stride=48), cond, uncond, s, batched=True)``. It crops x_t and every
spatial condition (c_img) to each latent tile, shares the rest (c_txt), and fuses the tile outputs with
`windows.gaussian_weights`. CFG stays in `CFGDenoiser` (one implementation); CFG and the fusion are both linear,
so this equals the official per-tile CFG up to float rounding (fixture parity in tests/test_tiling.py).
Guidance acts on the fused z0_hat of the whole latent, so it composes with tiling.

Mirrors: HEAD diffbir/sampler/spaced_sampler.py:204-218 (model.forward replaced by a tiled forward cropping
c_img; CFG around it at :153-158); v2.0.0 utils/sampler.py:231 (predict_noise_tiled, CFG inside each tile).
Deviation: the official v2.0.0 refuses guidance while tiled (utils/sampler.py:289).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .windows import (
    Progress,
    StopTiles,
    TileEvent,
    Window,
    gaussian_weights,
    rect_windows,
)

Tensor = torch.Tensor

__all__ = ["TiledModel", "crop_cond"]


def crop_cond(cond: Any, hw: tuple[int, int], win: Window) -> Any:
    """Crop every spatial entry (a 4-D tensor whose last two dims are ``hw``, e.g. c_img) of a cond dict to
    ``win``; other entries (c_txt) are shared."""
    if cond is None:
        return None
    if not isinstance(cond, Mapping):
        raise ValueError("tiled denoising needs cond as a dict of tensors")
    h0, h1, w0, w1 = win
    return {
        k: (v[..., h0:h1, w0:w1] if torch.is_tensor(v) and v.ndim == 4 and tuple(v.shape[-2:]) == tuple(hw) else v)
        for k, v in cond.items()
    }


def _cat_cond(conds: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class TiledModel:
    """``model(x, t, cond)`` on every ``tile`` x ``tile`` latent window (every ``stride``; both clipped to the
    latent) of x_t and of the spatial conditions, fused with Gaussian weights in float32; the result has x's dtype.

    ``tile_batch`` tiles go through ``model`` in one forward (GPU throughput; 1 on CPU). ``progress`` gets a
    `TileEvent` ("diffusion") per tile of every call; raising `StopTiles` there ends the call after the current
    forward with the uncovered positions zero (timing probes only: the result is then invalid).
    """

    def __init__(
        self,
        model: Callable[[Tensor, Tensor, Any], Tensor],
        *,
        tile: int,
        stride: int,
        tile_batch: int = 1,
        progress: Progress | None = None,
    ) -> None:
        if tile < 8 or tile % 8:
            raise ValueError(f"latent tile must be a positive multiple of 8 (UNet downsampling), got {tile}")
        if not 1 <= stride <= tile:
            raise ValueError(f"latent stride must be in [1, tile={tile}], got {stride}")
        if tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
        self.model, self.tile, self.stride = model, int(tile), int(stride)
        self.tile_batch, self.progress = int(tile_batch), progress

    def windows(self, hw: tuple[int, int]) -> list[Window]:
        h, w = hw
        th, tw = min(self.tile, h), min(self.tile, w)
        return rect_windows(h, w, th, tw, min(self.stride, th), min(self.stride, tw))

    def __call__(self, x: Tensor, t: Tensor, cond: Any) -> Tensor:
        hw = tuple(x.shape[-2:])
        wins = self.windows(hw)
        th, tw = wins[0][1] - wins[0][0], wins[0][3] - wins[0][2]
        wt = gaussian_weights(tw, th).to(device=x.device, dtype=torch.float32)[None, None]  # [1,1,th,tw]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        count = torch.zeros((1, 1, *hw), dtype=torch.float32, device=x.device)
        b = x.shape[0]
        if self.progress is not None:
            self.progress(TileEvent("diffusion", -1, len(wins)))
        for g0 in range(0, len(wins), self.tile_batch):
            group = wins[g0 : g0 + self.tile_batch]
            xs = torch.cat([x[..., h0:h1, w0:w1] for h0, h1, w0, w1 in group])  # [n*B,C,th,tw]
            cs = _cat_cond([crop_cond(cond, hw, win) for win in group]) if cond is not None else None
            y = self.model(xs, t.repeat(len(group)), cs)  # [n*B,C,th,tw]
            stopped = False
            for j, (h0, h1, w0, w1) in enumerate(group):
                out[..., h0:h1, w0:w1] += y[j * b : (j + 1) * b].float() * wt
                count[..., h0:h1, w0:w1] += wt
                if self.progress is not None:
                    try:
                        self.progress(TileEvent("diffusion", g0 + j, len(wins)))
                    except StopTiles:
                        stopped = True
            if stopped:
                return out.div_(count).nan_to_num_(0.0).to(x.dtype)
        return out.div_(count).to(x.dtype)

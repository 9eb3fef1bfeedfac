"""The VAE as the pipeline calls it: untiled, official blend tiles or seam-free synced tiles, per direction.

``VAETiling`` says how one direction runs; ``VAERunner`` encodes / decodes with one per direction under the
speed options' autocast; ``decode_differentiable`` is the decoder for rgb-space guidance whose backward pass is
the tile-by-tile VJP of the blend decoder, ``dz = sum_k VJP_k(w_k g_k / sum_j w_j)`` (memory of one tile);
``PosteriorCache`` encodes the latent-guidance target once and re-samples its posterior (exact: the official
code re-runs the deterministic encoder every time).

Mirrors: v2.0.0 model/cldm.py:92-120 (vae_encode / vae_encode_tiled / vae_decode / vae_decode_tiled),
HEAD diffbir/model/cldm.py:92-140 (vae_encode / vae_decode with tiled=...), v2.0.0 utils/sampler.py:183
(the guidance target re-encoded every repeat). Tilings: `tiling.vae_blend`, `tiling.vae_sync`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..tiling.vae_blend import (
    posterior_to_latent,
    vae_decode_tiled,
    vae_posterior_tiled,
)
from ..tiling.vae_sync import vae_decode_synced, vae_posterior_synced
from ..tiling.windows import Progress, TileEvent, gaussian_weights, rect_windows

Tensor = torch.Tensor

__all__ = ["PosteriorCache", "VAERunner", "VAETiling", "decode_differentiable"]


@dataclass(frozen=True)
class VAETiling:
    """How one VAE direction runs. Sizes in latent pixels (x8 image pixels).

    mode "none": untiled; "blend": official Gaussian blend of ``tile`` tiles every ``stride``; "sync": cores of
    ``tile`` with a receptive-field halo and whole-image GroupNorm statistics (exact with ``stats_fraction`` 1,
    else taken from that fraction of the tiles), full-image intermediate tensors kept while they fit in
    ``store_gb`` (None: always). ``cost``: the planner's estimate of the compute relative to an untiled pass.
    """

    mode: Literal["none", "blend", "sync"] = "none"
    tile: int = 64
    stride: int = 0  # 0: three quarters of the tile
    store_gb: float | None = None
    stats_fraction: float = 1.0
    cost: float | None = None

    def __post_init__(self) -> None:
        if self.stride == 0:
            object.__setattr__(self, "stride", max(1, self.tile * 3 // 4))
        if self.mode not in ("none", "blend", "sync"):
            raise ValueError(f"VAE tiling mode must be 'none', 'blend' or 'sync', got {self.mode!r}")
        if self.tile < 1 or self.stride < 1 or self.stride > self.tile:
            raise ValueError(f"VAE tile {self.tile} / stride {self.stride}: need 1 <= stride <= tile")

    @property
    def store_bytes(self) -> float | None:
        return None if self.store_gb is None else self.store_gb * 2**30


class VAERunner:
    """Encodes / decodes with a `VAETiling` per direction, under the speed options' autocast.

    ``posterior(x)``, ``encode(x, sample, noise)`` (x in [-1,1]) and ``decode(z)`` mirror `ControlLDM`;
    ``decode_grad(z)`` is a differentiable decode for rgb guidance (tile by tile when tiled).
    """

    def __init__(
        self,
        ldm,
        encoder: VAETiling = VAETiling(),
        decoder: VAETiling = VAETiling(),
        *,
        amp: Callable[[], Any] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.ldm, self.encoder, self.decoder = ldm, encoder, decoder
        self.amp = amp or _null_context
        self.progress = progress

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        e = self.encoder
        with self.amp():
            if e.mode == "none" or (x.shape[-2] <= 8 * e.tile and x.shape[-1] <= 8 * e.tile):
                mean, logvar = self.ldm.vae_posterior(x)
            elif e.mode == "blend":
                mean, logvar = vae_posterior_tiled(self.ldm, x, 8 * e.tile, 8 * e.stride, progress=self.progress)
            else:
                mean, logvar = vae_posterior_synced(
                    self.ldm,
                    x,
                    core=e.tile,
                    store_bytes=e.store_bytes,
                    stats_fraction=e.stats_fraction,
                    progress=self.progress,
                )
        return mean.float(), logvar.float()

    def encode(self, x: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        mean, logvar = self.posterior(x)
        return posterior_to_latent(self.ldm, mean, logvar, sample, noise)

    def decode(self, z: Tensor) -> Tensor:
        d = self.decoder
        with self.amp():
            if d.mode == "none" or (z.shape[-2] <= d.tile and z.shape[-1] <= d.tile):
                out = self.ldm.vae_decode(z)
            elif d.mode == "blend":
                out = vae_decode_tiled(self.ldm, z, d.tile, d.stride, progress=self.progress)
            else:
                out = vae_decode_synced(
                    self.ldm,
                    z,
                    core=d.tile,
                    store_bytes=d.store_bytes,
                    stats_fraction=d.stats_fraction,
                    progress=self.progress,
                )
        return out.float()

    def decode_grad(self, z: Tensor) -> Tensor:
        d = self.decoder
        if d.mode == "none" or (z.shape[-2] <= d.tile and z.shape[-1] <= d.tile):
            with self.amp():
                return self.ldm.vae_decode(z).float()
        return decode_differentiable(self, z)


def _null_context():
    return torch.autocast("cpu", enabled=False)


class _TiledDecodeFn(torch.autograd.Function):
    """Forward: the runner's (tiled) decode without a graph. Backward: the VJP of the Gaussian-blend tiled
    decoder, one tile's graph at a time: dz = sum_k VJP_k(w_k g_k / sum_j w_j)."""

    @staticmethod
    def forward(ctx, z: Tensor, runner: VAERunner) -> Tensor:
        ctx.runner = runner
        ctx.save_for_backward(z)
        with torch.no_grad():
            return runner.decode(z)

    @staticmethod
    def backward(ctx, g: Tensor):
        (z,) = ctx.saved_tensors
        runner: VAERunner = ctx.runner
        tile = runner.decoder.tile
        stride = min(runner.decoder.stride, tile)
        h, w = z.shape[-2:]
        th, tw = min(tile, h), min(tile, w)
        wins = rect_windows(h, w, th, tw, min(stride, th), min(stride, tw))
        wt = gaussian_weights(tw * 8, th * 8).to(device=g.device, dtype=torch.float32)[None, None]
        count = torch.zeros((1, 1, h * 8, w * 8), dtype=torch.float32, device=g.device)
        for h0, h1, w0, w1 in wins:
            count[..., h0 * 8 : h1 * 8, w0 * 8 : w1 * 8] += wt
        gz = torch.zeros_like(z)
        for k, (h0, h1, w0, w1) in enumerate(wins):
            gt = g[..., h0 * 8 : h1 * 8, w0 * 8 : w1 * 8] * wt / count[..., h0 * 8 : h1 * 8, w0 * 8 : w1 * 8]
            with torch.enable_grad():
                zt = z[..., h0:h1, w0:w1].detach().requires_grad_(True)
                with runner.amp():
                    y = runner.ldm.vae_decode(zt).float()
                gz[..., h0:h1, w0:w1] += torch.autograd.grad(y, zt, grad_outputs=gt)[0]
            if runner.progress is not None:
                runner.progress(TileEvent("vae_decoder_vjp", k, len(wins)))
        return gz, None


def decode_differentiable(runner: VAERunner, z: Tensor) -> Tensor:
    """Decode whose backward pass is the tile-by-tile VJP of the Gaussian-blend decoder (bounded memory).
    With a "sync" decoder the forward is the seam-free decode and the gradient that of the blend decoder
    (their difference is a GroupNorm-statistics correction; documented approximation)."""
    return _TiledDecodeFn.apply(z, runner)


class PosteriorCache:
    """``encode(x, eps)`` for latent guidance: the posterior (mean, logvar) of the target is computed once per
    target tensor and re-sampled for every repeat (the official code re-runs the deterministic encoder each
    time: same numbers, one encoder pass instead of steps x repeats)."""

    def __init__(self, posterior: Callable[[Tensor], tuple[Tensor, Tensor]], scale_factor: float) -> None:
        self.posterior_fn, self.scale_factor = posterior, float(scale_factor)
        self._key: tuple | None = None
        self._value: tuple[Tensor, Tensor] | None = None

    def __call__(self, x: Tensor, eps: Tensor | None) -> Tensor:
        key = (x.data_ptr(), tuple(x.shape), x.dtype, x.device, x._version)
        if key != self._key:
            with torch.no_grad():
                self._value = self.posterior_fn(x)
            self._key = key
        mean, logvar = self._value
        if eps is None:
            return mean * self.scale_factor
        if eps.shape != mean.shape:
            raise ValueError(f"noise shape {tuple(eps.shape)} != latent shape {tuple(mean.shape)}")
        return (mean + torch.exp(0.5 * logvar) * eps) * self.scale_factor

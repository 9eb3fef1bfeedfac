"""Large images and speed: tiling for every stage, a memory model that chooses it, and runtime speed options.

What it is
    * ``sliding_windows`` / ``gaussian_weights``: the official tiling helpers (v2.0.0 ``utils/common.py``),
      exactly, including the asymmetric Gaussian midpoints ((W-1)/2 across, H/2 down).
    * ``blend_tiles``: the generic "overlapping tiles fused with Gaussian weights" runner,
      ``out = sum_k W_k * f(tile_k) / sum_k W_k`` (PAPER.md "Large images"; v2.1 ``make_tiled_fn``).
    * Stage 1: ``TiledCleaner`` (a `cleaners.Cleaner` whose ``_run_net`` works tile by tile).
    * VAE, official mode "blend": ``vae_encode_tiled`` / ``vae_decode_tiled`` = v2.0.0
      ``ControlLDM.vae_encode_tiled`` / ``vae_decode_tiled`` (fixture ``tiled.safetensors``). Every tile is
      normalised with its OWN GroupNorm statistics, so tiles disagree in brightness/contrast: seams.
    * VAE, seam-free mode "sync": ``vae_posterior_synced`` / ``vae_decode_synced``. The latent grid is cut into
      non-overlapping cores; a tile is its core plus a halo as wide as the receptive field of the layers it runs,
      so a core's output is exact once every GroupNorm uses the statistics of the WHOLE image. The walk goes
      GroupNorm by GroupNorm: the statistics of each are accumulated over all cores (float64 sums) before any
      tile is normalised with them, re-running tiles from the last stored full-image tensor (a "checkpoint",
      kept whenever it fits the memory budget). Result: the untiled VAE up to float rounding (no seams, no
      brightness drift), about 1.5x its compute when checkpoints fit, more when memory forces recomputation.
      When even that costs too much inside the budget (``auto_tiling``: > 2.5x), the statistics are taken from
      an evenly spread fraction of the tiles (``stats_fraction``): approximate, but every tile still uses the
      SAME statistics, so still no seams. (A cheaper "estimate statistics in a first pass with per-tile norms,
      apply them in a second" scheme was tried and rejected: on the fixture VAE the estimates do not converge -
      13-20% of the output range after 1-3 passes.) The mid-block self-attention runs untiled on a
      latent-resolution checkpoint (SDPA: O(N) memory, O(N^2) time).
    * ``TiledDenoiser``: official v2.0.0 ``SpacedSampler.predict_noise_tiled`` as a denoiser callable for every
      sampler: per latent tile the CFG noise prediction on the cropped x_t and cropped c_img (c_txt shared),
      fused with Gaussian weights. CFG is done INSIDE each tile (as the official code); since CFG and the fusion
      are both linear the order does not matter mathematically, and inside lets cond/uncond share one batch.
      Guidance (``guidance.LatentImageGuidance``) acts on the fused z0_hat of the whole latent, so it composes
      with tiling (the official code refuses ``cond_fn`` with tiling).
    * ``decode_differentiable``: the decoder VJP needed by rgb-space guidance, tile by tile (an autograd Function
      that recomputes one tile's graph at a time): memory of one tile instead of the whole image.
    * ``auto_tiling(params, image_hw, device) -> TilingPlan``: per stage, tile iff the untiled peak estimate
      (weights + activations, bytes-per-pixel constants measured on the full-size models) exceeds the budget
      (``--max-memory``, default: 80% of the RAM that is free for us on CPU / of the free GPU memory), and pick
      the largest tile that fits. ``TileOptions.enabled`` True/False forces tiling on/off.
    * ``SpeedOptions`` / ``apply_speed_options``: SDPA attention, channels_last (GPU default; off on CPU where it
      measured slower), fp16/bf16 (GPU only), ``torch.compile`` (optional), CPU offload for small GPUs;
      ``TextEmbeddingCache`` encodes each prompt once; ``PosteriorCache`` encodes the guidance target once
      (the latent guidance re-samples its posterior, so this is exact).

Equations
    Gaussian fusion (per latent position p): eps(x_t)[p] = sum_k w_k(p) eps_k(x_t|tile k)[p] / sum_k w_k(p),
    w = outer(y, x), x_j = N((j - (W-1)/2) / W; 0, 0.01), y_i = N((i - H/2) / H; 0, 0.01).
    GroupNorm with shared statistics: y = (x - mu_g) / sqrt(var_g + eps) * gamma + beta, mu_g / var_g over the
    whole image (sum and sum of squares over the cores, float64).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .cleaners import Cleaner

Tensor = torch.Tensor
Window = tuple[int, int, int, int]  # (h0, h1, w0, w1) in grid units, end exclusive
Progress = Callable[["TileEvent"], None]

__all__ = [
    "sliding_windows", "gaussian_weights", "blend_tiles", "TileEvent", "StopTiles",
    "tiled_net", "TiledCleaner",
    "vae_posterior_tiled", "vae_encode_tiled", "vae_decode_tiled",
    "vae_posterior_synced", "vae_decode_synced",
    "VAETiling", "VAERunner", "decode_differentiable", "PosteriorCache",
    "TiledDenoiser", "crop_cond",
    "TilingPlan", "auto_tiling", "memory_budget_bytes", "model_bytes", "estimate_stage_bytes",
    "SpeedOptions", "apply_speed_options", "set_attention", "TextEmbeddingCache", "autocast_for",
]


# ----------------------------------------------------------------------------------------------------------
# official helpers
# ----------------------------------------------------------------------------------------------------------
def _starts(size: int, tile: int, stride: int) -> list[int]:
    s = list(range(0, size - tile + 1, stride))
    if (size - tile) % stride != 0:
        s.append(size - tile)
    return s


def _windows(h: int, w: int, th: int, tw: int, sh: int, sw: int) -> list[Window]:
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
    return _windows(h, w, tile_size, tile_size, tile_stride, tile_stride)


def gaussian_weights(tile_width: int, tile_height: int) -> Tensor:
    """Official ``gaussian_weights`` as a float64 ``[H, W]`` tensor (var 0.01, midpoints (W-1)/2 and H/2)."""
    var = 0.01
    j = torch.arange(tile_width, dtype=torch.float64)
    i = torch.arange(tile_height, dtype=torch.float64)
    norm = math.sqrt(2 * math.pi * var)
    x = torch.exp(-((j - (tile_width - 1) / 2) ** 2) / tile_width ** 2 / (2 * var)) / norm
    y = torch.exp(-((i - tile_height / 2) ** 2) / tile_height ** 2 / (2 * var)) / norm
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


def blend_tiles(fn: Callable[[Window], Tensor], grid_hw: tuple[int, int], tile: int | tuple[int, int],
                stride: int | tuple[int, int], *, out_scale: int = 1, stage: str = "tiles",
                progress: Progress | None = None) -> Tensor:
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
    wins = _windows(gh, gw, th, tw, min(sh, th), min(sw, tw))
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
        out[..., h0 * s:h1 * s, w0 * s:w1 * s] += y.float() * wt
        count[..., h0 * s:h1 * s, w0 * s:w1 * s] += wt
        if progress is not None:
            try:
                progress(TileEvent(stage, k, len(wins)))
            except StopTiles:
                stopped = True
                break
    out.div_(count)
    return (out.nan_to_num_(0.0) if stopped else out).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# stage 1
# ----------------------------------------------------------------------------------------------------------
def tiled_net(net: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, *, scale: int = 1,
              multiple: int = 1, progress: Progress | None = None) -> Tensor:
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
        return tiled_net(self.net, x, self.tile, self.overlap, scale=self.scale, multiple=self.multiple,
                         progress=self.progress)


# ----------------------------------------------------------------------------------------------------------
# VAE, official Gaussian blend ("blend")
# ----------------------------------------------------------------------------------------------------------
def _check_image(x: Tensor, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] % 8 or x.shape[-2] % 8:
        raise ValueError(f"{what}: image must be [B,C,H,W] with H and W multiples of 8, got {tuple(x.shape)}")


def vae_posterior_tiled(ldm, image: Tensor, tile_size: int, tile_stride: int, *,
                        progress: Progress | None = None) -> tuple[Tensor, Tensor]:
    """(mean, logvar) of the VAE posterior, tiles of ``tile_size`` / ``tile_stride`` image pixels (multiples of
    8) blended with ``gaussian_weights(tile/8, tile/8)`` in latent space (official ``vae_encode_tiled``)."""
    _check_image(image, "vae_posterior_tiled")
    if tile_size % 8 or tile_stride % 8:
        raise ValueError(f"VAE tile size/stride must be multiples of 8 pixels, got {tile_size}/{tile_stride}")
    h, w = image.shape[-2] // 8, image.shape[-1] // 8

    def run(win: Window) -> Tensor:
        h0, h1, w0, w1 = win
        mean, logvar = ldm.vae_posterior(image[..., h0 * 8:h1 * 8, w0 * 8:w1 * 8])
        return torch.cat([mean, logvar], 1)  # [B,2z,th,tw]

    moments = blend_tiles(run, (h, w), tile_size // 8, tile_stride // 8, stage="vae_encoder", progress=progress)
    return moments.chunk(2, dim=1)


def vae_encode_tiled(ldm, image: Tensor, tile_size: int, tile_stride: int, sample: bool = False,
                     noise: Tensor | None = None, *, progress: Progress | None = None) -> Tensor:
    """Official ``vae_encode_tiled(image, tile_size, tile_stride, sample)`` (image pixels). ``sample=True`` draws
    ONE posterior sample from the blended posterior (the official code blends per-tile samples, which shrinks
    the noise where tiles overlap); ``noise`` is that draw (default ``torch.randn``)."""
    mean, logvar = vae_posterior_tiled(ldm, image, tile_size, tile_stride, progress=progress)
    return _posterior_to_latent(ldm, mean, logvar, sample, noise)


def _posterior_to_latent(ldm, mean: Tensor, logvar: Tensor, sample: bool, noise: Tensor | None) -> Tensor:
    if not sample:
        return mean * ldm.scale_factor
    if noise is None:
        noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(mean.shape)}")
    return (mean + torch.exp(0.5 * logvar) * noise) * ldm.scale_factor


def vae_decode_tiled(ldm, z: Tensor, tile_size: int, tile_stride: int, *, progress: Progress | None = None) -> Tensor:
    """Official ``vae_decode_tiled(z, tile_size, tile_stride)`` (latent pixels); pixel weights
    ``gaussian_weights(8 tile, 8 tile)``."""

    def run(win: Window) -> Tensor:
        h0, h1, w0, w1 = win
        return ldm.vae_decode(z[..., h0:h1, w0:w1])

    return blend_tiles(run, tuple(z.shape[-2:]), tile_size, tile_stride, out_scale=8, stage="vae_decoder",
                       progress=progress)


# ----------------------------------------------------------------------------------------------------------
# VAE with GroupNorm statistics shared across tiles ("sync"): exact, memory bounded by checkpoints
# ----------------------------------------------------------------------------------------------------------
NormFn = Callable[[nn.GroupNorm, Tensor], Tensor]


def _plain_norm(gn: nn.GroupNorm, x: Tensor) -> Tensor:
    return F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps)


def _resnet(block: nn.Module, x: Tensor, norm: NormFn) -> Tensor:
    """diffusers ``ResnetBlock2D`` (VAE form: no time embedding, no up/down sampling)."""
    h = block.nonlinearity(norm(block.norm1, x))
    h = block.conv1(h)
    h = block.nonlinearity(norm(block.norm2, h))
    h = block.conv2(block.dropout(h))
    sc = block.conv_shortcut(x) if block.conv_shortcut is not None else x
    return (sc + h) / block.output_scale_factor


def _attention(attn: nn.Module, x: Tensor, norm: NormFn) -> Tensor:
    """diffusers ``Attention`` of the VAE mid-block (spatial self-attention, GroupNorm inside, residual)."""
    b, c, h, w = x.shape
    y = norm(attn.group_norm, x) if attn.group_norm is not None else x
    y = y.reshape(b, c, h * w).transpose(1, 2)                      # [B,N,C]
    q, k, v = attn.to_q(y), attn.to_k(y), attn.to_v(y)
    d = q.shape[-1] // attn.heads
    q, k, v = (t.reshape(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))  # [B,heads,N,d]
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, attn.heads * d)
    y = attn.to_out[1](attn.to_out[0](y)).transpose(1, 2).reshape(b, c, h, w)
    if attn.residual_connection:
        y = y + x
    return y / attn.rescale_output_factor


def _check_vae_blocks(vae: nn.Module) -> None:
    """The walk below re-runs diffusers' VAE blocks; refuse structures it does not reproduce."""
    from diffusers.models.attention_processor import Attention

    for name, m in vae.named_modules():
        kind = type(m).__name__
        bad = None
        if kind == "ResnetBlock2D":
            if m.time_emb_proj is not None or m.upsample is not None or m.downsample is not None:
                bad = "time embedding / resampling inside a resnet"
        elif kind == "Downsample2D":
            if m.norm is not None or not m.use_conv:
                bad = "norm or no conv in a downsampler"
        elif kind == "Upsample2D":
            if m.norm is not None or m.use_conv_transpose or not m.use_conv or not m.interpolate:
                bad = "norm / transposed conv / no interpolation in an upsampler"
        elif isinstance(m, Attention):
            if m.spatial_norm is not None or m.norm_q is not None or m.norm_k is not None \
                    or abs(m.scale - (m.inner_dim // m.heads) ** -0.5) > 1e-12:
                bad = "spatial norm / qk norm / custom scale in attention"
        elif kind in ("SpatialNorm", "ResnetBlockCondNorm2D"):
            bad = "spatial normalisation"
        if bad:
            raise NotImplementedError(f"synced tiled VAE: unsupported module {name} ({kind}): {bad}; "
                                      "use mode 'blend' or no VAE tiling")


@dataclass(frozen=True)
class _Op:
    """One step of the VAE walk: ``fn(x, norm)``; ``radius`` = receptive radius in input pixels; ``factor`` =
    output / input resolution; ``norms`` = GroupNorm calls it makes; ``first_norm`` = the GroupNorm applied to its
    INPUT first (its statistics are those of the stored input); ``whole`` = needs the whole image (attention)."""

    fn: Callable[[Tensor, NormFn], Tensor]
    radius: float
    factor: float
    out_channels: int
    norms: int = 0
    first_norm: nn.GroupNorm | None = None
    whole: bool = False
    macs: float = 0.0  # multiply-accumulates per output pixel (cost model; attention adds 2 N C per token)


def _conv_macs(conv: nn.Module) -> float:
    return float(conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1])


def _resnet_op(r: nn.Module) -> _Op:
    macs = _conv_macs(r.conv1) + _conv_macs(r.conv2) + (_conv_macs(r.conv_shortcut) if r.conv_shortcut is not None else 0)
    return _Op(lambda x, n: _resnet(r, x, n), 2, 1, r.conv2.out_channels, 2, r.norm1, macs=macs)


def _mid_ops(mid: nn.Module) -> list[_Op]:
    ops = [_resnet_op(mid.resnets[0])]
    for attn, res in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            c = attn.to_out[0].out_features
            ops.append(_Op(lambda x, n, a=attn: _attention(a, x, n), 0, 1, c,
                           int(attn.group_norm is not None), attn.group_norm, whole=True, macs=4.0 * c * c))
        ops.append(_resnet_op(res))
    return ops


def _encoder_ops(ldm) -> list[_Op]:
    """conv_in, down blocks (resnets, right/bottom-padded stride-2 convs), mid block, output, quant_conv."""
    enc = ldm.vae.encoder
    ops = [_Op(lambda x, n: enc.conv_in(x), 1, 1, enc.conv_in.out_channels, macs=_conv_macs(enc.conv_in))]
    for blk in enc.down_blocks:
        ops += [_resnet_op(r) for r in blk.resnets]
        for ds in (blk.downsamplers or []):
            pad = ds.padding == 0
            ops.append(_Op(lambda x, n, d=ds, p=pad: d.conv(F.pad(x, (0, 1, 0, 1)) if p else x), 2, 0.5,
                           ds.conv.out_channels, macs=_conv_macs(ds.conv)))
    ops += _mid_ops(enc.mid_block)
    quant = ldm.vae.quant_conv

    def out(x: Tensor, n: NormFn) -> Tensor:
        x = enc.conv_out(enc.conv_act(n(enc.conv_norm_out, x)))
        return quant(x) if quant is not None else x

    ops.append(_Op(out, 2, 1, quant.out_channels if quant is not None else enc.conv_out.out_channels, 1,
                   enc.conv_norm_out, macs=_conv_macs(enc.conv_out) + (_conv_macs(quant) if quant is not None else 0)))
    return ops


def _decoder_ops(ldm) -> list[_Op]:
    """conv_in, mid block, up blocks (resnets, nearest x2 + conv), output."""
    dec = ldm.vae.decoder
    ops = [_Op(lambda x, n: dec.conv_in(x), 1, 1, dec.conv_in.out_channels, macs=_conv_macs(dec.conv_in))]
    ops += _mid_ops(dec.mid_block)
    for blk in dec.up_blocks:
        ops += [_resnet_op(r) for r in blk.resnets]
        for us in (blk.upsamplers or []):
            ops.append(_Op(lambda x, n, u=us: u.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")), 1, 2,
                           us.conv.out_channels, macs=_conv_macs(us.conv)))
    ops.append(_Op(lambda x, n: dec.conv_out(dec.conv_act(n(dec.conv_norm_out, x))), 1, 1,
                   dec.conv_out.out_channels, 1, dec.conv_norm_out, macs=_conv_macs(dec.conv_out)))
    return ops


def _split(n: int, core: int) -> list[tuple[int, int]]:
    """``n`` latent pixels cut into ceil(n / core) nearly equal consecutive cores."""
    k = max(1, math.ceil(n / core))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k)]


def _group_stats(gn: nn.GroupNorm, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(batch, group) float64 sum and sum of squares of ``x`` (an eighth of the channels at a time)."""
    b, c = x.shape[:2]
    s1 = torch.zeros((b, c), dtype=torch.float64, device=x.device)
    s2 = torch.zeros((b, c), dtype=torch.float64, device=x.device)
    step = max(1, c // 8)
    for c0 in range(0, c, step):
        v = x[:, c0:c0 + step].double()
        s1[:, c0:c0 + step] = v.sum((-2, -1))
        s2[:, c0:c0 + step] = v.square().sum((-2, -1))
    g = gn.num_groups
    return s1.reshape(b, g, c // g).sum(-1), s2.reshape(b, g, c // g).sum(-1)


def _finish_stats(s1: Tensor, s2: Tensor, n: float) -> tuple[Tensor, Tensor]:
    mean = s1 / n
    return mean, (s2 / n - mean.square()).clamp_min(0)                # biased variance, as GroupNorm


def _normalise(gn: nn.GroupNorm, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """GroupNorm of ``x`` with given per-(batch, group) float64 statistics, folded into one scale and shift."""
    rep = x.shape[1] // gn.num_groups
    rstd = torch.rsqrt(var + gn.eps).repeat_interleave(rep, dim=1)     # [B,C]
    mu = mean.repeat_interleave(rep, dim=1)
    scale = rstd * gn.weight.double() if gn.weight is not None else rstd
    shift = (gn.bias.double() if gn.bias is not None else 0.0) - mu * scale
    return torch.addcmul(shift.to(x.dtype)[..., None, None], x, scale.to(x.dtype)[..., None, None])


class _StatsTaken(Exception):
    """Raised by the norm callable once it has accumulated the statistics a round was run for."""


class _SharedNorm:
    """Norm callable for one tile: GroupNorm call ``first + k`` uses the whole-image statistics ``stats[first+k]``;
    the call numbered ``target`` instead accumulates its CORE statistics and stops the tile."""

    def __init__(self, stats: dict[int, tuple[Tensor, Tensor]], first: int, target: int | None, acc: list) -> None:
        self.stats, self.k, self.target, self.acc = stats, first, target, acc
        self.core_px: Window = (0, 0, 0, 0)  # core, in pixels of the tile at latent resolution (scaled below)
        self.tile_h = 1

    def __call__(self, gn: nn.GroupNorm, x: Tensor) -> Tensor:
        k = self.k
        self.k += 1
        if k == self.target:
            s = x.shape[-2] / self.tile_h                                # pixels per latent pixel here
            y0, y1, x0, x1 = (int(round(v * s)) for v in self.core_px)
            s1, s2 = _group_stats(gn, x[..., y0:y1, x0:x1])
            n = (x.shape[1] // gn.num_groups) * (y1 - y0) * (x1 - x0)
            if self.acc:
                self.acc[0] += s1
                self.acc[1] += s2
                self.acc[2] += n
            else:
                self.acc.extend([s1, s2, n])
            raise _StatsTaken
        mean, var = self.stats[k]
        return _normalise(gn, x, mean, var)


@dataclass(frozen=True)
class _Round:
    """One step of a synced walk: "direct" statistics of GroupNorm ``g`` from the stored tensor; "stats": tiles of
    ops[c:end] up to GroupNorm ``g``; "store": tiles of ops[c:end] written as the new stored tensor; "whole":
    op ``c`` run untiled on the stored tensor."""

    kind: Literal["direct", "stats", "store", "whole"]
    c: int
    end: int
    g: int = -1


def _walk_rounds(ops: Sequence[_Op], in_bytes: float, out_bytes: Sequence[float],
                 store_bytes: float | None) -> list[_Round]:
    """The schedule of `_synced_walk` (see there); ``out_bytes[i]`` = bytes of op i's full output."""
    rounds: list[_Round] = []
    first = 0
    x_bytes, c = in_bytes, 0
    for i, op in enumerate(ops):
        if op.whole:
            if c < i:
                rounds.append(_Round("store", c, i))
                x_bytes, c = out_bytes[i - 1], i
            rounds.append(_Round("whole", i, i + 1, first))
            x_bytes, c = out_bytes[i], i + 1
            first += op.norms
            continue
        for j in range(op.norms):
            kind = "direct" if (j == 0 and c == i and op.first_norm is not None) else "stats"
            rounds.append(_Round(kind, c, i + 1, first + j))
        first += op.norms
        if i == len(ops) - 1 or store_bytes is None or x_bytes + out_bytes[i] <= store_bytes:
            rounds.append(_Round("store", c, i + 1))
            x_bytes, c = out_bytes[i], i + 1
    return rounds


def _stats_subset(n: int, fraction: float) -> list[int]:
    """Indices of round(n * fraction) (at least 1) cores spread evenly over the n cores."""
    m = max(1, min(n, int(round(n * fraction))))
    return sorted({int(i * n / m + n / (2 * m)) for i in range(m)})


def _walk_geometry(ops: Sequence[_Op], grid_hw: tuple[int, int], in_res: float, core: int):
    """(resolution before each op (+ after the last), index of each op's first GroupNorm, cores, tiles_for)."""
    gh, gw = grid_hw
    res = [float(in_res)]
    for op in ops:
        res.append(res[-1] * op.factor)
    first_norm = [0]
    for op in ops:
        first_norm.append(first_norm[-1] + op.norms)
    cores = [(a, b, c, d) for a, b in _split(gh, core) for c, d in _split(gw, core)]

    def tiles_for(c: int, end: int) -> list[tuple[Window, Window]]:
        rad = sum(ops[j].radius / res[j] for j in range(c, end))       # latent pixels
        halo = int(math.ceil(rad)) + 1
        return [((max(0, a - halo), min(gh, b + halo), max(0, cc - halo), min(gw, d + halo)), (a, b, cc, d))
                for a, b, cc, d in cores]

    return res, first_norm, cores, tiles_for


def synced_cost(ops: Sequence[_Op], grid_hw: tuple[int, int], in_res: float, in_channels: int, *, core: int,
                store_bytes: float | None, stats_fraction: float = 1.0, elem: int = 4) -> dict[str, float]:
    """Cost model of a synced walk without running it: multiply-accumulates relative to one untiled pass
    (``factor``), and the largest pair of stored full-image tensors (``store_peak_bytes``)."""
    gh, gw = grid_hw
    res, first_norm, _, tiles_for = _walk_geometry(ops, grid_hw, in_res, core)
    out_bytes = [op.out_channels * gh * gw * res[i + 1] ** 2 * elem for i, op in enumerate(ops)]
    rounds = _walk_rounds(ops, in_channels * gh * gw * in_res ** 2 * elem, out_bytes, store_bytes)
    n_tok = gh * gw

    def op_cost(j: int, area: float, frac: float = 1.0) -> float:
        extra = 2.0 * n_tok * ops[j].out_channels if ops[j].whole else 0.0
        return (ops[j].macs + extra) * area * res[j + 1] ** 2 * frac

    untiled = sum(op_cost(j, gh * gw) for j in range(len(ops)))
    total, x_bytes, peak = 0.0, in_channels * gh * gw * in_res ** 2 * elem, 0.0
    for r in rounds:
        if r.kind == "direct":
            continue
        if r.kind == "whole":
            total += op_cost(r.c, gh * gw)
            x_bytes = out_bytes[r.c]
            continue
        last = r.end - 1
        frac = 1.0 if r.kind == "store" else (r.g - first_norm[last]) / max(1, ops[last].norms)
        tl = tiles_for(r.c, r.end)
        if r.kind == "stats":
            tl = [tl[k] for k in _stats_subset(len(tl), stats_fraction)]
        for tile, _ in tl:
            area = (tile[1] - tile[0]) * (tile[3] - tile[2])
            total += sum(op_cost(j, area) for j in range(r.c, last)) + op_cost(last, area, frac)
        if r.kind == "store":
            peak = max(peak, x_bytes + out_bytes[last])
            x_bytes = out_bytes[last]
    return dict(factor=total / untiled, store_peak_bytes=peak, rounds=len(rounds))


def _synced_walk(ops: Sequence[_Op], x: Tensor, grid_hw: tuple[int, int], in_res: int, *, core: int,
                 store_bytes: float | None = None, stats_fraction: float = 1.0, stage: str = "vae",
                 progress: Progress | None = None) -> Tensor:
    """Run ``ops`` on ``x`` (``in_res`` pixels per latent pixel) tile by tile with EXACT whole-image GroupNorm
    statistics; returns the full output.

    Invariant: a stored full tensor X (the "checkpoint") is the exact output of ``ops[:c]``. For every GroupNorm
    call g after it, in order: one round over the tiles runs ``ops[c:]`` from X (crop = core + halo) with the known
    statistics up to g and accumulates g's statistics over the cores (a GroupNorm on the stored tensor itself is
    computed from X directly). When an op is complete, its output becomes the new checkpoint if it fits in
    ``store_bytes`` next to X (None: always; the last op always): one more round writes the cores. Whole-image
    ops (self-attention) run untiled on a checkpoint. Halo = receptive radius of ``ops[c:i+1]`` + 1 latent pixel,
    so every core is exact. Cost (`synced_cost`): about 1.5x an untiled run when every op is stored, more when
    memory forces recomputation from an earlier checkpoint. ``stats_fraction`` < 1 takes the statistics from
    that fraction of the cores (spread evenly) - cheaper statistic rounds, approximate statistics; every tile
    still uses the SAME statistics, so there are still no seams.
    """
    if not 0 < stats_fraction <= 1:
        raise ValueError(f"stats_fraction must be in (0, 1], got {stats_fraction}")
    gh, gw = grid_hw
    bsz = x.shape[0]
    res, first_norm, _, tiles_for = _walk_geometry(ops, grid_hw, in_res, core)
    out_bytes = [bsz * op.out_channels * gh * gw * res[i + 1] ** 2 * x.element_size() for i, op in enumerate(ops)]
    schedule = _walk_rounds(ops, x.numel() * x.element_size(), out_bytes, store_bytes)
    stats: dict[int, tuple[Tensor, Tensor]] = {}
    X = x

    def direct_stats(gn: nn.GroupNorm, g: int) -> None:
        n = (X.shape[1] // gn.num_groups) * X.shape[-2] * X.shape[-1]
        stats[g] = _finish_stats(*_group_stats(gn, X), n)

    def run_round(k_round: int, c: int, end: int, target: int | None) -> Tensor | list:
        rc = res[c]
        out = None
        acc: list = []
        tl = tiles_for(c, end)
        if target is not None and stats_fraction < 1:
            tl = [tl[k] for k in _stats_subset(len(tl), stats_fraction)]
        done = 0
        if progress is not None:
            progress(TileEvent(stage, -1, len(tl), k_round, len(schedule)))
        for k, (tile, cr) in enumerate(tl):
            norm = _SharedNorm(stats, first_norm[c], target, acc)
            norm.tile_h = tile[1] - tile[0]
            norm.core_px = (cr[0] - tile[0], cr[1] - tile[0], cr[2] - tile[2], cr[3] - tile[2])
            y = X[..., int(tile[0] * rc):int(tile[1] * rc), int(tile[2] * rc):int(tile[3] * rc)]
            try:
                for op in ops[c:end]:
                    y = op.fn(y, norm)
            except _StatsTaken:
                pass
            else:
                if target is not None:
                    raise RuntimeError(f"synced VAE: GroupNorm call {target} was never reached")
                ro = res[end]
                if out is None:
                    out = torch.empty((bsz, y.shape[1], int(gh * ro), int(gw * ro)), dtype=y.dtype, device=y.device)
                out[..., int(cr[0] * ro):int(cr[1] * ro), int(cr[2] * ro):int(cr[3] * ro)] = \
                    y[..., int((cr[0] - tile[0]) * ro):int((cr[1] - tile[0]) * ro),
                      int((cr[2] - tile[2]) * ro):int((cr[3] - tile[2]) * ro)]
            done = k + 1
            if progress is not None:
                try:
                    progress(TileEvent(stage, k, len(tl), k_round, len(schedule)))
                except StopTiles:                                       # timing probe: zero the other cores
                    break
        if target is None and out is not None and done < len(tl):
            ro = res[end]
            for _, cr in tl[done:]:
                out[..., int(cr[0] * ro):int(cr[1] * ro), int(cr[2] * ro):int(cr[3] * ro)] = 0
        return out if target is None else acc

    for k_round, r in enumerate(schedule):
        if r.kind == "direct":
            direct_stats(ops[r.c if r.c == r.end - 1 else r.end - 1].first_norm, r.g)
        elif r.kind == "stats":
            s1, s2, n = run_round(k_round, r.c, r.end, r.g)
            stats[r.g] = _finish_stats(s1, s2, n)
        elif r.kind == "store":
            X = run_round(k_round, r.c, r.end, None)
        else:                                                           # whole-image op (self-attention)
            op = ops[r.c]
            if progress is not None:
                progress(TileEvent(stage, -1, 1, k_round, len(schedule)))
            if op.first_norm is not None and op.norms:
                direct_stats(op.first_norm, r.g)
            X = op.fn(X, _SharedNorm(stats, r.g, None, []))
            if progress is not None:
                try:
                    progress(TileEvent(stage, 0, 1, k_round, len(schedule)))
                except StopTiles:
                    pass
    return X


def vae_posterior_synced(ldm, image: Tensor, *, core: int = 64, store_bytes: float | None = None,
                         stats_fraction: float = 1.0, progress: Progress | None = None) -> tuple[Tensor, Tensor]:
    """(mean, logvar clamped to [-30, 20]) of the VAE posterior, tile by tile (``core`` latent pixels per tile
    core) with exact whole-image GroupNorm statistics; equals the untiled ``vae_posterior`` up to float rounding."""
    _check_image(image, "vae_posterior_synced")
    _check_vae_blocks(ldm.vae)
    grid = (image.shape[-2] // 8, image.shape[-1] // 8)
    moments = _synced_walk(_encoder_ops(ldm), image, grid, 8, core=core, store_bytes=store_bytes,
                           stats_fraction=stats_fraction, stage="vae_encoder", progress=progress)
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def vae_decode_synced(ldm, z: Tensor, *, core: int = 64, store_bytes: float | None = None,
                      stats_fraction: float = 1.0, progress: Progress | None = None) -> Tensor:
    """``ldm.vae_decode(z)`` tile by tile with exact whole-image GroupNorm statistics (no seams)."""
    _check_vae_blocks(ldm.vae)
    x = z / ldm.scale_factor
    if ldm.vae.post_quant_conv is not None:
        x = ldm.vae.post_quant_conv(x)                                   # 1x1: pointwise, untiled
    return _synced_walk(_decoder_ops(ldm), x, tuple(z.shape[-2:]), 1, core=core, store_bytes=store_bytes,
                        stats_fraction=stats_fraction, stage="vae_decoder", progress=progress)


# ----------------------------------------------------------------------------------------------------------
# VAE runner (what the pipeline calls)
# ----------------------------------------------------------------------------------------------------------
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

    def __init__(self, ldm, encoder: VAETiling = VAETiling(), decoder: VAETiling = VAETiling(), *,
                 amp: Callable[[], Any] | None = None, progress: Progress | None = None) -> None:
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
                mean, logvar = vae_posterior_synced(self.ldm, x, core=e.tile, store_bytes=e.store_bytes,
                                                    stats_fraction=e.stats_fraction, progress=self.progress)
        return mean.float(), logvar.float()

    def encode(self, x: Tensor, sample: bool = False, noise: Tensor | None = None) -> Tensor:
        mean, logvar = self.posterior(x)
        return _posterior_to_latent(self.ldm, mean, logvar, sample, noise)

    def decode(self, z: Tensor) -> Tensor:
        d = self.decoder
        with self.amp():
            if d.mode == "none" or (z.shape[-2] <= d.tile and z.shape[-1] <= d.tile):
                out = self.ldm.vae_decode(z)
            elif d.mode == "blend":
                out = vae_decode_tiled(self.ldm, z, d.tile, d.stride, progress=self.progress)
            else:
                out = vae_decode_synced(self.ldm, z, core=d.tile, store_bytes=d.store_bytes,
                                        stats_fraction=d.stats_fraction, progress=self.progress)
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
        wins = _windows(h, w, th, tw, min(stride, th), min(stride, tw))
        wt = gaussian_weights(tw * 8, th * 8).to(device=g.device, dtype=torch.float32)[None, None]
        count = torch.zeros((1, 1, h * 8, w * 8), dtype=torch.float32, device=g.device)
        for h0, h1, w0, w1 in wins:
            count[..., h0 * 8:h1 * 8, w0 * 8:w1 * 8] += wt
        gz = torch.zeros_like(z)
        for k, (h0, h1, w0, w1) in enumerate(wins):
            gt = g[..., h0 * 8:h1 * 8, w0 * 8:w1 * 8] * wt / count[..., h0 * 8:h1 * 8, w0 * 8:w1 * 8]
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


# ----------------------------------------------------------------------------------------------------------
# tiled diffusion
# ----------------------------------------------------------------------------------------------------------
def crop_cond(cond: Any, hw: tuple[int, int], win: Window) -> Any:
    """Crop every spatial entry (a 4-D tensor whose last two dims are ``hw``, e.g. c_img) of a cond dict to
    ``win``; other entries (c_txt) are shared."""
    if cond is None:
        return None
    if not isinstance(cond, Mapping):
        raise ValueError("tiled denoising needs cond as a dict of tensors")
    h0, h1, w0, w1 = win
    return {k: (v[..., h0:h1, w0:w1] if torch.is_tensor(v) and v.ndim == 4 and tuple(v.shape[-2:]) == tuple(hw) else v)
            for k, v in cond.items()}


def _cat_cond(conds: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class TiledDenoiser:
    """``denoiser(x, t)`` = official ``predict_noise_tiled``: CFG model output per ``tile`` x ``tile`` latent tile
    (every ``stride``), on the cropped x_t and cropped spatial conditions, fused with Gaussian weights.

    ``model(x, t, cond)`` is the raw conditional model (e.g. ``ControlLDM`` with the control strength bound);
    CFG options are those of `samplers.CFGDenoiser` (``batched`` puts cond and uncond in one forward);
    ``tile_batch`` tiles go through the model together (GPU throughput; 1 on CPU).
    """

    def __init__(self, model: Callable[[Tensor, Tensor, Any], Tensor], cond: Any, uncond: Any = None,
                 scale: float = 1.0, *, tile: int = 64, stride: int = 32, rescale: bool = False,
                 batched: bool = True, num_timesteps: int = 1000, tile_batch: int = 1,
                 progress: Progress | None = None) -> None:
        if tile < 8 or tile % 8:
            raise ValueError(f"latent tile must be a positive multiple of 8 (UNet downsampling), got {tile}")
        if not 1 <= stride <= tile:
            raise ValueError(f"latent stride must be in [1, tile={tile}], got {stride}")
        if tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
        self.model, self.cond, self.uncond, self.scale = model, cond, uncond, float(scale)
        self.tile, self.stride, self.rescale, self.batched = int(tile), int(stride), rescale, batched
        self.num_timesteps, self.tile_batch, self.progress = num_timesteps, int(tile_batch), progress

    def windows(self, hw: tuple[int, int]) -> list[Window]:
        h, w = hw
        th, tw = min(self.tile, h), min(self.tile, w)
        return _windows(h, w, th, tw, min(self.stride, th), min(self.stride, tw))

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        from .samplers import CFGDenoiser

        hw = tuple(x.shape[-2:])
        wins = self.windows(hw)
        th, tw = wins[0][1] - wins[0][0], wins[0][3] - wins[0][2]
        wt = gaussian_weights(tw, th).to(device=x.device, dtype=torch.float32)[None, None]
        eps = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        count = torch.zeros((1, 1, *hw), dtype=torch.float32, device=x.device)
        b = x.shape[0]
        if self.progress is not None:
            self.progress(TileEvent("diffusion", -1, len(wins)))
        for g0 in range(0, len(wins), self.tile_batch):
            group = wins[g0:g0 + self.tile_batch]
            xs = torch.cat([x[..., h0:h1, w0:w1] for h0, h1, w0, w1 in group])         # [n*B,C,th,tw]
            cond = _cat_cond([crop_cond(self.cond, hw, win) for win in group])
            uncond = _cat_cond([crop_cond(self.uncond, hw, win) for win in group]) if self.uncond is not None else None
            den = CFGDenoiser(self.model, cond, uncond, self.scale, rescale=self.rescale,
                              batched=self.batched and uncond is not None, num_timesteps=self.num_timesteps)
            out = den(xs, t.repeat(len(group)))                                        # [n*B,C,th,tw]
            stopped = False
            for j, (h0, h1, w0, w1) in enumerate(group):
                eps[..., h0:h1, w0:w1] += out[j * b:(j + 1) * b].float() * wt
                count[..., h0:h1, w0:w1] += wt
                if self.progress is not None:
                    try:
                        self.progress(TileEvent("diffusion", g0 + j, len(wins)))
                    except StopTiles:
                        stopped = True
            if stopped:
                return eps.div_(count).nan_to_num_(0.0).to(x.dtype)
        return eps.div_(count).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# memory model and automatic choice
# ----------------------------------------------------------------------------------------------------------
# Peak ACTIVATION bytes per pixel (fp32, batch 1; weights not included), measured with the full-size models
# on CPU (torch 2.14, SDPA attention, 2 threads; peak RSS above the resident weights, eval/bench.py
# calibration, 512x512 and 768x768 images). Pixels are image pixels of the stage's output (cleaner,
# decoder) or input (encoder); "diffusion" is per LATENT pixel of one CFG step (cond + uncond batched).
STAGE_BYTES_PER_PIXEL: dict[str, float] = {
    "cleaner": 1600.0,
    "vae_encoder": 2600.0,
    "vae_decoder": 4000.0,
    "diffusion": 150_000.0,
}
# fixed extra per stage (allocator / library workspaces), bytes
STAGE_OVERHEAD = 300 * 2**20
# resident size of the Python / torch / diffusers runtime itself on CPU, beyond the model weights (measured:
# RSS 7.24 GB with 6.24 GiB of full-size weights after building, eval/bench.py at 512)
RUNTIME_BYTES_CPU = 1000 * 2**20


def estimate_stage_bytes(stage: str, pixels: float, *, dtype_bytes: int = 4) -> float:
    """Peak activation bytes of one untiled call of ``stage`` on ``pixels`` pixels (see STAGE_BYTES_PER_PIXEL)."""
    if stage not in STAGE_BYTES_PER_PIXEL:
        raise ValueError(f"unknown stage {stage!r}; one of {sorted(STAGE_BYTES_PER_PIXEL)}")
    return STAGE_BYTES_PER_PIXEL[stage] * pixels * dtype_bytes / 4 + STAGE_OVERHEAD


def model_bytes(*modules: Any) -> int:
    """Bytes of the parameters and buffers of the given modules (None entries skipped)."""
    total = 0
    for m in modules:
        if isinstance(m, nn.Module):
            total += sum(p.numel() * p.element_size() for p in m.parameters())
            total += sum(b.numel() * b.element_size() for b in m.buffers())
    return total


def _rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_budget_bytes(device: str | torch.device = "cpu", max_memory_gb: float | None = None) -> int:
    """The process budget: ``max_memory_gb`` if given, else 80% of (what this process holds + what is free):
    RAM on CPU (``psutil.virtual_memory().available``), device memory on CUDA (``torch.cuda.mem_get_info``)."""
    if max_memory_gb is not None:
        if max_memory_gb <= 0:
            raise ValueError(f"max memory must be > 0 GB, got {max_memory_gb}")
        return int(max_memory_gb * 2**30)
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(0.8 * (free + torch.cuda.memory_allocated(dev)))
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil is a dependency of accelerate
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(0.8 * (avail + _rss_bytes()))


@dataclass(frozen=True)
class TilingPlan:
    """What `auto_tiling` decided, per stage, and why (estimates in GiB)."""

    cleaner: bool = False
    cleaner_tile: int = 512
    cleaner_overlap: int = 32
    vae_encoder: VAETiling = field(default_factory=VAETiling)
    vae_decoder: VAETiling = field(default_factory=VAETiling)
    diffusion: bool = False
    latent_tile: int = 64
    latent_stride: int = 32
    budget_gb: float = 0.0
    weights_gb: float = 0.0
    estimates_gb: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def any(self) -> bool:
        return self.cleaner or self.diffusion or self.vae_encoder.mode != "none" or self.vae_decoder.mode != "none"

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


# the full-size stage-2 weights (UNet 866M + control 363M + VAE 84M + text 354M params, fp32) for estimates
# made before any model is loaded
_DEFAULT_STAGE2_WEIGHTS = 6.7 * 2**30
_DEFAULT_CLEANER_WEIGHTS = 0.1 * 2**30


def _vae_ops_for_planning(vae: nn.Module | None) -> tuple[list[_Op], list[_Op]]:
    """Encoder / decoder op lists of ``vae`` (default: the SD 2.1 VAE structure, built on the meta device)."""
    if vae is None:
        from .models.ldm import STAGE2_CONFIGS, build_vae

        with torch.device("meta"):
            vae = build_vae(STAGE2_CONFIGS["sd21_base"])

    class _Holder:
        pass

    holder = _Holder()
    holder.vae = vae
    return _encoder_ops(holder), _decoder_ops(holder)


def auto_tiling(params, image_hw: tuple[int, int], device: str | torch.device = "cpu", *,
                weights_bytes: int | None = None, budget_bytes: int | None = None, dtype_bytes: int = 4,
                vae_mode: Literal["sync", "blend"] = "sync", vae: nn.Module | None = None,
                max_sync_cost: float = 2.5) -> TilingPlan:
    """Decide tiling per stage for a ``params`` restore whose working (stage-1 output) size is ``image_hw``.

    ``params.tiles.enabled``: True tiles every stage larger than one tile, False none, None decides per stage:
    tile iff weights + the untiled activation estimate exceed the budget (``params.tiles.max_memory_gb`` or
    `memory_budget_bytes`), then take the largest tile that fits. The diffusion is also tiled when the latent
    has more than 8x the tile's area (attention cost grows with the square of the token count; tiling keeps the
    time per pixel constant). ``weights_bytes``: resident model bytes (default: the full-size models).
    ``vae``: the VAE module whose structure the synced-tiling cost model uses (default: SD 2.1's).
    """
    opts = params.tiles
    h, w = int(image_hw[0]), int(image_hw[1])
    hp, wp = -(-h // 64) * 64, -(-w // 64) * 64                          # stage 2 works on the x64 padded image
    lh, lw = hp // 8, wp // 8
    budget = budget_bytes if budget_bytes is not None else memory_budget_bytes(device, opts.max_memory_gb)
    if weights_bytes is None:
        weights_bytes = int(_DEFAULT_STAGE2_WEIGHTS if params.uses_diffusion else 0) + int(_DEFAULT_CLEANER_WEIGHTS)
    free = budget - weights_bytes - (RUNTIME_BYTES_CPU if torch.device(device).type == "cpu" else 0)
    notes: list[str] = []
    if free <= 0:
        notes.append(f"the weights ({weights_bytes / 2**30:.1f} GiB) alone exceed the budget "
                     f"({budget / 2**30:.1f} GiB): tiling everything with the smallest tiles")
    forced = opts.enabled
    gib = 2**30
    est = {
        "cleaner": estimate_stage_bytes("cleaner", h * w, dtype_bytes=4) / gib,
        "vae_encoder": estimate_stage_bytes("vae_encoder", hp * wp, dtype_bytes=dtype_bytes) / gib,
        "diffusion": estimate_stage_bytes("diffusion", lh * lw, dtype_bytes=dtype_bytes) / gib,
        "vae_decoder": estimate_stage_bytes("vae_decoder", hp * wp, dtype_bytes=dtype_bytes) / gib,
    }

    def want(stage: str, bigger_than_tile: bool) -> bool:
        if not bigger_than_tile or forced is False:
            return False
        return forced is True or est[stage] * gib > free

    # 1. cleaner: tiles of cleaner_tile (reduced until they fit)
    ctile = int(opts.cleaner_tile)
    cleaner = want("cleaner", max(h, w) > ctile)
    if cleaner:
        while ctile > 128 and estimate_stage_bytes("cleaner", ctile * ctile) > free:
            ctile //= 2
        if ctile != opts.cleaner_tile:
            notes.append(f"cleaner tile reduced to {ctile} px to fit the budget")
    # 2./4. VAE: "sync" (seam-free) with the cheapest (core, statistics fraction) whose tile fits in 60% of what
    # is free, the rest holding the walk's stored full-image tensors; exact statistics (fraction 1) unless that
    # costs more than max_sync_cost x an untiled pass. "blend" (official) when asked for or nothing is affordable.
    def vae_plan(stage: str) -> VAETiling:
        if not params.uses_diffusion or not want(stage, max(lh, lw) > 32):
            return VAETiling("none")
        if vae_mode == "blend":
            for core in (128, 96, 64, 48, 32, 24, 16):
                if estimate_stage_bytes(stage, (core * 8) ** 2, dtype_bytes=dtype_bytes) <= free:
                    break
            return VAETiling("blend", tile=core, stride=max(8, core * 3 // 4))
        enc_ops, dec_ops = _vae_ops_for_planning(vae)
        ops, in_res, in_ch = (enc_ops, 8, 3) if stage == "vae_encoder" else (dec_ops, 1, 4)
        best = None
        for frac in (1.0, 0.5, 0.25, 0.125):
            for core in (128, 96, 64, 48, 32, 24, 16):
                tile_ws = estimate_stage_bytes(stage, ((core + 8) * 8) ** 2, dtype_bytes=dtype_bytes)
                if tile_ws > 0.6 * max(free, 0):
                    continue
                store = max(0.0, free - tile_ws)
                cost = synced_cost(ops, (lh, lw), in_res, in_ch, core=core, store_bytes=store, stats_fraction=frac,
                                   elem=dtype_bytes)["factor"]
                if best is None or cost < best[0]:
                    best = (cost, core, frac, store)
            if best is not None and best[0] <= max_sync_cost:
                break
        if best is None or best[0] > 2 * max_sync_cost:
            notes.append(f"{stage}: the budget leaves too little room for seam-free tiling at {h}x{w}; using the "
                         "official Gaussian-blend tiles (seams possible) - raise --max-memory to avoid them")
            return VAETiling("blend", tile=32, stride=24)
        cost, core, frac, store = best
        if frac < 1:
            notes.append(f"{stage}: GroupNorm statistics from {frac:.0%} of the tiles (exact ones would cost "
                         f"more than {max_sync_cost}x an untiled pass within the budget); still seam-free")
        return VAETiling("sync", tile=core, stride=max(8, core * 3 // 4), store_gb=round(store / gib, 3),
                         stats_fraction=frac, cost=round(cost, 2))

    enc = vae_plan("vae_encoder")
    dec = vae_plan("vae_decoder")
    # 3. diffusion
    # never tiled for speed alone: only when memory requires it, or when asked (official: only --cldm_tiled,
    # HEAD inference.py:155-164); opts.diffusion forces the diffusion alone on/off
    ltile, lstride = int(opts.latent_tile), int(opts.latent_stride)
    big = max(lh, lw) > ltile
    forced_diffusion = getattr(opts, "diffusion", None)
    if forced_diffusion is not None:
        diffusion = params.uses_diffusion and big and bool(forced_diffusion)
    else:
        diffusion = params.uses_diffusion and want("diffusion", big)
    if diffusion:
        while ltile > 32 and estimate_stage_bytes("diffusion", ltile * ltile, dtype_bytes=dtype_bytes) > free:
            ltile -= 16
            lstride = min(lstride, ltile)
        if ltile != opts.latent_tile:
            notes.append(f"latent tile reduced to {ltile} to fit the budget")
    return TilingPlan(cleaner=cleaner, cleaner_tile=ctile, cleaner_overlap=int(opts.cleaner_overlap),
                      vae_encoder=enc, vae_decoder=dec, diffusion=diffusion, latent_tile=ltile,
                      latent_stride=lstride, budget_gb=round(budget / gib, 3),
                      weights_gb=round(weights_bytes / gib, 3),
                      estimates_gb={k: round(v, 3) for k, v in est.items()}, notes=tuple(notes))


# ----------------------------------------------------------------------------------------------------------
# speed options
# ----------------------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SpeedOptions:
    """Runtime options that change speed, not results (beyond float rounding).

    attention: "sdpa" (``F.scaled_dot_product_attention``: fused, O(N) memory) or "math" (explicit softmax(QK^T)V,
        the plain baseline). channels_last: None = device default (CUDA: the UNet, control branch and VAE; CPU:
        none - on the 2-core AVX2 test machine it measured SLOWER: VAE decode 512 99 s vs 54 s, UNet+control CFG
        forward 88 s vs 82 s, torch 2.14). dtype: half precision is GPU-only (on CPU it is ~200x slower).
    compile: ``torch.compile`` the UNet and control branch (in place). offload (CUDA only): "model" keeps each
        part on the CPU until it runs; "sequential" streams layer by layer (accelerate ``cpu_offload``).
    batched_cfg: cond and uncond in one forward. tile_batch: latent tiles per forward when tiled.
    """

    attention: Literal["sdpa", "math"] = "sdpa"
    channels_last: bool | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    compile: bool = False
    offload: Literal["none", "model", "sequential"] = "none"
    batched_cfg: bool = True
    tile_batch: int = 1

    def validate(self, device: str | torch.device) -> "SpeedOptions":
        dev = torch.device(device)
        if self.attention not in ("sdpa", "math"):
            raise ValueError(f"attention must be 'sdpa' or 'math', got {self.attention!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.dtype != "float32" and dev.type != "cuda":
            raise ValueError(f"dtype {self.dtype} is GPU-only: on CPU half-precision convolutions are ~200x slower "
                             "than float32; use float32 (the default)")
        if self.offload not in ("none", "model", "sequential"):
            raise ValueError(f"offload must be 'none', 'model' or 'sequential', got {self.offload!r}")
        if self.offload != "none" and dev.type != "cuda":
            raise ValueError("offload moves weights between CPU and GPU memory; it needs a CUDA device")
        if self.tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1, got {self.tile_batch}")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def channels_last_parts(self, device: str | torch.device) -> tuple[str, ...]:
        if self.channels_last is False:
            return ()
        if self.channels_last is True or torch.device(device).type == "cuda":
            return ("unet", "controlnet", "vae")
        return ()


def set_attention(module: nn.Module, kind: Literal["sdpa", "math"]) -> int:
    """Set every diffusers ``Attention`` under ``module`` to SDPA (``AttnProcessor2_0``) or the explicit
    softmax(QK^T)V processor (``AttnProcessor``). Returns how many were set."""
    from diffusers.models.attention_processor import (
        Attention,
        AttnProcessor,
        AttnProcessor2_0,
    )

    n = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())
            n += 1
    return n


def autocast_for(device: str | torch.device, dtype: torch.dtype) -> Callable[[], Any]:
    """A context factory: autocast to ``dtype`` on ``device`` (disabled for float32)."""
    dev = torch.device(device)

    def ctx():
        return torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)

    return ctx


def apply_speed_options(ldm, opts: SpeedOptions, device: str | torch.device) -> list[str]:
    """Apply ``opts`` to a `ControlLDM` in place (attention processors, memory format, dtype, compile, offload).
    Returns notices describing what was done."""
    opts.validate(device)
    dev = torch.device(device)
    notes = []
    n = sum(set_attention(getattr(ldm, part), opts.attention) for part in ("unet", "controlnet", "vae"))
    notes.append(f"attention: {opts.attention} ({n} layers)")
    for part in opts.channels_last_parts(dev):
        getattr(ldm, part).to(memory_format=torch.channels_last)
    notes.append(f"channels_last: {', '.join(opts.channels_last_parts(dev)) or 'none'}")
    if opts.dtype != "float32":
        for part in ("unet", "controlnet", "vae"):
            getattr(ldm, part).to(opts.torch_dtype)
        notes.append(f"dtype: {opts.dtype} (UNet, control branch, VAE; text encoder float32)")
    if opts.compile:
        for part in ("unet", "controlnet"):
            getattr(ldm, part).compile()
        notes.append("torch.compile: UNet and control branch (first steps are slow while compiling)")
    if opts.offload != "none":
        notes.append(offload(ldm, dev, opts.offload))
    return notes


def offload(ldm, device: torch.device, kind: Literal["model", "sequential"]) -> str:
    """CPU offload of the ControlLDM parts through accelerate: "model" moves a whole part to ``device`` while it
    runs (and the previous one back), "sequential" streams each layer's weights (smallest memory, slowest)."""
    from accelerate import cpu_offload, cpu_offload_with_hook

    parts = [ldm.text, ldm.vae, ldm.controlnet, ldm.unet]
    ldm.to("cpu")
    if kind == "sequential":
        for p in parts:
            cpu_offload(p, execution_device=device)
        return "offload: sequential (layer by layer)"
    hook = None
    for p in parts:
        _, hook = cpu_offload_with_hook(p, execution_device=device, prev_module_hook=hook)
    return "offload: model (one part on the GPU at a time)"


class TextEmbeddingCache:
    """``encode(prompts) -> c_txt`` that runs the text encoder once per distinct prompt (LRU, ``max_entries``)."""

    def __init__(self, encode: Callable[[list[str]], Tensor], max_entries: int = 32) -> None:
        self.encode, self.max_entries = encode, max_entries
        self._cache: dict[str, Tensor] = {}
        self.misses = 0

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        out = []
        for p in prompts:
            if p in self._cache:
                self._cache[p] = self._cache.pop(p)                      # most recently used last
            else:
                self.misses += 1
                with torch.no_grad():
                    self._cache[p] = self.encode([p]).detach()
                while len(self._cache) > self.max_entries:
                    self._cache.pop(next(iter(self._cache)))
            out.append(self._cache[p])
        return torch.cat(out)

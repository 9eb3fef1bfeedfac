"""Seam-free tiled VAE ("sync"): tiles that share the WHOLE-image GroupNorm statistics.

The latent grid is cut into non-overlapping cores; a tile is its core plus a halo as wide as the receptive field
of the layers it runs. The walk goes GroupNorm by GroupNorm: each one's statistics are accumulated over all cores
(float64 sums) before any tile is normalised with them, re-running tiles from the last stored full-image tensor.
Result: the untiled VAE up to float rounding, about 1.5x its compute when the stored tensors fit in memory.
Rationale, cost model and the rejected alternative: docs/ARCHITECTURE.md "Seam-free tiled VAE".

Equation: GroupNorm with shared statistics y = (x - mu_g) / sqrt(var_g + eps) * gamma + beta, mu_g / var_g over
the whole image. Mirrors (the idea, not the code): HEAD diffbir/utils/tilevae/tilevae.py:307 (VAEHook), whose
GroupNorm statistics are estimated (:400 estimate_group_norm) instead of exact; diffusers ResnetBlock2D / Attention
(the blocks re-run here); the untiled reference is ``ControlLDM.vae_posterior`` / ``vae_decode``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from .vae_blend import check_vae_image
from .windows import Progress, StopTiles, TileEvent, Window

Tensor = torch.Tensor
NormFn = Callable[[nn.GroupNorm, Tensor], Tensor]

__all__ = ["VAEOp", "decoder_ops", "encoder_ops", "synced_cost", "vae_decode_synced", "vae_posterior_synced"]


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
    y = y.reshape(b, c, h * w).transpose(1, 2)  # [B,N,C]
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
            if (
                m.spatial_norm is not None
                or m.norm_q is not None
                or m.norm_k is not None
                or abs(m.scale - (m.inner_dim // m.heads) ** -0.5) > 1e-12
            ):
                bad = "spatial norm / qk norm / custom scale in attention"
        elif kind in ("SpatialNorm", "ResnetBlockCondNorm2D"):
            bad = "spatial normalisation"
        if bad:
            raise NotImplementedError(
                f"synced tiled VAE: unsupported module {name} ({kind}): {bad}; use mode 'blend' or no VAE tiling"
            )


@dataclass(frozen=True)
class VAEOp:
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


def _resnet_op(r: nn.Module) -> VAEOp:
    shortcut = _conv_macs(r.conv_shortcut) if r.conv_shortcut is not None else 0
    macs = _conv_macs(r.conv1) + _conv_macs(r.conv2) + shortcut
    return VAEOp(lambda x, n: _resnet(r, x, n), 2, 1, r.conv2.out_channels, 2, r.norm1, macs=macs)


def _mid_ops(mid: nn.Module) -> list[VAEOp]:
    ops = [_resnet_op(mid.resnets[0])]
    for attn, res in zip(mid.attentions, mid.resnets[1:]):
        if attn is not None:
            c = attn.to_out[0].out_features
            ops.append(
                VAEOp(
                    lambda x, n, a=attn: _attention(a, x, n),
                    0,
                    1,
                    c,
                    int(attn.group_norm is not None),
                    attn.group_norm,
                    whole=True,
                    macs=4.0 * c * c,
                )
            )
        ops.append(_resnet_op(res))
    return ops


def encoder_ops(vae: nn.Module) -> list[VAEOp]:
    """The walk of a diffusers ``AutoencoderKL`` encoder: conv_in, down blocks (resnets, right/bottom-padded
    stride-2 convs), mid block, output, quant_conv."""
    enc = vae.encoder
    ops = [VAEOp(lambda x, n: enc.conv_in(x), 1, 1, enc.conv_in.out_channels, macs=_conv_macs(enc.conv_in))]
    for blk in enc.down_blocks:
        ops += [_resnet_op(r) for r in blk.resnets]
        for ds in blk.downsamplers or []:
            pad = ds.padding == 0
            ops.append(
                VAEOp(
                    lambda x, n, d=ds, p=pad: d.conv(F.pad(x, (0, 1, 0, 1)) if p else x),
                    2,
                    0.5,
                    ds.conv.out_channels,
                    macs=_conv_macs(ds.conv),
                )
            )
    ops += _mid_ops(enc.mid_block)
    quant = vae.quant_conv

    def out(x: Tensor, n: NormFn) -> Tensor:
        x = enc.conv_out(enc.conv_act(n(enc.conv_norm_out, x)))
        return quant(x) if quant is not None else x

    ops.append(
        VAEOp(
            out,
            2,
            1,
            quant.out_channels if quant is not None else enc.conv_out.out_channels,
            1,
            enc.conv_norm_out,
            macs=_conv_macs(enc.conv_out) + (_conv_macs(quant) if quant is not None else 0),
        )
    )
    return ops


def decoder_ops(vae: nn.Module) -> list[VAEOp]:
    """The walk of a diffusers ``AutoencoderKL`` decoder: conv_in, mid block, up blocks (resnets, nearest x2 +
    conv), output."""
    dec = vae.decoder
    ops = [VAEOp(lambda x, n: dec.conv_in(x), 1, 1, dec.conv_in.out_channels, macs=_conv_macs(dec.conv_in))]
    ops += _mid_ops(dec.mid_block)
    for blk in dec.up_blocks:
        ops += [_resnet_op(r) for r in blk.resnets]
        for us in blk.upsamplers or []:
            ops.append(
                VAEOp(
                    lambda x, n, u=us: u.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")),
                    1,
                    2,
                    us.conv.out_channels,
                    macs=_conv_macs(us.conv),
                )
            )
    ops.append(
        VAEOp(
            lambda x, n: dec.conv_out(dec.conv_act(n(dec.conv_norm_out, x))),
            1,
            1,
            dec.conv_out.out_channels,
            1,
            dec.conv_norm_out,
            macs=_conv_macs(dec.conv_out),
        )
    )
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
        v = x[:, c0 : c0 + step].double()
        s1[:, c0 : c0 + step] = v.sum((-2, -1))
        s2[:, c0 : c0 + step] = v.square().sum((-2, -1))
    g = gn.num_groups
    return s1.reshape(b, g, c // g).sum(-1), s2.reshape(b, g, c // g).sum(-1)


def _finish_stats(s1: Tensor, s2: Tensor, n: float) -> tuple[Tensor, Tensor]:
    mean = s1 / n
    return mean, (s2 / n - mean.square()).clamp_min(0)  # biased variance, as GroupNorm


def _normalise(gn: nn.GroupNorm, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """GroupNorm of ``x`` with given per-(batch, group) float64 statistics, folded into one scale and shift."""
    rep = x.shape[1] // gn.num_groups
    rstd = torch.rsqrt(var + gn.eps).repeat_interleave(rep, dim=1)  # [B,C]
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
            s = x.shape[-2] / self.tile_h  # pixels per latent pixel here
            y0, y1, x0, x1 = (round(v * s) for v in self.core_px)
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


def _walk_rounds(
    ops: Sequence[VAEOp], in_bytes: float, out_bytes: Sequence[float], store_bytes: float | None
) -> list[_Round]:
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
    m = max(1, min(n, round(n * fraction)))
    return sorted({int(i * n / m + n / (2 * m)) for i in range(m)})


def _walk_geometry(ops: Sequence[VAEOp], grid_hw: tuple[int, int], in_res: float, core: int):
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
        rad = sum(ops[j].radius / res[j] for j in range(c, end))  # latent pixels
        halo = math.ceil(rad) + 1
        return [
            ((max(0, a - halo), min(gh, b + halo), max(0, cc - halo), min(gw, d + halo)), (a, b, cc, d))
            for a, b, cc, d in cores
        ]

    return res, first_norm, cores, tiles_for


def synced_cost(
    ops: Sequence[VAEOp],
    grid_hw: tuple[int, int],
    in_res: float,
    in_channels: int,
    *,
    core: int,
    store_bytes: float | None,
    stats_fraction: float = 1.0,
    elem: int = 4,
) -> dict[str, float]:
    """Cost model of a synced walk without running it: multiply-accumulates relative to one untiled pass
    (``factor``), and the largest pair of stored full-image tensors (``store_peak_bytes``)."""
    gh, gw = grid_hw
    res, first_norm, _, tiles_for = _walk_geometry(ops, grid_hw, in_res, core)
    out_bytes = [op.out_channels * gh * gw * res[i + 1] ** 2 * elem for i, op in enumerate(ops)]
    rounds = _walk_rounds(ops, in_channels * gh * gw * in_res**2 * elem, out_bytes, store_bytes)
    n_tok = gh * gw

    def op_cost(j: int, area: float, frac: float = 1.0) -> float:
        extra = 2.0 * n_tok * ops[j].out_channels if ops[j].whole else 0.0
        return (ops[j].macs + extra) * area * res[j + 1] ** 2 * frac

    untiled = sum(op_cost(j, gh * gw) for j in range(len(ops)))
    total, x_bytes, peak = 0.0, in_channels * gh * gw * in_res**2 * elem, 0.0
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
    return {"factor": total / untiled, "store_peak_bytes": peak, "rounds": len(rounds)}


def _synced_walk(
    ops: Sequence[VAEOp],
    x: Tensor,
    grid_hw: tuple[int, int],
    in_res: int,
    *,
    core: int,
    store_bytes: float | None = None,
    stats_fraction: float = 1.0,
    stage: str = "vae",
    progress: Progress | None = None,
) -> Tensor:
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
            y = X[..., int(tile[0] * rc) : int(tile[1] * rc), int(tile[2] * rc) : int(tile[3] * rc)]
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
                out[..., int(cr[0] * ro) : int(cr[1] * ro), int(cr[2] * ro) : int(cr[3] * ro)] = y[
                    ...,
                    int((cr[0] - tile[0]) * ro) : int((cr[1] - tile[0]) * ro),
                    int((cr[2] - tile[2]) * ro) : int((cr[3] - tile[2]) * ro),
                ]
            done = k + 1
            if progress is not None:
                try:
                    progress(TileEvent(stage, k, len(tl), k_round, len(schedule)))
                except StopTiles:  # timing probe: zero the other cores
                    break
        if target is None and out is not None and done < len(tl):
            ro = res[end]
            for _, cr in tl[done:]:
                out[..., int(cr[0] * ro) : int(cr[1] * ro), int(cr[2] * ro) : int(cr[3] * ro)] = 0
        return out if target is None else acc

    for k_round, r in enumerate(schedule):
        if r.kind == "direct":
            direct_stats(ops[r.c if r.c == r.end - 1 else r.end - 1].first_norm, r.g)
        elif r.kind == "stats":
            s1, s2, n = run_round(k_round, r.c, r.end, r.g)
            stats[r.g] = _finish_stats(s1, s2, n)
        elif r.kind == "store":
            X = run_round(k_round, r.c, r.end, None)
        else:  # whole-image op (self-attention)
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


def vae_posterior_synced(
    ldm,
    image: Tensor,
    *,
    core: int = 64,
    store_bytes: float | None = None,
    stats_fraction: float = 1.0,
    progress: Progress | None = None,
) -> tuple[Tensor, Tensor]:
    """(mean, logvar clamped to [-30, 20]) of the VAE posterior, tile by tile (``core`` latent pixels per tile
    core) with exact whole-image GroupNorm statistics; equals the untiled ``vae_posterior`` up to float rounding."""
    check_vae_image(image, "vae_posterior_synced")
    _check_vae_blocks(ldm.vae)
    grid = (image.shape[-2] // 8, image.shape[-1] // 8)
    moments = _synced_walk(
        encoder_ops(ldm.vae),
        image,
        grid,
        8,
        core=core,
        store_bytes=store_bytes,
        stats_fraction=stats_fraction,
        stage="vae_encoder",
        progress=progress,
    )
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def vae_decode_synced(
    ldm,
    z: Tensor,
    *,
    core: int = 64,
    store_bytes: float | None = None,
    stats_fraction: float = 1.0,
    progress: Progress | None = None,
) -> Tensor:
    """``ldm.vae_decode(z)`` tile by tile with exact whole-image GroupNorm statistics (no seams)."""
    _check_vae_blocks(ldm.vae)
    x = z / ldm.scale_factor
    if ldm.vae.post_quant_conv is not None:
        x = ldm.vae.post_quant_conv(x)  # 1x1: pointwise, untiled
    return _synced_walk(
        decoder_ops(ldm.vae),
        x,
        tuple(z.shape[-2:]),
        1,
        core=core,
        store_bytes=store_bytes,
        stats_fraction=stats_fraction,
        stage="vae_decoder",
        progress=progress,
    )

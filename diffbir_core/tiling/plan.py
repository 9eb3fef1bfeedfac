"""The memory model and the automatic tiling decision: per stage, tile iff the untiled peak would not fit.

``auto_tiling(params, image_hw, device) -> TilingPlan``: a stage is tiled iff weights + its untiled activation
estimate (bytes-per-pixel constants measured on the full-size models) exceed the budget (``--max-memory``,
default 80% of the free RAM / GPU memory), with the largest tile that fits; ``TileOptions.enabled`` True / False
forces tiling on / off. The VAE prefers seam-free "sync" tiles (cost from `vae_sync.synced_cost`). Defaults
(tile sizes, latent stride) come from `config.TileOptions` only. The model: docs/ARCHITECTURE.md "Memory model".

Mirrors: nothing official (the official CLI takes --*_tiled / tile sizes by hand: HEAD inference.py:128-160,
HEAD diffbir/pipeline.py:99-141 for the size checks it applies).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..config import TileOptions
from ..models.ldm import STAGE2_CONFIGS, build_vae
from ..models.vae_runner import VAETiling
from .vae_sync import VAEOp, decoder_ops, encoder_ops, synced_cost

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dependency of accelerate
    psutil = None

__all__ = [
    "RUNTIME_BYTES_CPU",
    "STAGE_BYTES_PER_PIXEL",
    "STAGE_OVERHEAD",
    "TilingPlan",
    "auto_tiling",
    "estimate_stage_bytes",
    "memory_budget_bytes",
    "model_bytes",
]


# Peak ACTIVATION bytes per pixel (fp32, batch 1; weights not included), measured with the full-size models
# on CPU (torch 2.14, SDPA attention, 2 threads; peak RSS above the resident weights, diffbir_eval/bench
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
# RSS 7.24 GB with 6.24 GiB of full-size weights after building, diffbir_eval/bench at 512)
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
    if psutil is not None:
        avail = psutil.virtual_memory().available
    else:  # pragma: no cover
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(0.8 * (avail + _rss_bytes()))


@dataclass(frozen=True)
class TilingPlan:
    """What `auto_tiling` decided, per stage, and why (estimates in GiB). Tile defaults: `config.TileOptions`."""

    cleaner: bool = False
    cleaner_tile: int = TileOptions.cleaner_tile
    cleaner_overlap: int = TileOptions.cleaner_overlap
    vae_encoder: VAETiling = field(default_factory=VAETiling)
    vae_decoder: VAETiling = field(default_factory=VAETiling)
    diffusion: bool = False
    latent_tile: int = TileOptions.latent_tile
    latent_stride: int = TileOptions.latent_stride
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


def _vae_ops_for_planning(vae: nn.Module | None) -> tuple[list[VAEOp], list[VAEOp]]:
    """Encoder / decoder op lists of ``vae`` (default: the SD 2.1 VAE structure, built on the meta device)."""
    if vae is None:
        with torch.device("meta"):
            vae = build_vae(STAGE2_CONFIGS["sd21_base"])
    return encoder_ops(vae), decoder_ops(vae)


def auto_tiling(
    params,
    image_hw: tuple[int, int],
    device: str | torch.device = "cpu",
    *,
    weights_bytes: int | None = None,
    budget_bytes: int | None = None,
    dtype_bytes: int = 4,
    vae_mode: Literal["sync", "blend"] = "sync",
    vae: nn.Module | None = None,
    max_sync_cost: float = 2.5,
) -> TilingPlan:
    """Decide tiling per stage for a ``params`` restore whose working (stage-1 output) size is ``image_hw``.

    ``params.tiles.enabled``: True tiles every stage larger than one tile, False none, None decides per stage:
    tile iff weights + the untiled activation estimate exceed the budget (``params.tiles.max_memory_gb`` or
    `memory_budget_bytes`), then take the largest tile that fits; the per-stage switches ``params.tiles.cleaner /
    vae_encoder / vae_decoder / diffusion`` (official ``--<stage>_tiled``) override it for one stage. The diffusion
    is never tiled for speed alone (official: only when asked). ``weights_bytes``: resident model bytes (default:
    the full-size models).
    ``vae``: the VAE module whose structure the synced-tiling cost model uses (default: SD 2.1's).
    """
    opts = params.tiles
    h, w = int(image_hw[0]), int(image_hw[1])
    hp, wp = -(-h // 64) * 64, -(-w // 64) * 64  # stage 2 works on the x64 padded image
    lh, lw = hp // 8, wp // 8
    budget = budget_bytes if budget_bytes is not None else memory_budget_bytes(device, opts.max_memory_gb)
    if weights_bytes is None:
        weights_bytes = int(_DEFAULT_STAGE2_WEIGHTS if params.uses_diffusion else 0) + int(_DEFAULT_CLEANER_WEIGHTS)
    free = budget - weights_bytes - (RUNTIME_BYTES_CPU if torch.device(device).type == "cpu" else 0)
    notes: list[str] = []
    if free <= 0:
        notes.append(
            f"the weights ({weights_bytes / 2**30:.1f} GiB) alone exceed the budget "
            f"({budget / 2**30:.1f} GiB): tiling everything with the smallest tiles"
        )
    forced = opts.enabled
    gib = 2**30
    est = {
        "cleaner": estimate_stage_bytes("cleaner", h * w, dtype_bytes=4) / gib,
        "vae_encoder": estimate_stage_bytes("vae_encoder", hp * wp, dtype_bytes=dtype_bytes) / gib,
        "diffusion": estimate_stage_bytes("diffusion", lh * lw, dtype_bytes=dtype_bytes) / gib,
        "vae_decoder": estimate_stage_bytes("vae_decoder", hp * wp, dtype_bytes=dtype_bytes) / gib,
    }

    def want(stage: str, bigger_than_tile: bool) -> bool:
        stage_forced = getattr(opts, stage, None)  # per-stage switch (official --<stage>_tiled) wins
        if not bigger_than_tile or stage_forced is False or (stage_forced is None and forced is False):
            return False
        return stage_forced is True or forced is True or est[stage] * gib > free

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
        if getattr(opts, stage, None) is True and params.uses_diffusion:
            # asked for (official --vae_*_tiled): seam-free synced tiles of the given pixel size (HEAD's tilevae
            # VAEHook also estimates whole-image GroupNorm statistics; not bit-identical), untiled when tiny
            tile = max(8, int(getattr(opts, f"{stage}_tile")) // 8)
            tiny = min(hp, wp) < 8 * tile if stage == "vae_encoder" else max(lh, lw) <= tile
            if tiny:  # HEAD pipeline.py:106-111 (encoder), tilevae.py:319 (decoder)
                return VAETiling("none")
            return VAETiling("sync", tile=tile, stride=max(1, tile * 3 // 4))
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
                cost = synced_cost(
                    ops, (lh, lw), in_res, in_ch, core=core, store_bytes=store, stats_fraction=frac, elem=dtype_bytes
                )["factor"]
                if best is None or cost < best[0]:
                    best = (cost, core, frac, store)
            if best is not None and best[0] <= max_sync_cost:
                break
        if best is None or best[0] > 2 * max_sync_cost:
            notes.append(
                f"{stage}: the budget leaves too little room for seam-free tiling at {h}x{w}; using the "
                "official Gaussian-blend tiles (seams possible) - raise --max-memory to avoid them"
            )
            return VAETiling("blend", tile=32, stride=24)
        cost, core, frac, store = best
        if frac < 1:
            notes.append(
                f"{stage}: GroupNorm statistics from {frac:.0%} of the tiles (exact ones would cost "
                f"more than {max_sync_cost}x an untiled pass within the budget); still seam-free"
            )
        return VAETiling(
            "sync",
            tile=core,
            stride=max(8, core * 3 // 4),
            store_gb=round(store / gib, 3),
            stats_fraction=frac,
            cost=round(cost, 2),
        )

    enc = vae_plan("vae_encoder")
    dec = vae_plan("vae_decoder")
    # 3. diffusion
    ltile, lstride = int(opts.latent_tile), int(opts.latent_stride)
    big = max(lh, lw) > ltile
    # never tiled for speed alone: only when memory requires it, or when asked (official: only --cldm_tiled,
    # HEAD inference.py:155-164; ``opts.diffusion`` switches the diffusion alone on / off)
    diffusion = params.uses_diffusion and want("diffusion", big)
    if diffusion:
        while ltile > 32 and estimate_stage_bytes("diffusion", ltile * ltile, dtype_bytes=dtype_bytes) > free:
            ltile -= 16
            lstride = min(lstride, ltile)
        if ltile != opts.latent_tile:
            notes.append(f"latent tile reduced to {ltile} to fit the budget")
    return TilingPlan(
        cleaner=cleaner,
        cleaner_tile=ctile,
        cleaner_overlap=int(opts.cleaner_overlap),
        vae_encoder=enc,
        vae_decoder=dec,
        diffusion=diffusion,
        latent_tile=ltile,
        latent_stride=lstride,
        budget_gb=round(budget / gib, 3),
        weights_gb=round(weights_bytes / gib, 3),
        estimates_gb={k: round(v, 3) for k, v in est.items()},
        notes=tuple(notes),
    )

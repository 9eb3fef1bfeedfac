"""Tiling for large images, one file per stage: windows, cleaner, vae_blend, vae_sync, denoiser, plan.

windows: tile windows, Gaussian weights, the blend loop, progress events; cleaner: stage 1 tile by tile;
vae_blend: the official Gaussian-blend tiled VAE; vae_sync: the seam-free VAE (shared GroupNorm statistics);
denoiser: the tiled model placed under `diffusion.cfg.CFGDenoiser`; plan: the memory model and `auto_tiling`.
The VAE runner that picks a VAE tiling is `models.vae_runner`; speed options are `diffbir_core.speed`.

The public names of these submodules are exported lazily (module ``__getattr__``): importing the package imports
nothing, so `models.vae_runner` (uses windows / vae_blend / vae_sync) and `plan` (uses
`models.vae_runner.VAETiling`) do not form an import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("windows", "cleaner", "vae_blend", "vae_sync", "denoiser", "plan")
_EXPORTS = {
    ".windows": (
        "Window",
        "Progress",
        "sliding_windows",
        "rect_windows",
        "gaussian_weights",
        "blend_tiles",
        "TileEvent",
        "StopTiles",
    ),
    ".cleaner": ("tiled_net", "TiledCleaner"),
    ".vae_blend": (
        "vae_posterior_tiled",
        "vae_encode_tiled",
        "vae_decode_tiled",
        "posterior_to_latent",
        "check_vae_image",
    ),
    ".vae_sync": ("VAEOp", "encoder_ops", "decoder_ops", "synced_cost", "vae_posterior_synced", "vae_decode_synced"),
    ".denoiser": ("TiledModel", "crop_cond"),
    ".plan": (
        "STAGE_BYTES_PER_PIXEL",
        "STAGE_OVERHEAD",
        "RUNTIME_BYTES_CPU",
        "estimate_stage_bytes",
        "model_bytes",
        "memory_budget_bytes",
        "TilingPlan",
        "auto_tiling",
    ),
}

_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name], __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*_HOME, *_SUBMODULES])

"""diffbir_core: a compact reimplementation of DiffBIR (arXiv 2308.15070).

Layers (each imports only those below it): `cli` -> `api` (restore) -> `face.pipeline` -> `pipeline` ->
`stage2` -> `diffusion/`, `tiling`, `models/` -> `config`, `types`, `weights`, `imageio`.
Importing this package does nothing heavy: the names below are loaded on first use (module ``__getattr__``).
Entry points: ``python -m diffbir_core`` (restore images), ``python -m diffbir_core.train``.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {"DiffBIRPipeline": "pipeline", "RestoreParams": "config", "PRESETS": "config", "restore": "api"}
__all__ = ["DiffBIRPipeline", "RestoreParams", "PRESETS", "restore", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

"""diffbir_core: a compact reimplementation of DiffBIR (arXiv 2308.15070).

Layers (each imports only those below it): `cli` -> `api` (restore) -> `face.pipeline` -> `pipeline` ->
`stage2` -> `diffusion/`, `tiling`, `models/` -> `config`, `types`, `weights`, `imageio`.
Importing this package does nothing heavy: the names below are loaded on first use (module ``__getattr__``).
One line: ``diffbir_core.from_pretrained("v2.1")(image, steps=20)`` -> PIL image (faces too; `api.Restorer`), or
``DiffBIRPipeline.from_pretrained("v2.1")(image)`` (general tasks). Entry points: ``python -m diffbir_core``
(``diffbir-restore``), ``python -m diffbir_core.weights_cli`` (``diffbir-weights``), ``python -m diffbir_core.train``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "DiffBIRPipeline": "pipeline",
    "RestoreParams": "config",
    "PRESETS": "config",
    "restore": "api",
    "from_pretrained": "api",
    "Restorer": "api",
    "as_loaded_image": "imageio",
}
__all__ = [
    "DiffBIRPipeline",
    "RestoreParams",
    "PRESETS",
    "restore",
    "from_pretrained",
    "Restorer",
    "as_loaded_image",
    "__version__",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

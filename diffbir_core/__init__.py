"""diffbir_core: a compact reimplementation of DiffBIR (arXiv 2308.15070).

Importing this package does nothing heavy: models load only when asked for.
Entry points: ``python -m diffbir_core.restore`` (restore images), ``python -m diffbir_core.train``.
"""

__version__ = "0.1.0"

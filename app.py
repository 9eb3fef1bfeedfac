"""Hugging Face Space entry point (``app_file: app.py`` in the root README.md front matter).

Serves the DiffBIR Gradio demo: ``python app.py [flags]`` is ``python diffbir_demo/app.py [flags]``
(`diffbir_demo.app.main`). Importing this file does nothing; running it imports ``spaces`` first when installed
(ZeroGPU requires it before torch initialises CUDA), then builds and launches the app.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from diffbir_demo.app import main as demo_main

    return demo_main(argv)


if __name__ == "__main__":
    sys.exit(main())

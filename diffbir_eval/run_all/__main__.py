"""``python -m diffbir_eval.run_all --data DATA [...]``: the CLI of `diffbir_eval.run_all` (see the package doc)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import estimate, plan, run_jobs, write_reports

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffbir_eval.run_all", description="Every preset over every registered set, then every table."
    )
    p.add_argument("--data", required=True, help="folder with one sub-folder per registered set")
    p.add_argument("--results", default="results")
    p.add_argument("--weights-dir", help="model weights ($DIFFBIR_WEIGHTS_DIR)")
    p.add_argument("--metric-weights", help="metric weight files ($DIFFBIR_METRIC_WEIGHTS)")
    p.add_argument("--gpus", type=int, default=1, help="processes for accelerate launch (1: plain python)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--presets", help="comma-separated (default: every preset of diffbir_core.config.PRESETS)")
    p.add_argument("--sets", help="comma-separated registry names (default: all)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of each set")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dry-run", action="store_true", help="print the commands only")
    g.add_argument("--estimate", action="store_true", help="print the expected time only (an estimate)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.presets:
        presets = [s for s in args.presets.split(",") if s]
    else:
        from diffbir_core.config import PRESETS

        presets = list(PRESETS)
    data, results = Path(args.data), Path(args.results)
    sets = [s for s in args.sets.split(",") if s] if args.sets else None
    jobs, skipped = plan(
        data, results, presets, sets, verify=not args.no_verify and not args.estimate, present_only=not args.estimate
    )
    how = dict(gpus=args.gpus, device=args.device, weights_dir=args.weights_dir, metric_weights=args.metric_weights)
    if args.estimate:
        print(estimate(jobs, data, results, max(1, args.gpus)))
    elif args.dry_run:
        for j in jobs:
            print(shlex.join(j.argv(**how)))
    else:
        skipped.update(run_jobs(jobs, **how))
        write_reports(results)
    for what, why in skipped.items():
        print(f"[run_all] skipped {what}: {why}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m diffbir_eval.report [--results DIR] [--out FILE] [--no-plots]``: the CLI of `diffbir_eval.report`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import write_report

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffbir_eval.report",
        description="Gather evaluation runs into one Markdown report (RESULTS/README.md).",
    )
    p.add_argument("--results", default="results", help="folder of run folders (default: results)")
    p.add_argument("--out", help="Markdown file (default: RESULTS/README.md); its diffbir_eval.table blocks are kept")
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        print(f"error: {results} is not a folder", file=sys.stderr)
        return 2
    print(f"wrote {write_report(results, args.out, plots=not args.no_plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

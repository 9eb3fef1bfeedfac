"""``python -m diffbir_eval.table NAME [NAME ...] [--results DIR] [--write FILE]``: the CLI of `diffbir_eval.table`.

Prints each table (``all``: every one of `TABLES`; ``metrics``: the metric conventions), or with ``--write FILE``
replaces its ``<!-- diffbir_eval.table:NAME:begin/end -->`` block in FILE. Exit status 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import TABLES, build_table, metrics_block, write_block

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffbir_eval.table", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "name",
        nargs="+",
        help=f"table(s): {', '.join(TABLES)}, 'all', or 'metrics' (the metric conventions of diffbir_eval.metrics)",
    )
    p.add_argument("--results", default="results", help="folder of run folders (default: results)")
    p.add_argument("--write", metavar="FILE", help="write into FILE between the table's markers instead of printing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [t for n in args.name for t in (list(TABLES) if n == "all" else [n])]
    results = Path(args.results)
    if not results.is_dir():
        print(f"error: {results} is not a folder", file=sys.stderr)
        return 2
    bad = [n for n in names if n != "metrics" and n not in TABLES]
    if bad:
        print(f"error: unknown table {bad[0]!r}; choose from: {', '.join(TABLES)}, all, metrics", file=sys.stderr)
        return 2
    for n in names:
        if n == "metrics":
            text = metrics_block()
        else:
            text = build_table(n, results, link_base=Path(args.write).parent if args.write else results)
        print(f"wrote {write_block(args.write, n, text)} ({n})" if args.write else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

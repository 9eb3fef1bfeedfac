"""``python -m diffbir_eval.data list|check|fetch|checksum``: the CLI over `diffbir_eval.registry` (package doc)."""

from __future__ import annotations

import argparse
import sys

from ..registry import REGISTRY, DataError, check, checksum_list, fetch, markdown_table, write_checksums

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffbir_eval.data",
        description="Look at, verify and fetch the registered test sets (diffbir_eval.registry).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the registry as a Markdown table")
    for cmd in ("check", "fetch", "checksum"):
        s = sub.add_parser(cmd)
        s.add_argument("name", choices=list(REGISTRY))
        s.add_argument("dir")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "list":
            print(markdown_table())
            return 0
        if args.cmd == "checksum":
            path = write_checksums(REGISTRY[args.name].checksum_file, checksum_list(args.dir))
            print(f"wrote {path}")
            return 0
        rep = check(args.name, args.dir) if args.cmd == "check" else fetch(args.name, args.dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(rep)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())

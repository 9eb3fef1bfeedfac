"""``python -m diffbir_eval.data``: look at, verify and fetch the registered test sets (thin CLI over `diffbir_eval.registry`).

    python -m diffbir_eval.data list                 # every set: source, licence, file count, size, checksums known?
    python -m diffbir_eval.data check NAME DIR       # count, names and sha256 of a local copy
    python -m diffbir_eval.data fetch NAME DIR       # download what can be downloaded directly, verified file by file
    python -m diffbir_eval.data checksum NAME DIR    # (maintainers) rewrite diffbir_eval/assets/checksums/NAME.tsv from DIR

Exit status: 0 fine, 1 check failed, 2 bad arguments / nothing to download / network failure.
"""

from __future__ import annotations

import argparse
import sys

from .registry import REGISTRY, DataError, check, checksum_list, fetch, write_checksums

__all__ = ["main"]


def _list() -> str:
    rows = ["| name | set | files | size | checksums | source | licence |", "|---|---|---|---|---|---|---|"]
    for r in REGISTRY.values():
        size = f"{r.total_bytes / 1e6:.1f} MB" if r.total_bytes is not None else "unknown"
        sums = f"diffbir_eval/assets/checksums/{r.name}.tsv" if r.checksums is not None else "unknown"
        dl = " (fetch: yes)" if r.download and r.checksums is not None else ""
        rows.append(
            f"| `{r.name}` | {r.title} | {r.count if r.count is not None else 'unknown'} ({r.count_source}) | "
            f"{size} | {sums}{dl} | {r.url}; {r.paper} | {r.licence} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffbir_eval.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the registry as a Markdown table")
    for cmd in ("check", "fetch", "checksum"):
        s = sub.add_parser(cmd)
        s.add_argument("name", choices=list(REGISTRY))
        s.add_argument("dir")
    args = p.parse_args(argv)
    try:
        if args.cmd == "list":
            print(_list())
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

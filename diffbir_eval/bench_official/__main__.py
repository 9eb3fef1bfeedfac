"""``python -m diffbir_eval.bench --against-official DIR`` (also ``python -m diffbir_eval.bench_official``): the CLI of
`diffbir_eval.bench_official` (official DiffBIR vs ours in one process, interleaved; package doc)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import CASES, DEFAULT_DEPS, plot, run_against_official, run_roofline, write_report
from .candidates import run_approx, run_candidates

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m diffbir_eval.bench --against-official DIR",
        description="Official DiffBIR vs ours: same weights, one process, interleaved calls.",
    )
    ap.add_argument(
        "--against-official",
        metavar="DIR",
        default=None,
        help="official DiffBIR checkout (HEAD layout), e.g. PATH/TO/DiffBIR (an official checkout)",
    )
    ap.add_argument(
        "--candidates",
        action="store_true",
        help="measure our speed candidates (diffbir_eval.bench_official.candidates)",
    )
    ap.add_argument("--targets", nargs="+", default=None, help="--candidates: cleaner vae_decode step")
    ap.add_argument(
        "--which", nargs="+", default=None, help="--candidates: allocator channels_last compile compile_frozen"
    )
    ap.add_argument(
        "--roofline",
        action="store_true",
        help="count each case's FLOPs (both sides) and this machine's fp32 matmul peak; adds the floor times and "
        "best reachable ratios to --out/official.json and README.md",
    )
    ap.add_argument("--approx", action="store_true", help="opt-in approximate modes (int8, DeepCache) vs exact")
    ap.add_argument("--approx-model", default="fixture", choices=["fixture", "full"])
    ap.add_argument("--candidate-rounds", type=int, default=None, help="--candidates: rounds per candidate")
    ap.add_argument("--name", default=None, help="--candidates: output file stem (default candidates)")
    ap.add_argument("--deps", default=DEFAULT_DEPS, help="side folder with omegaconf, ftfy, regex")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--restore-rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="sampler steps of the whole restore")
    ap.add_argument("--size", type=int, default=512, help="image side of the step / VAE / restore cases")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-allocator", dest="allocator", action="store_false", help="do not tune glibc malloc around our calls"
    )
    ap.add_argument("--cldm-config", default=None, help="default DIR/configs/inference/cldm.yaml")
    ap.add_argument("--swinir-config", default=None, help="default DIR/configs/inference/swinir.yaml")
    ap.add_argument("--diffusion-config", default=None, help="default DIR/configs/inference/diffusion_v2.1.yaml")
    ap.add_argument("--tmp", default="/tmp/diffbir_bench_official")
    ap.add_argument("--out", default="results/bench/official")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the Markdown + plots from the JSON files already in --out (a cut-short run)",
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.report_only:
        out = Path(args.out)
        for f in sorted(out.glob("*.json")):
            res = json.loads(f.read_text())
            if res.get("kind") in ("official", "candidates"):
                res["name"] = f.stem if res["kind"] == "candidates" else res.get("name", "official")
                write_report(out, res)
                plot(out, res)
                print(f"[bench_official] report from {f}", flush=True)
        return 0
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.approx:
        run_approx(args)
        return 0
    if args.candidates:
        run_candidates(args)
        return 0
    if not args.against_official:
        ap.error("give --against-official DIR (or --candidates)")
    if args.roofline:
        run_roofline(args)
        return 0
    run_against_official(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line of the trainer: ``python -m diffbir_core.train stage1|stage2 --config f.toml [--field value]``.

Every `TrainConfig` field is a flag (``--max-steps 5000``; JSON objects for mappings, ``none`` for empty);
``--preset`` starts from a named preset of `TRAIN_PRESETS` (preset < file < flags).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import fields

from diffbir_core.train.config import STAGES, TRAIN_PRESETS, TrainConfig, load_config
from diffbir_core.train.loop import train

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffbir_core.train",
        description="Train DiffBIR stage 1 (SwinIR cleaner) or stage 2 (control branch).",
    )
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", help="TOML or JSON file of TrainConfig field values (may set 'preset')")
    p.add_argument("--preset", choices=sorted(TRAIN_PRESETS), help="start from a named preset")
    for f in fields(TrainConfig):
        if f.name == "stage":
            continue
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar="VALUE",
            help=f"(TrainConfig.{f.name}; JSON object for mappings, 'none' for empty)",
        )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(TrainConfig)
        if f.name != "stage" and getattr(args, f.name) is not None
    }
    overrides["stage"] = args.stage
    try:
        cfg = load_config(args.config, args.preset, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = train(cfg)
    print(f"done: step {summary['step']}, last loss {summary['last_loss']:.6g}, checkpoint {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

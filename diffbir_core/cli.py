"""Restore CLI: ``python -m diffbir_core INPUT... --output DIR [--preset NAME] ...`` (`main`).

INPUT may be files, folders (their images, sorted) or globs (``**`` does not follow symlinked folders).
Writes one PNG per input named ``<input stem>.png`` (two inputs that would share a name are refused, and so is an
output that is an input), atomically. Existing outputs are skipped unless ``--overwrite`` (one that does not
decode is made again). Exit status 1 when anything failed, 2 for usage errors (missing weights, a bad device,
an unwritable output folder), 130 on Ctrl-C. Batch logic (collection, naming, checks, the loop) is `batch`.
Flags are the flat names of `config.FLAT_NAMES` (``--cfg-scale`` -> ``cfg_scale``), mapped once by
`RestoreParams.from_flat`; every image goes through `api.restore`.

Mirrors: the official HEAD inference.py command line (--task, --upscale, --sampler, --cfg_scale, ...).
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
from pathlib import Path

from . import api, batch
from .batch import collect_inputs
from .config import (
    COLOR_FIXES,
    FACE_BACKENDS,
    FACE_BACKGROUNDS,
    FACE_MASKS,
    FLAT_NAMES,
    PRESETS,
    SAMPLERS,
    TASKS,
    RestoreParams,
)
from .speed import SpeedOptions
from .preset_weights import check_weights
from .weights import TRUSTED_ENV, WeightsError

__all__ = ["main", "collect_inputs", "build_parser", "params_from_args"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m diffbir_core",
                                 description="Restore images with DiffBIR (stage 1 cleaner + optional diffusion).")
    ap.add_argument("inputs", nargs="+", help="image files, folders or globs")
    ap.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    ap.add_argument("--preset", default="offline", choices=list(PRESETS),
                    help="official version to mirror; 'offline' needs no download (default)")
    ap.add_argument("--task", choices=TASKS, default=None, help="sr (default), face, denoise")
    ap.add_argument("--upscale", type=float, default=None, help="output size / input size (preset default)")
    ap.add_argument("--cleaner", default=None, help="override the stage-1 cleaner (see diffbir_core.cleaners)")
    ap.add_argument("--weights-dir", default=None, help="folder holding downloaded checkpoints")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    ap.add_argument("--seed", type=int, default=None, help="random seed (preset default 231; -1 = random)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    ap.add_argument("--trust-checkpoints", action="store_true",
                    help="read checkpoints whose pickle holds non-tensor objects (inert stubs, no code runs); "
                         "same as DIFFBIR_TRUSTED_CHECKPOINTS=1")
    g = ap.add_argument_group("diffusion (stage 2)")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--sampler", choices=SAMPLERS, default=None)
    g.add_argument("--cfg-scale", type=float, default=None)
    g.add_argument("--rescale-cfg", action="store_true", default=None)
    g.add_argument("--pos-prompt", default=None)
    g.add_argument("--neg-prompt", default=None)
    g.add_argument("--strength", type=float, default=None, help="control strength (default 1)")
    g.add_argument("--better-start", action="store_true", default=None)
    g.add_argument("--color-fix", choices=COLOR_FIXES, default=None)
    g.add_argument("--guidance-scale", type=float, default=None, help="latent image guidance s (0 = off)")
    g.add_argument("--guidance-space", choices=["latent", "rgb"], default=None)
    g.add_argument("--guidance-loss", choices=["mse", "wmse"], default=None)
    g.add_argument("--guidance-repeat", type=int, default=None)
    g.add_argument("--guidance-start", type=int, default=None, help="t_start (default 1001)")
    g.add_argument("--guidance-stop", type=int, default=None, help="t_stop (default -1)")
    g.add_argument("--guidance-rule", choices=["v1", "v2"], default=None)
    f = ap.add_argument_group("faces")
    which = f.add_mutually_exclusive_group()
    which.add_argument("--aligned", action="store_true", default=None, help="inputs are aligned 512x512 face crops")
    which.add_argument("--whole-photo", action="store_true", help="inputs are whole photos (detect faces)")
    f.add_argument("--only-center-face", action="store_true", default=None)
    f.add_argument("--max-faces", type=int, default=None)
    f.add_argument("--face-backend", choices=FACE_BACKENDS, default=None)
    f.add_argument("--background", choices=FACE_BACKGROUNDS, default=None,
                   help="how whole-photo mode restores the background (default: the preset's general path)")
    f.add_argument("--face-mask", choices=FACE_MASKS, default=None,
                   help="paste-back mask (parsing needs facexlib's ParseNet weights; falls back to feather)")
    t = ap.add_argument_group("tiling / memory")
    on_off = t.add_mutually_exclusive_group()
    on_off.add_argument("--tiled", action="store_true", default=None, help="force tiling on")
    on_off.add_argument("--no-tiled", action="store_true", help="force tiling off")
    t.add_argument("--tile-size", type=int, default=None, help="cleaner tile size in pixels")
    t.add_argument("--latent-tile", type=int, default=None, help="diffusion tile size in latent pixels")
    t.add_argument("--latent-stride", type=int, default=None)
    t.add_argument("--max-memory", type=float, default=None, help="memory budget in GB (chooses tiling)")
    t.add_argument("--precision", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="GPU only: half precision for stage 2 (fp32 is the CPU default and only choice)")
    t.add_argument("--attention", choices=["sdpa", "math"], default="sdpa", help="attention kernel (default sdpa)")
    t.add_argument("--compile", action="store_true", help="torch.compile the UNet and control branch")
    t.add_argument("--offload", choices=["none", "model", "sequential"], default="none",
                   help="CUDA only: keep weights on the CPU until used (model) or stream layer by layer (sequential)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return ap


def params_from_args(args: argparse.Namespace) -> RestoreParams:
    """Parsed CLI arguments -> validated `RestoreParams` (preset defaults + the flags given), via `from_flat`."""
    values = {name: getattr(args, name) for name in FLAT_NAMES if hasattr(args, name)}
    if args.whole_photo:
        values["aligned"] = False
    if args.no_tiled:
        values["tiled"] = False
    return RestoreParams.from_flat({"preset": args.preset, **values})


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 ok, 1 something failed, 2 usage error, 130 interrupted (Ctrl-C; no partial file is left)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): stopped; finished outputs are kept, no partial file is left", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.trust_checkpoints:
        os.environ[TRUSTED_ENV] = "1"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.device = batch.check_device(args.device)
        params = params_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.output).expanduser()
    notices: list[str] = []
    files, problems = collect_inputs(args.inputs, exclude=out_dir, notices=notices)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    for n in notices:
        print(f"note: {n}", file=sys.stderr)
    if not files:
        print("error: no input images found", file=sys.stderr)
        return 2
    try:
        speed = SpeedOptions(attention=args.attention, dtype=args.precision, compile=args.compile,
                             offload=args.offload).validate(params.device)
        batch.check_output_dir(out_dir)  # before any model loads: a file, unwritable, read-only ...
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = batch.plan_outputs(files, out_dir)
    try:  # every file the preset needs for this task, before any model loads: ONE error naming all missing
        check_weights(params, weights_dir=args.weights_dir)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pipe = api.make_pipeline(weights_dir=args.weights_dir, device=params.device, speed=speed)

    def restore_one(img, callback=None):
        return api.restore(img, params, pipe=pipe, callback=callback)

    try:
        summary = batch.run_batch(plan, restore_one, overwrite=args.overwrite, quiet=args.quiet,
                                  desc=f"restore [{params.preset}]", fatal=(WeightsError,),
                                  steps=params.steps if params.uses_diffusion else None)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.interrupted:
        print(f"interrupted (Ctrl-C) after restoring {summary.done} of {summary.total} image(s); finished outputs "
              "are kept, no partial file is left", file=sys.stderr)
        return 130
    print(summary.line())
    return summary.exit_code or (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main())

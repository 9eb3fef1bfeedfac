"""Evaluation runner: restore a test set with a method, score every image, keep every row as it goes.

    python -m diffbir_eval.run --dataset realsrset --root DATA --method bicubic --metrics niqe --out results/RUN
    accelerate launch --multi_gpu --num_processes 2 -m diffbir_eval.run ...   # data parallel: GPUs, or CPU processes
                                                                        # (gloo) where there is no GPU

METHOD: see `diffbir_eval.methods`. The loop (resumable: rerun the same command after Ctrl-C / kill) is
`diffbir_eval.loop.run_eval`, the rows and the ``run.json`` pinning are `diffbir_eval.store`, the tables
`diffbir_eval.summary`.
At the end (main process): ``metrics.csv`` (one row per image), ``summary.json`` (means, std, FID,
versions, parameters, seed, git commit), ``README.md`` (Markdown tables) and ``plots/``. ``--finalize``
writes these from the rows present without restoring anything (for a run that was stopped).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

import torch

from diffbir_core.batch import describe_os_error

from .datasets import DatasetError, open_dataset, validate
from .loop import process_state, resolve_fid_reference, resolve_run_files, run_eval
from .metrics import METRIC_FILES, MetricWeightsError, parse_metrics
from .store import RunConfigError, RunOptions, check_config, check_out_dir, run_config
from .summary import finalize

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffbir_eval.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        required=True,
        help="realsrset|real47|set5|celeba_test|lfw_test|celebchild_test|wider_test, folder:LQ[:GT], "
        "or synthetic:HQ[:PRESET[:SEED]]",
    )
    p.add_argument("--root", help="folder holding the named dataset")
    p.add_argument("--method", required=True, help="bicubic, a cleaner name, a preset name, or outputs:DIR")
    p.add_argument("--metrics", help="comma-separated (default: the dataset's usual metrics)")
    p.add_argument("--out", required=True, help="run folder, e.g. results/realsrset_bicubic")
    p.add_argument("--scale", type=float, help="output size / LQ size (default: the dataset's)")
    p.add_argument(
        "--crop-border",
        type=int,
        help="pixels cropped at each border for PSNR/SSIM/NIQE (default: the dataset's, e.g. 4 for Set5 x4)",
    )
    p.add_argument("--seed", type=int, default=231, help="seed of the restoration method (presets)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--weights-dir", help="model weights folder for cleaners / presets ($DIFFBIR_WEIGHTS_DIR)")
    p.add_argument("--metric-weights", help="folder holding metric weight files ($DIFFBIR_METRIC_WEIGHTS)")
    p.add_argument(
        "--weight",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="explicit metric file, e.g. lpips_alexnet=/x/alexnet-owt-7be5be79.pth (repeatable)",
    )
    p.add_argument("--fid-ref", help="FID reference: a folder of images, a .npz with mu/sigma, or fid_ffhq512")
    p.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    p.add_argument(
        "--lq-downscale",
        type=float,
        default=1.0,
        metavar="F",
        help="shrink the LQ by F (bicubic, antialiased) and restore with F x the scale; a speed knob "
        "for x4 networks on same-size tasks (faces), recorded in summary.json",
    )
    p.add_argument("--save-images", action="store_true", help="also keep the restored images in OUT/images")
    p.add_argument(
        "--allow-count-mismatch",
        action="store_true",
        help="evaluate a named dataset even if it does not have the published number of images",
    )
    p.add_argument(
        "--finalize",
        action="store_true",
        help="only write metrics.csv / summary / tables from the rows present (no restoration)",
    )
    p.add_argument("--quiet", action="store_true")
    return p


def _device(arg: str, state) -> str:
    if arg != "auto":
        return arg
    if getattr(state, "num_processes", 1) > 1 and hasattr(state, "device"):
        return str(state.device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def _terminate(signum, frame):  # a plain `kill` ends the run like Ctrl-C: finished rows are already on disk
        raise KeyboardInterrupt

    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (e.g. called from a notebook worker)
        pass
    try:
        return _main(args, argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    weight_paths = {}
    for w in args.weight:
        if "=" not in w or w.split("=", 1)[0] not in METRIC_FILES:
            print(f"error: --weight {w!r}: use NAME=PATH with NAME one of {', '.join(METRIC_FILES)}", file=sys.stderr)
            return 2
        k, v = w.split("=", 1)
        weight_paths[k] = v
    try:
        ds = validate(
            open_dataset(args.dataset, root=args.root, scale=args.scale, allow_count_mismatch=args.allow_count_mismatch)
        )
        metrics = parse_metrics(args.metrics) if args.metrics else list(ds.spec.default_metrics)
        state = process_state()
        opts = RunOptions(
            metrics=metrics,
            crop_border=ds.spec.crop_border if args.crop_border is None else args.crop_border,
            device=_device(args.device, state),
            weights_dir=args.weights_dir,
            metric_weights=args.metric_weights,
            weight_paths=weight_paths,
            fid_ref=args.fid_ref,
            limit=args.limit,
            save_images=args.save_images,
            seed=args.seed,
            verbose=not args.quiet,
            lq_downscale=args.lq_downscale,
            command="python -m diffbir_eval.run " + " ".join(sys.argv[1:] if argv is None else argv),
        )
        if args.finalize:
            if not (Path(args.out) / "run.json").is_file():
                raise RunConfigError(f"--finalize: {args.out} holds no run")
            check_out_dir(args.out)
            check_config(Path(args.out), run_config(ds, args.method, opts))
            fid_ref = resolve_fid_reference(ds, opts, resolve_run_files(ds, opts)) if "fid" in metrics else None
            summary = finalize(ds, args.method, args.out, opts, fid_ref=fid_ref)
        else:
            summary = run_eval(ds, args.method, args.out, opts, state=state)
    except (DatasetError, RunConfigError, MetricWeightsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up while writing: one line, the finished rows stay
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(
            f"error: cannot write the run{where}: {describe_os_error(e)}; finished rows are kept in {args.out}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished rows are kept in {args.out}; rerun the same command to resume "
            "(or add --finalize to write the tables from what is there)",
            file=sys.stderr,
        )
        return 130
    if summary is not None and not args.quiet:
        print((Path(args.out) / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

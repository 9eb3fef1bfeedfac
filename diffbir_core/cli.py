"""Restore CLI: ``python -m diffbir_core INPUT... --output DIR [--preset NAME] ...`` (`main`).

INPUT may be files, folders (their images, sorted) or globs (``**`` does not follow symlinked folders).
Writes one PNG per input named ``<input stem>.png`` (two inputs that would share a name are refused, and so is an
output that is an input), atomically. Existing outputs are skipped unless ``--overwrite`` (one that does not
decode is made again). Exit status 1 when anything failed, 2 for usage errors (missing weights, a bad device,
an unwritable output folder), 130 on Ctrl-C. Batch logic (collection, naming, checks, the loop) is `batch`.
Flags are the flat names of `config.FLAT_NAMES` (``--cfg-scale`` -> ``cfg_scale``), mapped once by
`RestoreParams.from_flat`; every image goes through `api.restore`.

Mirrors: the official HEAD inference.py command line (inference.py:55-287): every flag also takes its underscore
spelling and the official names (--input, --version, --start_point_type, --cldm_tile_size in pixels, --n_samples).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from . import api, batch
from .batch import collect_inputs
from .captioner import CAPTIONERS, DEFAULT_LLAVA_BIT, LLAVA_BITS, make_captioner
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
    TileOptions,
)
from .preset_weights import check_weights
from .prompts import DEFAULT_NEG_PROMPT, DEFAULT_POS_PROMPT
from .speed import SpeedOptions
from .weights import TRUSTED_ENV, WeightsError

__all__ = ["main", "collect_inputs", "build_parser", "params_from_args"]


# official HEAD inference.py names (underscores) that are not our flag name with dashes -> our flag
_OFFICIAL_ALIASES = {
    "--start-point": ["--start_point_type", "--start-point-type"],
    "--guidance-scale": ["--g_scale"],
    "--guidance-loss": ["--g_loss"],
    "--guidance-space": ["--g_space"],
    "--guidance-start": ["--g_start"],
    "--guidance-stop": ["--g_stop"],
    "--guidance-repeat": ["--g_repeat"],
    "--tile-size": ["--cleaner_tile_size", "--cleaner-tile-size"],
    "--inputs": ["--input"],
}
# the glue of HEAD inference.py's argparse defaults (inference.py:55-287), applied under `--version` (an official
# command line) to what the command does not set; `--preset` keeps each preset's own (README "Presets")
HEAD_CLI_DEFAULTS = {
    "sampler": "edm_dpm++_3m_sde",
    "steps": 10,
    "cfg_scale": 6.0,
    "pos_prompt": DEFAULT_POS_PROMPT,
    "neg_prompt": DEFAULT_NEG_PROMPT,
    "upscale": 4.0,
    "strength": 1.0,
    "start_point": "noise",
    "noise_aug": 0,
    "seed": 231,
}
VERSIONS = ("v1", "v2", "v2.1", "custom")  # HEAD --version


def _add(group, flag: str, *more: str, **kw) -> argparse.Action:
    """``group.add_argument`` with the official underscore spelling (``--cfg_scale`` for ``--cfg-scale``) and the
    official aliases of `_OFFICIAL_ALIASES` accepted too, so an official command line runs unchanged."""
    names = [flag, *more]
    under = flag.replace("-", "_")
    if flag.startswith("--") and "-" in flag[2:] and under != flag:
        names.append("--" + flag[2:].replace("-", "_"))
    names += [n for n in _OFFICIAL_ALIASES.get(flag, []) if n not in names]
    return group.add_argument(*names, **kw)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m diffbir_core",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Restore images with DiffBIR (stage 1 cleaner + optional diffusion). A default of None means "
        "the preset's value (see the README's Presets table). Every flag also takes the official "
        "underscore spelling (--cfg_scale, --pos_prompt, --start_point_type, --cldm_tiled, ...), so an "
        "official HEAD `python inference.py ...` command line runs unchanged.",
    )
    ap.add_argument("inputs", nargs="*", help="image files, folders or globs")
    _add(
        ap,
        "--inputs",
        dest="input_flag",
        action="append",
        default=None,
        metavar="INPUT",
        help="an input file or folder (the official --input; repeatable)",
    )
    ap.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    ap.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help="a named configuration (README: Presets); default offline (needs no download)",
    )
    ap.add_argument(
        "--version",
        default=None,
        choices=VERSIONS,
        help="official HEAD --version: v1 -> v1-general / v1-face (by --task), v2, v2.1, custom "
        "(--ckpt / --sd-ckpt / --cleaner-ckpt files), with HEAD inference.py's defaults for what "
        "the command line leaves out (edm_dpm++_3m_sde, 10 steps, cfg 6, HEAD prompts)",
    )
    _add(
        ap,
        "--task",
        choices=[*TASKS, "unaligned_face"],
        default=None,
        help="sr, face, denoise; unaligned_face = face on whole photos (official name)",
    )
    _add(ap, "--upscale", type=float, default=None, help="output size / input size")
    _add(ap, "--cleaner", default=None, help="override the stage-1 cleaner (see diffbir_core.cleaners)")
    _add(ap, "--weights-dir", default=None, help="folder holding downloaded checkpoints")
    _add(
        ap, "--device", default="auto", help="auto (CUDA, then MPS, then CPU, with a notice), cpu, cuda, cuda:N or mps"
    )
    _add(ap, "--seed", type=int, default=None, help="random seed (presets: 231; -1 = random)")
    _add(
        ap,
        "--n-samples",
        type=int,
        default=1,
        help="outputs per input (official --n_samples): <stem>_0.png ... when > 1, each with seed + i",
    )
    _add(
        ap,
        "--batch-size",
        type=int,
        default=1,
        help="accepted for official command lines; samples run one at a time (same memory as batch 1)",
    )
    _add(ap, "--overwrite", action="store_true", help="replace existing outputs")
    _add(
        ap,
        "--trust-checkpoints",
        action="store_true",
        help="read checkpoints whose pickle holds non-tensor objects (inert stubs, no code runs); "
        "same as DIFFBIR_TRUSTED_CHECKPOINTS=1",
    )
    c = ap.add_argument_group("custom weights (--version custom)")
    _add(
        c,
        "--ckpt",
        "--control-ckpt",
        dest="control_ckpt",
        default=None,
        help="control (ControlNet) checkpoint file (official --ckpt)",
    )
    _add(c, "--sd-ckpt", default=None, help="Stable Diffusion 2.1 checkpoint file (HEAD: train_cfg train.sd_path)")
    _add(
        c,
        "--cleaner-ckpt",
        dest="cleaner_path",
        default=None,
        help="stage-1 weight file for the cleaner architecture (--cleaner; custom: SwinIR general, HEAD "
        "train.swinir_path)",
    )
    _add(c, "--train-cfg", default=None, help="official --train_cfg: not read (give the files above instead)")
    cap = ap.add_argument_group("captioner (caption + ', ' + positive prompt, HEAD loop.py:165-169)")
    _add(
        cap,
        "--captioner",
        choices=["auto", *CAPTIONERS],
        default="auto",
        help="describes the raw input image: auto = llava on CUDA (the official default), none elsewhere",
    )
    _add(cap, "--llava-bit", choices=list(LLAVA_BITS), default=DEFAULT_LLAVA_BIT, help="LLaVA weights: 16, 8 or 4 bit")
    g = ap.add_argument_group("diffusion (stage 2)")
    _add(g, "--steps", type=int, default=None)
    _add(g, "--sampler", choices=SAMPLERS, default=None, help="any official HEAD --sampler")
    _add(g, "--cfg-scale", type=float, default=None)
    _add(g, "--rescale-cfg", action="store_true", default=None)
    _add(g, "--pos-prompt", default=None, help="positive prompt (longer than 77 tokens: cut, as official)")
    _add(g, "--neg-prompt", default=None)
    _add(g, "--strength", type=float, default=None, help="control strength (presets: 1)")
    _add(g, "--better-start", action="store_true", default=None, help="v2.0.0 low-frequency start point")
    _add(
        g,
        "--start-point",
        choices=["noise", "cond"],
        default=None,
        help="noise, or cond = c_img diffused to t = T-1 (official --start_point_type)",
    )
    _add(g, "--noise-aug", type=int, default=None, help="diffuse c_img to this t (0 = off; official --noise_aug)")
    _add(g, "--s-churn", type=float, default=None, help="EDM euler/heun/dpm_2 churn (official default 0)")
    _add(g, "--s-tmin", type=float, default=None, help="churn range min sigma (official default 0)")
    _add(g, "--s-tmax", type=float, default=None, help="churn range max sigma (official default 300)")
    _add(g, "--s-noise", type=float, default=None, help="EDM noise scale (official default 1)")
    _add(g, "--eta", type=float, default=None, help="EDM ancestral / SDE eta (official default 1; ddim uses 0)")
    _add(g, "--order", type=int, default=None, help="edm_lms order (official default 1)")
    _add(
        g,
        "--sde-noise",
        choices=["torch", "brownian"],
        default=None,
        help="SDE samplers' noise: torch draws (default) or the official torchsde Brownian tree (brownian: "
        "reproduces official SDE runs seed for seed)",
    )
    _add(
        g,
        "--edm-sigma-max",
        choices=["clamp", "official"],
        default=None,
        help="EDM samplers: clamp abar_{T-1} at 1e-8 (default) or overwrite it with 1e-8 like HEAD "
        "(identical for v2.1; the overwrite breaks eps schedules, README: official behaviour)",
    )
    _add(
        g,
        "--pre-resize",
        choices=["pil", "torch"],
        default=None,
        help="x1 cleaners: PIL-bicubic the 8-bit input by --upscale first as HEAD (default), or not",
    )
    _add(g, "--color-fix", choices=COLOR_FIXES, default=None)
    _add(
        g,
        "--guidance",
        action="store_true",
        help="official flag (HEAD crashes with it, README): guidance runs whenever --guidance-scale > 0",
    )
    _add(g, "--guidance-scale", type=float, default=None, help="latent image guidance s (0 = off)")
    _add(g, "--guidance-space", choices=["latent", "rgb"], default=None)
    _add(g, "--guidance-loss", choices=["mse", "wmse", "w_mse"], default=None, help="w_mse = wmse (official name)")
    _add(g, "--guidance-repeat", type=int, default=None)
    _add(g, "--guidance-start", type=int, default=None, help="t_start (presets: 1001)")
    _add(g, "--guidance-stop", type=int, default=None, help="t_stop (presets: -1)")
    _add(g, "--guidance-rule", choices=["v1", "v2"], default=None)
    f = ap.add_argument_group("faces")
    which = f.add_mutually_exclusive_group()
    _add(which, "--aligned", action="store_true", default=None, help="inputs are aligned 512x512 face crops")
    _add(which, "--whole-photo", action="store_true", help="inputs are whole photos (detect faces)")
    _add(f, "--only-center-face", action="store_true", default=None)
    _add(f, "--max-faces", type=int, default=None)
    _add(f, "--face-backend", choices=FACE_BACKENDS, default=None)
    _add(
        f,
        "--background",
        choices=FACE_BACKGROUNDS,
        default=None,
        help="how whole-photo mode restores the background (default: the preset's general path)",
    )
    _add(
        f,
        "--face-mask",
        choices=FACE_MASKS,
        default=None,
        help="paste-back mask (parsing needs facexlib's ParseNet weights; falls back to feather)",
    )
    t = ap.add_argument_group("tiling / memory (default: tiled only where the memory budget requires it)")
    on_off = t.add_mutually_exclusive_group()
    _add(on_off, "--tiled", action="store_true", default=None, help="force tiling on for every stage")
    _add(on_off, "--no-tiled", action="store_true", help="force tiling off")
    _add(t, "--cleaner-tiled", action="store_true", default=None, help="tile the stage-1 cleaner")
    _add(t, "--tile-size", type=int, default=None, help="cleaner tile size in pixels (official 512)")
    _add(t, "--tile-overlap", type=int, default=None, help="cleaner tile overlap in pixels (32)")
    _add(
        t,
        "--cleaner-tile-stride",
        type=int,
        default=None,
        help="cleaner stride in pixels (official 256): overlap = size - stride",
    )
    _add(t, "--vae-encoder-tiled", action="store_true", default=None, help="tile the VAE encoder (seam-free)")
    _add(t, "--vae-encoder-tile-size", type=int, default=None, help="VAE encoder tile in pixels (official 256)")
    _add(t, "--vae-decoder-tiled", action="store_true", default=None, help="tile the VAE decoder (seam-free)")
    _add(t, "--vae-decoder-tile-size", type=int, default=None, help="VAE decoder tile in pixels (official 256)")
    _add(
        t,
        "--cldm-tiled",
        "--tiled-diffusion",
        action="store_true",
        default=None,
        help="tile the diffusion (official --cldm_tiled)",
    )
    _add(t, "--cldm-tile-size", type=int, default=None, help="diffusion tile in pixels (official 512 = latent 64)")
    _add(t, "--cldm-tile-stride", type=int, default=None, help="diffusion stride in pixels (official 256)")
    _add(t, "--latent-tile", type=int, default=None, help="diffusion tile size in latent pixels (= size / 8)")
    _add(t, "--latent-stride", type=int, default=None, help="diffusion stride in latent pixels (= stride / 8)")
    _add(t, "--max-memory", type=float, default=None, help="memory budget in GB (chooses tiling)")
    _add(
        t,
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16"],
        default="auto",
        help="stage 2 autocast: auto = fp16 on CUDA (the official default), fp32 elsewhere",
    )
    _add(t, "--attention", choices=["sdpa", "math"], default="sdpa", help="attention kernel")
    _add(t, "--compile", action="store_true", help="torch.compile the UNet and control branch")
    _add(
        t,
        "--int8",
        action="store_true",
        help="APPROXIMATE (changes the output; measured on random weights only): int8 dynamic quantisation of "
        "the UNet / control linear layers, CPU only",
    )
    _add(
        t,
        "--deepcache",
        type=int,
        default=0,
        metavar="N",
        help="APPROXIMATE (changes the output; measured on random weights only): DeepCache feature reuse, a full "
        "UNet + control step every N model calls (0 = off); not with tiled diffusion",
    )
    _add(
        t,
        "--offload",
        choices=["none", "model", "sequential"],
        default="none",
        help="CUDA only: keep weights on the CPU until used (model) or stream layer by layer (sequential)",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no device notice")
    return ap


_PRECISION = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def precision_for(name: str, device: str) -> str:
    """``--precision`` -> a `SpeedOptions.dtype`: auto = float16 on CUDA (HEAD's fp16 default), float32 elsewhere."""
    if name == "auto":
        return "float16" if str(device).startswith("cuda") else "float32"
    return _PRECISION.get(name, name)


def preset_for(args: argparse.Namespace) -> str:
    """The preset named by ``--preset`` or the official ``--version`` (+ ``--task`` for v1); default offline."""
    from_version = None
    if args.version is not None:
        face = args.task in ("face", "unaligned_face")
        from_version = {"v1": "v1-face" if face else "v1-general", "v2": "v2", "v2.1": "v2.1", "custom": "custom"}[
            args.version
        ]
    if args.preset is not None and from_version is not None and args.preset != from_version:
        raise ValueError(
            f"--preset {args.preset} and --version {args.version} (= preset {from_version}) disagree: give one"
        )
    return args.preset or from_version or "offline"


def inputs_of(args: argparse.Namespace) -> list[str]:
    """Positional inputs plus every ``--input`` (official spelling)."""
    return [*args.inputs, *(args.input_flag or [])]


def params_from_args(args: argparse.Namespace) -> RestoreParams:
    """Parsed CLI arguments -> validated `RestoreParams` (preset defaults + the flags given), via `from_flat`.

    Under ``--version`` (an official command line) HEAD inference.py's defaults fill what the command leaves out."""
    values = {name: getattr(args, name) for name in FLAT_NAMES if hasattr(args, name)}
    values["device"] = batch.check_device(args.device)  # auto -> CUDA, then MPS, then CPU
    preset = preset_for(args)
    if args.version is not None:
        for k, v in HEAD_CLI_DEFAULTS.items():
            if values.get(k) is None:
                values[k] = v
    if args.version is not None and args.task == "face" and not args.whole_photo and values.get("aligned") is None:
        values["aligned"] = True  # HEAD --task face is the aligned-face loop (bfr_loop.py); unaligned_face the other
    if args.task == "unaligned_face":
        values["task"] = "face"
        values["aligned"] = False
    if values.get("guidance_loss") == "w_mse":
        values["guidance_loss"] = "wmse"
    if args.whole_photo:
        values["aligned"] = False
    if args.no_tiled:
        values["tiled"] = False
    if args.cleaner_tile_stride is not None:
        size = args.tile_size if args.tile_size is not None else TileOptions().cleaner_tile
        if not 0 < args.cleaner_tile_stride <= size:
            raise ValueError(f"--cleaner-tile-stride must be in (0, tile size {size}], got {args.cleaner_tile_stride}")
        values["tile_overlap"] = size - args.cleaner_tile_stride
    for px, lat in (("cldm_tile_size", "latent_tile"), ("cldm_tile_stride", "latent_stride")):
        v = getattr(args, px)
        if v is not None:
            if getattr(args, lat) is not None:
                raise ValueError(
                    f"give --{px.replace('_', '-')} (pixels) or --{lat.replace('_', '-')} (latent), not both"
                )
            if v % 8:
                raise ValueError(f"--{px.replace('_', '-')} must be a multiple of 8 pixels, got {v}")
            values[lat] = v // 8
    if args.version == "custom":
        if not args.control_ckpt:
            raise ValueError("--version custom needs --ckpt (the control checkpoint file)")
        if args.train_cfg:
            print(
                "note: --train_cfg is not read (no YAML); the model is SD 2.1 + ControlNet as the official train "
                "config, from --sd-ckpt / --ckpt / --cleaner-ckpt",
                file=sys.stderr,
            )
    elif args.train_cfg or (args.control_ckpt and preset != "custom"):
        raise ValueError("--ckpt / --train-cfg belong to --version custom")
    if args.n_samples < 1:
        raise ValueError(f"--n-samples must be >= 1, got {args.n_samples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    return RestoreParams.from_flat({"preset": preset, **values})


def _merge_summaries(a, b):
    """One summary for the --n-samples passes (counts added, the last pass's stop reasons)."""
    return dataclasses.replace(
        a,
        total=a.total + b.total,
        done=a.done + b.done,
        skipped=a.skipped + b.skipped,
        remade=a.remade + b.remade,
        failed=a.failed + b.failed,
        stopped=b.stopped,
        interrupted=b.interrupted,
        seconds=a.seconds + b.seconds,
    )


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
        asked = args.device
        args.device = batch.check_device(args.device)
        if str(asked).strip().lower() == "auto" and not args.quiet:
            print(f"note: using device {args.device} (--device auto: CUDA, then MPS, then CPU)", file=sys.stderr)
        params = params_from_args(args)
        if not inputs_of(args):
            raise ValueError("no inputs: give image files / folders (or --input FOLDER)")
        # the caption only feeds the diffusion's prompt: none for a stage-1-only preset
        captioner = (
            make_captioner(args.captioner, params.device, llava_bit=args.llava_bit, weights_dir=args.weights_dir)
            if params.uses_diffusion
            else None
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.output).expanduser()
    notices: list[str] = []
    files, problems = collect_inputs(inputs_of(args), exclude=out_dir, notices=notices)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    for n in notices:
        print(f"note: {n}", file=sys.stderr)
    if not files:
        print("error: no input images found", file=sys.stderr)
        return 2
    try:
        speed = SpeedOptions(
            attention=args.attention,
            dtype=precision_for(args.precision, params.device),
            compile=args.compile,
            offload=args.offload,
            int8=args.int8,
            deepcache=args.deepcache,
        ).validate(params.device)
        if speed.approximate:
            print(
                "note: APPROXIMATE mode on (--int8 / --deepcache): the output differs from the exact one",
                file=sys.stderr,
            )
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
    summary = None
    for i in range(args.n_samples):  # official --n_samples names: <stem>_<i>.png (HEAD loop.py:218-224)
        p = params if i == 0 or params.seed is None else params.replace(seed=params.seed + i)  # own seed each
        plan_i = (
            plan
            if args.n_samples == 1
            else dataclasses.replace(
                plan,
                jobs=[(src, dst.with_name(f"{dst.stem}_{i}{dst.suffix}")) for src, dst in plan.jobs],
                refused=plan.refused if i == 0 else [],
            )
        )
        try:

            def restore_one(img, callback=None, p=p):
                return api.restore(img, p, pipe=pipe, callback=callback, captioner=captioner)

            s_i = batch.run_batch(
                plan_i,
                restore_one,
                overwrite=args.overwrite,
                quiet=args.quiet,
                desc=f"restore [{params.preset}]",
                fatal=(WeightsError,),
                steps=params.steps if params.uses_diffusion else None,
            )
        except WeightsError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        summary = s_i if summary is None else _merge_summaries(summary, s_i)
        if s_i.interrupted or s_i.stopped:
            break
    if summary.interrupted:
        print(
            f"interrupted (Ctrl-C) after restoring {summary.done} of {summary.total} image(s); finished outputs "
            "are kept, no partial file is left",
            file=sys.stderr,
        )
        return 130
    print(summary.line())
    return summary.exit_code or (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main())

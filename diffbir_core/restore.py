"""Restore CLI: ``python -m diffbir_core.restore INPUT... --output DIR [--preset NAME] ...``.

INPUT may be files, folders (their images, sorted) or globs. Writes one PNG per input, named after
it (``photo.jpg`` -> ``DIR/photo.png``), skips existing outputs unless ``--overwrite``, shows a
progress bar and prints a one-line summary. Unreadable files are reported and skipped; the exit
status is 1 when anything failed, 2 for usage errors (including missing weights).
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "collect_inputs", "build_parser", "params_from_args"]


def collect_inputs(specs: list[str]) -> tuple[list[Path], list[str]]:
    """Expand files / folders / globs into a sorted, de-duplicated list of image files.

    Returns (files, problems): problems are inputs that matched nothing.
    """
    from .imageio import IMAGE_EXTENSIONS

    files: list[Path] = []
    problems: list[str] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(f"{spec}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                problems.append(f"{spec}: no such file, folder or glob match")
            files.extend(matches)
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique, problems


def build_parser() -> argparse.ArgumentParser:
    from .config import COLOR_FIXES, PRESETS, SAMPLERS, TASKS

    ap = argparse.ArgumentParser(prog="python -m diffbir_core.restore",
                                 description="Restore images with DiffBIR (stage 1 cleaner + optional diffusion).")
    ap.add_argument("inputs", nargs="+", help="image files, folders or globs")
    ap.add_argument("-o", "--output", required=True, help="output folder (created if needed)")
    ap.add_argument("--preset", default="offline", choices=list(PRESETS),
                    help="official version to mirror; 'offline' needs no download (default)")
    ap.add_argument("--task", choices=TASKS, default=None, help="sr (default), face, denoise")
    ap.add_argument("--upscale", type=float, default=None, help="output size / input size (preset default)")
    ap.add_argument("--cleaner", default=None, help="override the stage-1 cleaner (see diffbir_core.cleaners)")
    ap.add_argument("--weights-dir", default=None, help="folder holding downloaded checkpoints")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--seed", type=int, default=None, help="random seed (preset default 231; -1 = random)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g = ap.add_argument_group("diffusion (stage 2)")
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--sampler", choices=SAMPLERS, default=None)
    g.add_argument("--cfg-scale", type=float, default=None)
    g.add_argument("--rescale-cfg", action="store_true", default=None)
    g.add_argument("--pos-prompt", default=None)
    g.add_argument("--neg-prompt", default=None)
    g.add_argument("--strength", type=float, default=None, help="control strength (default 1)")
    g.add_argument("--better-start", action="store_true", default=None)
    g.add_argument("--start-point", choices=["noise", "cond"], default=None,
                   help="HEAD --start_point_type: noise, or cond = c_img diffused to t = T-1")
    g.add_argument("--noise-aug", type=int, default=None, help="HEAD --noise_aug: diffuse c_img to this t (0 = off)")
    g.add_argument("--edm-sigma-max", choices=["clamp", "official"], default=None,
                   help="EDM samplers: clamp abar_{T-1} at 1e-8 (default) or overwrite it with 1e-8 like HEAD "
                        "(official: identical for v2.1, breaks eps schedules)")
    g.add_argument("--pre-resize", choices=["pil", "torch"], default=None,
                   help="x1 cleaners: PIL-bicubic the 8-bit input by --upscale first as HEAD (default), or not")
    g.add_argument("--color-fix", choices=COLOR_FIXES, default=None)
    g.add_argument("--guidance-scale", type=float, default=None, help="latent image guidance s (0 = off)")
    g.add_argument("--guidance-space", choices=["latent", "rgb"], default=None)
    g.add_argument("--guidance-loss", choices=["mse", "wmse"], default=None)
    g.add_argument("--guidance-repeat", type=int, default=None)
    g.add_argument("--guidance-start", type=int, default=None, help="t_start (default 1001)")
    g.add_argument("--guidance-stop", type=int, default=None, help="t_stop (default -1)")
    g.add_argument("--guidance-rule", choices=["v1", "v2"], default=None)
    f = ap.add_argument_group("faces")
    f.add_argument("--aligned", action="store_true", default=None, help="inputs are aligned 512x512 face crops")
    f.add_argument("--whole-photo", action="store_true", help="inputs are whole photos (detect faces)")
    f.add_argument("--only-center-face", action="store_true", default=None)
    f.add_argument("--max-faces", type=int, default=None)
    f.add_argument("--face-backend", choices=["auto", "dlib", "facexlib"], default=None)
    f.add_argument("--background", choices=["general", "offline", "bicubic"], default=None,
                   help="how whole-photo mode restores the background (default: the preset's general path)")
    f.add_argument("--face-mask", choices=["parsing", "feather"], default=None,
                   help="paste-back mask (parsing needs facexlib's ParseNet weights; falls back to feather)")
    t = ap.add_argument_group("tiling / memory")
    t.add_argument("--tiled", action="store_true", default=None, help="force tiling on")
    t.add_argument("--no-tiled", action="store_true", help="force tiling off")
    t.add_argument("--tiled-diffusion", action="store_true", default=None,
                   help="tile the diffusion only, as HEAD --cldm_tiled (latent tiles --latent-tile/--latent-stride)")
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


def params_from_args(args: argparse.Namespace):
    """Turn parsed CLI arguments into a validated `RestoreParams` (preset defaults + explicit flags)."""
    from .config import RestoreParams

    kw: dict = {}
    simple = {"task": "task", "upscale": "upscale", "cleaner": "cleaner", "steps": "steps", "sampler": "sampler",
              "cfg_scale": "cfg_scale", "rescale_cfg": "rescale_cfg", "pos_prompt": "pos_prompt",
              "neg_prompt": "neg_prompt", "strength": "strength", "better_start": "better_start",
              "color_fix": "color_fix", "start_point": "start_point", "noise_aug": "noise_aug",
              "edm_sigma_max": "edm_sigma_max", "pre_resize": "pre_resize",
              "guidance_scale": "guidance__scale", "guidance_space": "guidance__space",
              "guidance_loss": "guidance__loss", "guidance_repeat": "guidance__repeat",
              "guidance_start": "guidance__t_start", "guidance_stop": "guidance__t_stop",
              "guidance_rule": "guidance__rule",
              "only_center_face": "face__only_center_face", "max_faces": "face__max_faces",
              "face_backend": "face__backend", "background": "face__background", "face_mask": "face__mask",
              "tile_size": "tiles__cleaner_tile", "latent_tile": "tiles__latent_tile",
              "latent_stride": "tiles__latent_stride", "max_memory": "tiles__max_memory_gb"}
    for attr, key in simple.items():
        v = getattr(args, attr, None)
        if v is not None:
            kw[key] = v
    if args.seed is not None:
        kw["seed"] = None if args.seed < 0 else args.seed
    if args.aligned:
        kw["face__aligned"] = True
    if args.whole_photo:
        kw["face__aligned"] = False
    if args.tiled:
        kw["tiles__enabled"] = True
    if args.tiled_diffusion:
        kw["tiles__diffusion"] = True
    if args.no_tiled:
        kw["tiles__enabled"] = False
    kw["device"] = args.device
    return RestoreParams.from_preset(args.preset, **kw).validate()


def _output_path(inp: Path, out_dir: Path, used: set[str]) -> Path:
    stem = inp.stem
    name = f"{stem}.png"
    i = 1
    while name in used:  # two inputs with the same stem (a.jpg, a.png) must not overwrite each other
        name = f"{stem}_{inp.suffix.lstrip('.').lower()}{'' if i == 1 else i}.png"
        i += 1
    used.add(name)
    return out_dir / name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .imageio import ImageReadError, read_image, save_image
    from .pipeline import DiffBIRPipeline
    from .weights import WeightsError

    try:
        params = params_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files, problems = collect_inputs(args.inputs)
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    if not files:
        print("error: no input images found", file=sys.stderr)
        return 2
    from .tiling import SpeedOptions

    try:
        speed = SpeedOptions(attention=args.attention, dtype=args.precision, compile=args.compile,
                             offload=args.offload).validate(params.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = DiffBIRPipeline(weights_dir=args.weights_dir, device=params.device, speed=speed)

    from tqdm import tqdm

    done = skipped = 0
    failed: list[str] = []
    used: set[str] = set()
    t0 = time.perf_counter()
    bar = tqdm(files, desc=f"restore [{params.preset}]", unit="img", disable=args.quiet, file=sys.stderr)
    for f in bar:
        out = _output_path(f, out_dir, used)
        if out.exists() and not args.overwrite:
            skipped += 1
            continue
        bar.set_postfix_str(f.name)
        try:
            img = read_image(f)
            res = pipe.restore(img, params)
            save_image(out, res.image, res.alpha)
            for n in res.notices:
                tqdm.write(f"note: {f.name}: {n}", file=sys.stderr)
            done += 1
        except ImageReadError as e:
            tqdm.write(f"skipped: {e}", file=sys.stderr)
            failed.append(str(f))
        except WeightsError as e:
            bar.close()
            print(f"error: {e}", file=sys.stderr)
            return 2
        except (ValueError, RuntimeError) as e:
            tqdm.write(f"failed: {f}: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(str(f))
    bar.close()
    dt = time.perf_counter() - t0
    print(f"restored {done}, skipped {skipped} existing, failed {len(failed)} "
          f"of {len(files)} image(s) in {dt:.1f}s -> {out_dir.resolve()}")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())

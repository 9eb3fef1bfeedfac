"""Stage-2 load time, full size: converting the official layouts (cold) vs reading the cached safetensors (warm).

``python -m experiments.bench_load_time [--keep DIR] [--out results/bench/load_time.json] [--end-to-end]``

Random weights in the OFFICIAL layouts at full size (SD 2.1-base UNet / VAE / OpenCLIP text tower from
`Stage2Config` "sd21_base", and the control branch), written with ``torch.save`` (zip format, like the official
files), one file per part so that making them never holds more than one part in memory. Each measurement runs in
a fresh process (no warm Python caches) and reports wall time and peak RSS:
  cold = what `models.ldm.load_pretrained_control_ldm` did on every start before the cache: ``weights.load_state_dict``
         (memory-mapped ``torch.load``) -> ``convert.pull_official`` key map + shape checks -> strict ``load_into``
         into an empty module (``build_empty``);
  cache write = ``weights.save_safetensors`` of that part (once, on the first start);
  warm = what a later start does: ``build_empty`` + ``weights.load_safetensors_into`` per part (strict, a 256 MiB
         mapping at a time: the body of `load_control_ldm_safetensors`).
``--end-to-end`` also times `load_pretrained_control_ldm` itself twice (first start, second start) in fresh
processes; it needs ~7 GB free RAM (fp32 ControlLDM, 1.65 B parameters), so it is off by default.
The OS page cache is not dropped (the files were just written): times are for files already in RAM when memory
allows, i.e. a lower bound for the first start after a reboot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffbir_core.atomic import atomic_path, write_text

PARTS = ("unet", "vae", "text", "control")


def _builders():
    from diffbir_core.models.ldm import STAGE2_CONFIGS, build_controlnet, build_text, build_unet, build_vae

    cfg = STAGE2_CONFIGS["sd21_base"]
    return cfg, {"unet": build_unet, "vae": build_vae, "text": build_text, "control": build_controlnet}


def _official(part: str, module):
    from diffbir_core.models.convert import SD_PREFIXES, export_control_official, keymap_for, to_official

    if part == "control":
        return export_control_official(module)
    return to_official(module, keymap_for(module, SD_PREFIXES[part]))


def make(tmp: Path) -> dict:
    import torch

    from diffbir_core.models.ldm import build_empty

    cfg, build = _builders()
    sizes = {}
    for part in PARTS:
        m = build_empty(build[part], cfg)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)  # random, finite
        path = tmp / f"{part}.ckpt"
        with atomic_path(path) as t:
            torch.save({"state_dict": _official(part, m)}, t)
        sizes[part] = {"file_bytes": path.stat().st_size, "parameters": sum(p.numel() for p in m.parameters())}
        del m
    return sizes


def cold(part: str, tmp: Path) -> dict:
    import torch

    from diffbir_core.models.convert import SD_PREFIXES, keymap_for, pull_official
    from diffbir_core.models.ldm import build_empty, load_control
    from diffbir_core.weights import load_into, load_state_dict, save_safetensors

    torch.set_num_threads(1)
    cfg, build = _builders()
    t0 = time.perf_counter()
    if part == "control":
        m = load_control(tmp / f"{part}.ckpt", cfg)
    else:
        sd = load_state_dict(tmp / f"{part}.ckpt")
        m = build_empty(build[part], cfg)
        mapped, _ = pull_official(m, sd, keymap_for(m, SD_PREFIXES[part]), what=part)
        load_into(m, mapped, what=part, strict=True)
        del sd, mapped
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    save_safetensors(m.state_dict(), tmp / f"{part}.safetensors")
    return {"cold_s": t_load, "cache_write_s": time.perf_counter() - t1}


def warm(part: str, tmp: Path) -> dict:
    import torch

    from diffbir_core.models.ldm import build_empty
    from diffbir_core.weights import load_safetensors_into

    torch.set_num_threads(1)
    cfg, build = _builders()
    t0 = time.perf_counter()
    m = build_empty(build[part], cfg)
    load_safetensors_into(m, tmp / f"{part}.safetensors", what=part)
    return {"warm_s": time.perf_counter() - t0}


def end_to_end(tmp: Path) -> dict:
    import torch

    from diffbir_core.models.ldm import load_pretrained_control_ldm

    torch.set_num_threads(1)
    sd = tmp / "sd.ckpt"
    if not sd.exists():  # one official-layout SD file (UNet + VAE + text), as v2-1_512-ema-pruned.ckpt
        merged = {}
        for part in ("unet", "vae", "text"):
            merged.update(torch.load(tmp / f"{part}.ckpt", mmap=True, weights_only=True)["state_dict"])
        with atomic_path(sd) as t:
            torch.save({"state_dict": merged}, t)
        del merged
    t0 = time.perf_counter()
    load_pretrained_control_ldm(str(sd), str(tmp / "control.ckpt"), cache_dir=tmp / "cache")
    return {"load_s": time.perf_counter() - t0}


def _preimport() -> float:
    """Import what the builders import lazily (diffusers, open_clip) before the clock starts: on a busy machine that
    alone takes a minute and is paid equally by both paths; it is reported as ``import_s``."""
    t0 = time.perf_counter()
    import diffusers  # noqa: F401
    import open_clip  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401

    from diffbir_core.models import controlnet, ldm, text  # noqa: F401

    return time.perf_counter() - t0


def _child(mode: str, part: str, tmp: Path) -> dict:
    t_import = _preimport() if mode != "make" else 0.0
    fn = {"cold": cold, "warm": warm, "e2e": lambda _p, t: end_to_end(t), "make": lambda _p, t: make(t)}[mode]
    out = fn(part, tmp)
    if mode != "make":
        out[f"{mode}_import_s"] = t_import
    out[f"{mode}_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _wait_for_memory(need: int, max_wait_s: float) -> bool:
    """On a shared machine, start a multi-GB load only when it fits (never push another process into the OOM killer)."""
    t0 = time.time()
    while _mem_available() < need:
        if time.time() - t0 > max_wait_s:
            return False
        time.sleep(5)
    return True


def _run(mode: str, part: str, tmp: Path, need: int = 0, max_wait_s: float = 900) -> dict:
    if need and not _wait_for_memory(need, max_wait_s):
        return {f"{mode}_skipped": f"less than {need / 2**30:.1f} GiB free for {max_wait_s:.0f} s"}
    r = subprocess.run(
        [sys.executable, "-m", "experiments.bench_load_time", "--child", mode, part, str(tmp)],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    if r.returncode != 0:
        raise RuntimeError(f"{mode} {part} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_load_time", description=__doc__.splitlines()[0])
    ap.add_argument("--tmp", default=None, help="scratch folder (needs ~14 GB; default: a temporary folder)")
    ap.add_argument("--out", default="results/bench/load_time.json")
    ap.add_argument("--end-to-end", action="store_true", help="also time load_pretrained_control_ldm (~7 GB RAM)")
    ap.add_argument("--keep", default=None, help="folder for the generated files, kept (and reused) across runs")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "PART", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], Path(args.child[2]))))
        return 0
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        tmp = Path(args.keep) if args.keep else Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        if all((tmp / f"{p}.ckpt").is_file() for p in PARTS):
            sizes = {p: {"file_bytes": (tmp / f"{p}.ckpt").stat().st_size} for p in PARTS}
        else:
            sizes = _run("make", "-", tmp, need=5 << 30)  # in a child: the parent stays small
            sizes.pop("make_peak_rss_gib", None)
        parts = {}
        for part in ("vae", "text", "control", "unet"):  # smallest first
            need = int(sizes[part]["file_bytes"] * 1.25) + (1 << 30)
            parts[part] = {**sizes[part], **_run("cold", part, tmp, need), **_run("warm", part, tmp, need)}
            print(part, json.dumps(parts[part]), flush=True)
        keys = ("cold_s", "cache_write_s", "warm_s", "file_bytes")
        total = {k: sum(p.get(k, 0.0) for p in parts.values()) for k in keys}
        total["complete"] = all(all(k in p for k in keys) for p in parts.values())
        e2e = None
        if args.end_to_end:
            e2e = {"first_start": _run("e2e", "-", tmp, 8 << 30), "second_start": _run("e2e", "-", tmp, 8 << 30)}
    import torch

    res = {
        "what": "full-size stage 2 (SD 2.1-base UNet + VAE + OpenCLIP text + control branch), fp32, random weights in "
        "the official layouts; cold = convert official files, warm = read the cached safetensors",
        "how": "python -m experiments.bench_load_time"
        + (" --end-to-end" if args.end_to_end else "")
        + " (each number from a fresh process after importing diffusers/open_clip, reported as *_import_s; "
        "torch threads 1; page cache not dropped; a shared 2-core machine with other jobs running)",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "parts": parts,
        "total": total,
        "speedup_cold_over_warm": total["cold_s"] / total["warm_s"] if total["complete"] else None,
        "end_to_end": e2e,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(res, indent=1) + "\n")
    print(json.dumps(total), "->", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

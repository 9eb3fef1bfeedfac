"""Evaluation runner: restore a test set with a method, score every image, keep every row as it goes.

    python -m eval.run --dataset realsrset --root DATA --method bicubic --metrics niqe --out results/RUN
    accelerate launch --multi_gpu --num_processes 2 -m eval.run ...   # data parallel: GPUs, or CPU processes
                                                                        # (gloo) where there is no GPU

METHOD is ``bicubic``, a stage-1 cleaner of `diffbir_core.cleaners` (``offline``, ``swinir_face``, ...), a
restore preset of `diffbir_core.config.PRESETS` (``v2``, ``v2.1``, ... through `diffbir_core.pipeline`),
or ``outputs:DIR`` (score another method's results, matched by name). ``cleaner:NAME`` / ``preset:NAME``
pick one where a name is both. The runner only sees ``restore_fn(img) -> img`` (HxWx3 float in [0, 1]).

Steps, per image not yet done:
    1. LQ (read, or synthesised with the dataset's fixed per-image seed) and GT;
    2. restore (timed); output quantised to 8-bit levels - exactly what a saved PNG holds - and its size
       checked against GT (or LQ x scale);
    3. per-image metrics; FID features cached as ``features/fid/NAME.npy``;
    4. one JSON line appended to ``rows[.rankN].jsonl`` and fsync'ed.
An interrupted run (Ctrl-C, kill, crash) keeps every finished row; rerunning the same command skips them
(a half-written last line is ignored) and ends with the same ``metrics.csv`` as an uninterrupted run.
Asking for more metrics later computes only the missing ones. ``run.json`` pins the configuration: a
different dataset/method/scale/seed in the same ``--out`` is refused.

At the end (main process): ``metrics.csv`` (one row per image), ``summary.json`` (means, std, FID,
versions, parameters, seed, git commit), ``README.md`` (Markdown tables) and ``plots/``. ``--finalize``
writes these from the rows present without restoring anything (for a run that was stopped).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["Method", "resolve_method", "RowStore", "RunConfigError", "run_eval", "finalize", "build_parser", "main"]

REPO = Path(__file__).resolve().parents[1]


class RunConfigError(ValueError):
    """Bad command line / configuration (unknown method, a metric the dataset cannot support, ...)."""


# ---------------------------------------------------------------------------------------------------
# Methods


@dataclass
class Method:
    """What restores: ``restore(img) -> img`` (HxWx3 float [0,1]), or ``outputs_dir`` for outputs:DIR."""

    arg: str
    kind: str  # bicubic | cleaner | preset | outputs
    restore: Callable[[np.ndarray], np.ndarray] | None = None
    outputs_dir: Path | None = None
    info: dict = field(default_factory=dict)

    def output_path(self, name: str) -> Path:
        from diffbir_core.imageio import IMAGE_EXTENSIONS

        for ext in (".png",) + tuple(e for e in IMAGE_EXTENSIONS if e != ".png"):
            p = self.outputs_dir / f"{name}{ext}"
            if p.is_file():
                return p
        raise FileNotFoundError(f"outputs:{self.outputs_dir}: no restored image named {name}.* "
                                f"(expected e.g. {self.outputs_dir / (name + '.png')})")


def _out_hw(img: np.ndarray, scale: float) -> tuple[int, int]:
    return max(1, int(round(img.shape[0] * scale))), max(1, int(round(img.shape[1] * scale)))


def _available_cleaners() -> list[str] | None:
    try:
        from diffbir_core.cleaners import CLEANERS
    except ImportError:
        return None
    return list(CLEANERS)


def _available_presets() -> list[str] | None:
    try:
        import diffbir_core.pipeline  # noqa: F401
        from diffbir_core.config import PRESETS
    except ImportError:
        return None
    return list(PRESETS)


def resolve_method(arg: str, *, scale: float, task: str, device: str = "cpu", weights_dir: str | None = None,
                   seed: int = 231) -> Method:
    """Turn METHOD into a `Method` (models load here; unknown names list the valid ones)."""
    import torch

    from diffbir_core.imageio import resize, to_numpy, to_tensor

    if arg.startswith("outputs:"):
        d = Path(arg[len("outputs:"):]).expanduser()
        if not d.is_dir():
            raise RunConfigError(f"{arg}: folder {d} does not exist")
        return Method(arg, "outputs", outputs_dir=d, info={"outputs_dir": str(d)})
    if arg == "bicubic":
        def bicubic(img: np.ndarray) -> np.ndarray:
            return to_numpy(resize(to_tensor(img), _out_hw(img, scale), "bicubic"))

        return Method(arg, "bicubic", bicubic, info={"resize": "diffbir_core.imageio.resize bicubic (antialias)"})
    kind, name = (arg.split(":", 1) if arg.startswith(("cleaner:", "preset:")) else (None, arg))
    cleaners, presets = _available_cleaners(), _available_presets()
    if kind in (None, "cleaner") and cleaners and name in cleaners:
        from diffbir_core.cleaners import load_cleaner

        cleaner = load_cleaner(name, weights_dir=weights_dir, device=device)

        def clean(img: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return to_numpy(cleaner(to_tensor(img, device), out_size=_out_hw(img, scale)))

        return Method(arg, "cleaner", clean, info={"cleaner": name, "weights_dir": weights_dir})
    if kind in (None, "preset") and presets and name in presets:
        from diffbir_core.config import RestoreParams
        from diffbir_core.pipeline import DiffBIRPipeline

        params = RestoreParams.from_preset(name, upscale=scale, task="face" if task == "bfr" else "sr",
                                           seed=seed, device=str(device))
        if task == "bfr":
            params = params.replace(face__aligned=True)
        pipe = DiffBIRPipeline(weights_dir=weights_dir, device=device)

        def run_preset(img: np.ndarray) -> np.ndarray:
            return pipe.restore(img, params).image

        return Method(arg, "preset", run_preset, info={"preset": name, "params": _jsonable(dataclasses.asdict(params))})
    valid = ["bicubic", "outputs:DIR"]
    valid += ([f"{c} (cleaner)" for c in cleaners] if cleaners
              else ["(no cleaners: diffbir_core.cleaners not importable)"])
    valid += ([f"{p} (preset)" for p in presets] if presets
              else ["(no presets: diffbir_core.pipeline not importable)"])
    raise RunConfigError(f"unknown method {arg!r}; valid methods: {', '.join(valid)}")


# ---------------------------------------------------------------------------------------------------
# Row cache


class RowStore:
    """Per-image rows in ``rows.jsonl`` (``rows.rankN.jsonl`` for process N > 0), appended and fsync'ed.

    Reading merges every rows file; later lines for the same name add or replace columns. A truncated
    last line (the process was killed while writing) is skipped.
    """

    def __init__(self, out_dir: Path, rank: int = 0):
        self.out_dir = out_dir
        self.path = out_dir / ("rows.jsonl" if rank == 0 else f"rows.rank{rank}.jsonl")

    def load(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        for f in sorted(self.out_dir.glob("rows*.jsonl")):
            for line in f.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # half-written line of a killed run
                if not isinstance(r, dict) or "name" not in r:
                    continue
                cur = rows.setdefault(r["name"], {"name": r["name"], "values": {}})
                cur["values"].update(r.get("values", {}))
                cur.update({k: v for k, v in r.items() if k not in ("name", "values")})
        return rows

    def append(self, row: dict) -> None:
        data = json.dumps(row, sort_keys=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:  # make sure a previous half-written line stays on its own
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(data.encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------
# Helpers


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _resized(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from diffbir_core.imageio import resize, to_numpy, to_tensor

    return to_numpy(resize(to_tensor(img), tuple(hw), "bicubic"))


def quantize(img: np.ndarray) -> np.ndarray:
    """Float image -> the same image on 8-bit levels (what an 8-bit PNG of it holds), float32 [0,1]."""
    return (np.rint(np.clip(img, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def git_info(repo: Path = REPO) -> dict:
    """Commit (None when the repository has none), dirty flag and a hash of the eval/core sources."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", "eval", "diffbir_core")
    h = hashlib.sha256()
    for f in sorted(list((repo / "eval").rglob("*.py")) + list((repo / "diffbir_core").rglob("*.py"))):
        h.update(str(f.relative_to(repo)).encode())
        h.update(f.read_bytes())
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "note": None if commit else "the repository had no commit when this ran",
            "code_sha256": h.hexdigest()}


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "scipy", "pyiqa", "lpips", "dlib-bin", "face-recognition-models", "accelerate",
                "diffbir-core"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class _SingleProcess:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def process_state():
    """accelerate's PartialState under ``accelerate launch`` (WORLD_SIZE > 1), else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        # without CUDA, accelerate only forms a process group (gloo) when told the run is on the CPU
        return PartialState(cpu=not torch.cuda.is_available())
    return _SingleProcess()


# ---------------------------------------------------------------------------------------------------
# The run


@dataclass
class RunOptions:
    metrics: list[str]
    crop_border: int = 0
    device: str = "cpu"
    weights_dir: str | None = None
    metric_weights: str | None = None
    weight_paths: dict[str, str] = field(default_factory=dict)
    fid_ref: str | None = None
    limit: int | None = None
    save_images: bool = False
    seed: int = 231
    verbose: bool = True
    command: str | None = None  # recorded in summary.json
    lq_downscale: float = 1.0  # >1: shrink the LQ by this factor before restoring (speed knob for x4 nets)


def _config(ds, method_arg: str, opts: RunOptions) -> dict:
    d = ds.describe()
    return {"dataset": d["arg"] or d["name"], "dataset_name": d["name"], "scale": d["scale"],
            "synthetic": d.get("synthetic"), "method": method_arg, "crop_border": opts.crop_border,
            "seed": opts.seed, "lq_downscale": opts.lq_downscale}


def _run_json(out_dir: Path) -> dict:
    f = out_dir / "run.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _check_config(out_dir: Path, cfg: dict) -> None:
    f = out_dir / "run.json"
    if f.is_file():
        old = json.loads(f.read_text())
        diff = {k: (old.get(k), v) for k, v in cfg.items() if old.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise RunConfigError(f"{out_dir} already holds a different run ({what}). "
                                 "Use another --out (or delete that folder) - rows of different runs never mix.")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        started = {"git_at_start": git_info(), "started": now}
        f.write_text(json.dumps({**cfg, **started}, indent=2, sort_keys=True) + "\n")


def _resolve_fid_reference(ds, opts: RunOptions) -> dict:
    """-> {"kind": "folder"|"stats", "path": ...} (checked now, so a missing file fails before any work)."""
    from .metrics import METRIC_FILES, resolve_metric_file

    ref = opts.fid_ref
    if ref is None:
        if ds.has_gt:
            return {"kind": "folder", "path": str(ds.gt_dir), "what": "the dataset's GT images"}
        if ds.spec.fid_reference:
            ref = ds.spec.fid_reference
        else:
            raise RunConfigError(f"FID needs a reference and {ds.spec.title} has no GT: pass --fid-ref GT_DIR, "
                                 f"--fid-ref STATS.npz (arrays mu, sigma) or --fid-ref {', '.join(METRIC_FILES)}")
    if ref in METRIC_FILES:
        p = resolve_metric_file(ref, path=opts.weight_paths.get(ref), weights_dir=opts.metric_weights)
        return {"kind": "stats", "path": str(p), "what": METRIC_FILES[ref].description}
    p = Path(ref).expanduser()
    if p.is_dir():
        return {"kind": "folder", "path": str(p), "what": "a folder of reference images"}
    if p.is_file():
        return {"kind": "stats", "path": str(p), "what": "reference statistics file"}
    raise RunConfigError(f"--fid-ref {ref}: no such folder or statistics file")


def run_eval(ds, method_arg: str, out_dir: str | os.PathLike, opts: RunOptions, *,
             method: Method | None = None, state=None) -> dict | None:
    """Restore and score ``ds`` into ``out_dir``; returns the summary (main process) or None.

    ``method`` may be given directly (tests, notebooks); otherwise ``method_arg`` is resolved - only when
    there is work left.
    """
    from diffbir_core.imageio import read_image, save_image

    from .datasets import image_size
    from .metrics import METRICS, build_metric

    state = state or process_state()
    out_dir = Path(out_dir)
    per_image = [m for m in opts.metrics if METRICS[m].kind != "set"]
    want_fid = "fid" in opts.metrics
    if not ds.has_gt:
        fr = [m for m in opts.metrics if METRICS[m].needs_gt]
        if fr:
            nr = ", ".join(k for k, s in METRICS.items() if s.kind == "nr")
            raise RunConfigError(f"metric(s) {', '.join(fr)} need ground truth; {ds.spec.title} has none "
                                 f"(no-reference metrics: {nr})")
    fid_ref = _resolve_fid_reference(ds, opts) if want_fid else None
    items = ds.items[: opts.limit] if opts.limit else list(ds.items)
    cfg = _config(ds, method_arg, opts)
    if state.is_main_process:
        _check_config(out_dir, cfg)
    state.wait_for_everyone()

    # 1. what is left: names missing a column, or (FID) a feature file
    store = RowStore(out_dir, state.process_index)
    done = store.load()
    feat_dir = out_dir / "features" / "fid"

    def missing(it) -> tuple[list[str], bool]:
        have = done.get(it.name, {}).get("values", {})
        ms = [m for m in per_image if any(c not in have for c, _ in METRICS[m].columns)]
        return ms, want_fid and not (feat_dir / f"{it.name}.npy").is_file()

    todo = [it for it in items if any(missing(it))]
    mine = todo[state.process_index:: state.num_processes]
    if opts.verbose and state.is_main_process:
        print(f"[eval] {ds.spec.title}: {len(items)} images, {len(items) - len(todo)} already done, "
              f"{len(todo)} to do on {state.num_processes} process(es) -> {out_dir}", flush=True)

    if method is None and method_arg.startswith("outputs:"):
        method = resolve_method(method_arg, scale=ds.spec.scale, task=ds.spec.task)
    if method is not None and method.kind == "outputs":  # every output must be there before scoring starts
        lost = []
        for it in todo:
            try:
                method.output_path(it.name)
            except FileNotFoundError:
                lost.append(it.name)
        if lost:
            raise RunConfigError(f"{method_arg}: {len(lost)} of {len(todo)} images have no output file "
                                 f"(NAME.png, NAME.jpg, ...), e.g. {lost[:5]}")
    if mine:
        # 2. metrics first (a missing weight file fails before any restoration), then the method
        metrics = {m: build_metric(m, crop_border=opts.crop_border, device=opts.device,
                                   weights_dir=opts.metric_weights, weight_paths=opts.weight_paths)
                   for m in per_image + (["fid"] if want_fid else [])}
        if method is None:
            method = resolve_method(method_arg, scale=ds.spec.scale * opts.lq_downscale, task=ds.spec.task,
                                    device=opts.device, weights_dir=opts.weights_dir, seed=opts.seed)
        img_dir = out_dir / "images"
        for k, it in enumerate(mine):
            need, need_feat = missing(it)
            t0 = time.perf_counter()
            gt = ds.load_gt(it)
            row: dict[str, Any] = {"name": it.name, "values": {}}
            saved = img_dir / f"{it.name}.png"
            if method.kind == "outputs":
                out, restore_s = read_image(method.output_path(it.name)).rgb, None
                lq_hw = None
            elif saved.is_file() and it.name in done:  # restored before, only metrics were missing
                out, restore_s, lq_hw = read_image(saved).rgb, None, None
            else:
                lq, deg = ds.load_lq(it)
                lq_hw = list(lq.shape[:2])
                t1 = time.perf_counter()
                if opts.lq_downscale != 1.0:  # 1/F smaller input, F x larger method scale
                    out = method.restore(_resized(lq, (max(1, round(lq.shape[0] / opts.lq_downscale)),
                                                       max(1, round(lq.shape[1] / opts.lq_downscale)))))
                else:
                    out = method.restore(lq)
                restore_s = time.perf_counter() - t1
                row["restore_s"] = restore_s
                row["lq_size"] = lq_hw
                if deg is not None:
                    row["degradation"] = _jsonable(deg)
            out = quantize(out)
            if gt is not None:
                want_hw = tuple(gt.shape[:2])
            else:
                lh, lw = lq_hw if lq_hw else image_size(it.lq)
                want_hw = (max(1, int(round(lh * ds.spec.scale))), max(1, int(round(lw * ds.spec.scale))))
            if opts.lq_downscale != 1.0 and want_hw is not None and tuple(out.shape[:2]) != want_hw:
                out = quantize(_resized(out, want_hw))  # rounding of the shrunk size: back to the exact size
            if want_hw is not None and tuple(out.shape[:2]) != want_hw:
                ref = "GT size" if gt is not None else "LQ x scale"
                raise RuntimeError(f"{method_arg} gave a {out.shape[0]}x{out.shape[1]} image for {it.name}; "
                                   f"expected {want_hw[0]}x{want_hw[1]} ({ref})")
            row["out_size"] = list(out.shape[:2])
            if opts.save_images and not saved.is_file():
                save_image(saved, out)
            for m in need:
                row["values"].update(metrics[m](out, gt))
            if need_feat:
                feat_dir.mkdir(parents=True, exist_ok=True)
                tmp = feat_dir / f"{it.name}.tmp.npy"
                np.save(tmp, metrics["fid"].features(out))
                tmp.replace(feat_dir / f"{it.name}.npy")
            store.append(_jsonable(row))
            if opts.verbose:
                vals = " ".join(f"{c}={v:.4g}" for c, v in row["values"].items())
                rs = f"restore {restore_s:.1f}s, " if restore_s is not None else ""
                print(f"[eval{'' if state.num_processes == 1 else f' p{state.process_index}'}] "
                      f"{k + 1}/{len(mine)} {it.name}: {rs}total {time.perf_counter() - t0:.1f}s {vals}", flush=True)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    fid_net = metrics.get("fid") if mine else None
    return finalize(ds, method_arg, out_dir, opts, method=method, fid_ref=fid_ref, items=items, fid_net=fid_net)


def _stats(vals: list[float]) -> dict:
    a = np.asarray(vals, np.float64)
    finite = a[np.isfinite(a)]
    return {"mean": float(a.mean()), "std": float(a.std()), "median": float(np.median(a)),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size), "n_finite": int(finite.size)}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return repr(float(v)) if isinstance(v, (float, int)) else str(v)


def finalize(ds, method_arg: str, out_dir: str | os.PathLike, opts: RunOptions, *, method: Method | None = None,
             fid_ref: dict | None = None, items=None, fid_net=None) -> dict:
    """Write metrics.csv, summary.json, README.md and plots from the rows present in ``out_dir``."""
    from .fid import feature_stats, fid_from_features, frechet_distance, load_stats
    from .metrics import METRICS

    out_dir = Path(out_dir)
    items = items if items is not None else (ds.items[: opts.limit] if opts.limit else list(ds.items))
    per_image = [m for m in opts.metrics if METRICS[m].kind != "set"]
    columns = [c for m in per_image for c, _ in METRICS[m].columns]
    rows = RowStore(out_dir).load()
    ordered = [rows[it.name] for it in items if it.name in rows]
    complete_rows = [r for r in ordered if all(c in r["values"] for c in columns)]

    # 1. metrics.csv: one row per image, dataset order, requested columns only (deterministic content)
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name"] + columns)
        for r in ordered:
            w.writerow([r["name"]] + [_fmt(r["values"].get(c)) for c in columns])

    # 2. summary
    summary_metrics = {}
    for m in per_image:
        for c, better in METRICS[m].columns:
            vals = [r["values"][c] for r in ordered if c in r["values"]]
            if vals:
                summary_metrics[c] = {**_stats(vals), "higher_better": better, "metric": m}
    set_metrics = {}
    if "fid" in opts.metrics:
        feat_dir = out_dir / "features" / "fid"
        names = [it.name for it in items if (feat_dir / f"{it.name}.npy").is_file()]
        entry: dict[str, Any] = {"higher_better": False, "n": len(names), "reference": fid_ref}
        if len(names) >= 2 and fid_ref is not None:
            feats = np.stack([np.load(feat_dir / f"{n}.npy") for n in names])
            if fid_ref["kind"] == "stats":
                mu_r, sig_r = load_stats(fid_ref["path"])
                entry["reference_n"] = None
                entry["value"] = frechet_distance(*feature_stats(feats), mu_r, sig_r)
            else:
                ref_feats = _reference_features(Path(fid_ref["path"]), out_dir / "features" / "fid_ref", opts,
                                                fid_net)
                entry["reference_n"] = int(ref_feats.shape[0])
                if min(len(feats), len(ref_feats)) <= feats.shape[1]:
                    entry["value"] = fid_from_features(feats, ref_feats)
                else:
                    entry["value"] = frechet_distance(*feature_stats(feats), *feature_stats(ref_feats))
            if len(names) < 2048:
                entry["note"] = (f"{len(names)} images < 2048 feature dimensions: the covariance is rank-deficient "
                                 "and FID is biased upwards; compare only runs of the same size")
        else:
            entry["value"] = None
            entry["note"] = "needs features of at least 2 images and a reference"
        set_metrics["fid"] = entry
    timed = [r["restore_s"] for r in ordered if isinstance(r.get("restore_s"), (int, float))]
    metric_params = {m: {"convention": METRICS[m].convention, "files": list(METRICS[m].files)} for m in opts.metrics}
    summary = {
        "dataset": ds.describe(),
        "method": {"arg": method_arg, **({"kind": method.kind, **_jsonable(method.info)} if method else {})},
        "n_images": len(ordered), "n_complete": len(complete_rows), "n_expected": len(items),
        "complete": len(complete_rows) == len(items) and all(
            e.get("value") is not None for e in set_metrics.values()),
        "metrics": summary_metrics, "set_metrics": set_metrics,
        "directions": {c: ("higher" if d else "lower" if d is False else "info")
                       for m in opts.metrics for c, d in METRICS[m].columns},
        "parameters": {"crop_border": opts.crop_border, "scale": ds.spec.scale, "limit": opts.limit,
                       "lq_downscale": opts.lq_downscale,
                       "metrics": metric_params, "output_quantization": "8-bit levels (as a saved PNG)"},
        "seed": opts.seed,
        "timing": {"restore_s_mean": float(np.mean(timed)) if timed else None,
                   "restore_s_total": float(np.sum(timed)) if timed else None, "n_timed": len(timed)},
        "git": git_info(),  # when these tables were written
        "git_at_start": _run_json(out_dir).get("git_at_start"),  # when the first row was computed
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": opts.command,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    (out_dir / "README.md").write_text(run_markdown(summary, ordered, columns))
    try:
        from .plots import plot_run

        plot_run(out_dir, ordered, columns)
    except Exception as e:  # plots are a convenience: never lose the tables over them
        print(f"[eval] warning: plots not written ({type(e).__name__}: {e})", file=sys.stderr)
    return summary


def _reference_features(folder: Path, cache: Path, opts: RunOptions, net=None) -> np.ndarray:
    """Features of every image of a reference folder, cached per file under ``cache``."""
    from diffbir_core.data import list_images
    from diffbir_core.imageio import read_image

    from .metrics import build_metric

    files = list_images(folder)
    cache.mkdir(parents=True, exist_ok=True)
    net = None
    feats = []
    for f in files:
        c = cache / f"{f.stem}.npy"
        if not c.is_file():
            net = net or build_metric("fid", device=opts.device, weights_dir=opts.metric_weights,
                                      weight_paths=opts.weight_paths)
            np.save(c, net.features(read_image(f).rgb))
        feats.append(np.load(c))
    return np.stack(feats)


def _num(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def run_markdown(summary: dict, rows: list[dict], columns: list[str]) -> str:
    """The run's README.md: what ran, the mean table and (for small sets) the per-image table."""
    ds, m, g = summary["dataset"], summary["method"], summary["git"]
    commit = g["commit"] or f"none ({g['note']})"
    g0 = summary.get("git_at_start") or {}
    started = ""
    if g0.get("code_sha256") and g0["code_sha256"] != g["code_sha256"]:
        started = (f" - the run started at commit `{g0.get('commit')}`, code sha256 `{g0['code_sha256'][:12]}` "
                   "(sources changed since; rows are never recomputed)")
    lines = [f"# {ds['title']} - {m['arg']}", "",
             f"- dataset: `{ds['arg'] or ds['name']}` ({ds['task']}, output x{ds['scale']:g}); "
             f"{summary['n_images']}/{summary['n_expected']} images scored"
             + ("" if summary["complete"] else " **(incomplete run)**"),
             f"- commit: `{commit}`{' (uncommitted changes)' if g.get('dirty') else ''}; "
             f"code sha256 `{g['code_sha256'][:12]}`{started}",
             f"- seed: {summary['seed']}; crop border: {summary['parameters']['crop_border']}; created "
             f"{summary['created']}"]
    down = summary["parameters"].get("lq_downscale", 1.0)
    if down and down != 1.0:
        lines.append(f"- the LQ was shrunk by {down:g} (bicubic, antialiased) before restoring, and the method ran at "
                     f"x{ds['scale'] * down:g} (`--lq-downscale {down:g}`)")
    if summary["timing"]["restore_s_mean"] is not None:
        lines.append(f"- restore time: {summary['timing']['restore_s_mean']:.2f} s/image mean "
                     f"({summary['timing']['n_timed']} timed)")
    lines += ["", "| metric | mean | std | median | n | better |", "|---|---|---|---|---|---|"]
    for c, s in summary["metrics"].items():
        d = summary["directions"].get(c, "info")
        lines.append(f"| {c} | {_num(s['mean'])} | {_num(s['std'])} | {_num(s['median'])} | {s['n']} | {d} |")
    for c, s in summary["set_metrics"].items():
        lines.append(f"| {c} | {_num(s.get('value'))} | - | - | {s['n']} | lower |")
        if s.get("note"):
            lines.append(f"\n{c}: {s['note']}\n")
    if rows and len(rows) <= 100 and columns:
        lines += ["", "## Per image", "", "| name | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for r in rows:
            lines.append(f"| {r['name']} | " + " | ".join(_num(r["values"].get(c)) for c in columns) + " |")
    lines += ["", "Files: `metrics.csv` (per image), `summary.json` (means, parameters, versions), "
                  "`plots/` (distributions).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True,
                   help="realsrset|real47|set5|celeba_test|lfw_test|celebchild_test|wider_test, folder:LQ[:GT], "
                        "or synthetic:HQ[:PRESET[:SEED]]")
    p.add_argument("--root", help="folder holding the named dataset")
    p.add_argument("--method", required=True, help="bicubic, a cleaner name, a preset name, or outputs:DIR")
    p.add_argument("--metrics", help="comma-separated (default: the dataset's usual metrics)")
    p.add_argument("--out", required=True, help="run folder, e.g. results/realsrset_bicubic")
    p.add_argument("--scale", type=float, help="output size / LQ size (default: the dataset's)")
    p.add_argument("--crop-border", type=int, help="pixels cropped at each border for PSNR/SSIM/NIQE "
                                                   "(default: the dataset's, e.g. 4 for Set5 x4)")
    p.add_argument("--seed", type=int, default=231, help="seed of the restoration method (presets)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--weights-dir", help="model weights folder for cleaners / presets ($DIFFBIR_WEIGHTS_DIR)")
    p.add_argument("--metric-weights", help="folder holding metric weight files ($DIFFBIR_METRIC_WEIGHTS)")
    p.add_argument("--weight", action="append", default=[], metavar="NAME=PATH",
                   help="explicit metric file, e.g. lpips_alexnet=/x/alexnet-owt-7be5be79.pth (repeatable)")
    p.add_argument("--fid-ref", help="FID reference: a folder of images, a .npz with mu/sigma, or fid_ffhq512")
    p.add_argument("--limit", type=int, help="only the first N images (sorted by name)")
    p.add_argument("--lq-downscale", type=float, default=1.0, metavar="F",
                   help="shrink the LQ by F (bicubic, antialiased) and restore with F x the scale; a speed knob "
                        "for x4 networks on same-size tasks (faces), recorded in summary.json")
    p.add_argument("--save-images", action="store_true", help="also keep the restored images in OUT/images")
    p.add_argument("--allow-count-mismatch", action="store_true",
                   help="evaluate a named dataset even if it does not have the published number of images")
    p.add_argument("--finalize", action="store_true",
                   help="only write metrics.csv / summary / tables from the rows present (no restoration)")
    p.add_argument("--quiet", action="store_true")
    return p


def _device(arg: str, state) -> str:
    import torch

    if arg != "auto":
        return arg
    if getattr(state, "num_processes", 1) > 1 and hasattr(state, "device"):
        return str(state.device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import signal

    import torch

    def _terminate(signum, frame):  # a plain `kill` ends the run like Ctrl-C: finished rows are already on disk
        raise KeyboardInterrupt

    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (e.g. called from a notebook worker)
        pass
    try:
        return _main(args, argv, torch)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace, argv: list[str] | None, torch) -> int:
    from .datasets import DatasetError, open_dataset, validate
    from .metrics import METRIC_FILES, MetricWeightsError, parse_metrics

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
        ds = validate(open_dataset(args.dataset, root=args.root, scale=args.scale,
                                   allow_count_mismatch=args.allow_count_mismatch))
        metrics = parse_metrics(args.metrics) if args.metrics else list(ds.spec.default_metrics)
        state = process_state()
        opts = RunOptions(metrics=metrics, crop_border=ds.spec.crop_border if args.crop_border is None
                          else args.crop_border, device=_device(args.device, state), weights_dir=args.weights_dir,
                          metric_weights=args.metric_weights, weight_paths=weight_paths, fid_ref=args.fid_ref,
                          limit=args.limit, save_images=args.save_images, seed=args.seed, verbose=not args.quiet,
                          lq_downscale=args.lq_downscale,
                          command="python -m eval.run " + " ".join(sys.argv[1:] if argv is None else argv))
        if args.finalize:
            if not (Path(args.out) / "run.json").is_file():
                raise RunConfigError(f"--finalize: {args.out} holds no run")
            _check_config(Path(args.out), _config(ds, args.method, opts))
            fid_ref = _resolve_fid_reference(ds, opts) if "fid" in metrics else None
            summary = finalize(ds, args.method, args.out, opts, fid_ref=fid_ref)
        else:
            summary = run_eval(ds, args.method, args.out, opts, state=state)
    except (DatasetError, RunConfigError, MetricWeightsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished rows are kept in {args.out}; rerun the same command to resume "
              "(or add --finalize to write the tables from what is there)", file=sys.stderr)
        return 130
    if summary is not None and not args.quiet:
        print((Path(args.out) / "README.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

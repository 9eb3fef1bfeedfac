"""Tables of an `diffbir_eval.run` folder from its rows: ``metrics.csv``, ``summary.json``, ``README.md``, ``plots/``.

`finalize` reads every row present (`diffbir_eval.store.RowStore`) and writes, deterministically for the same rows:
    1. ``metrics.csv``: one row per image in dataset order, the requested columns only;
    2. ``summary.json``: mean / std / median / min / max per column, FID of the set (features cached under
       ``features/``), parameters, seed, timing, git commit (now and at start) and package versions;
    3. ``README.md`` (`run_markdown`) and ``plots/`` (`diffbir_eval.plots.plot_run`; never fatal).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from diffbir_core.atomic import atomic_open, write_text
from diffbir_core.data import list_images
from diffbir_core.imageio import read_image

from .fid import feature_stats, fid_from_features, frechet_distance, load_stats
from .metrics import METRICS, build_metric
from .plots import plot_run
from .provenance import git_info, versions
from .store import RowStore, RunOptions, jsonable, read_run_json

if TYPE_CHECKING:
    from .methods import Method

__all__ = ["finalize", "run_markdown", "num"]


def _stats(vals: list[float]) -> dict:
    a = np.asarray(vals, np.float64)
    finite = a[np.isfinite(a)]
    return {
        "mean": float(a.mean()),
        "std": float(a.std()),
        "median": float(np.median(a)),
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
        "n_finite": int(finite.size),
    }


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return repr(float(v)) if isinstance(v, (float, int)) else str(v)


def finalize(
    ds,
    method_arg: str,
    out_dir: str | os.PathLike,
    opts: RunOptions,
    *,
    method: Method | None = None,
    fid_ref: dict | None = None,
    items=None,
    fid_net=None,
) -> dict:
    """Write metrics.csv, summary.json, README.md and plots from the rows present in ``out_dir``."""
    out_dir = Path(out_dir)
    items = items if items is not None else (ds.items[: opts.limit] if opts.limit else list(ds.items))
    per_image = [m for m in opts.metrics if METRICS[m].kind != "set"]
    columns = [c for m in per_image for c, _ in METRICS[m].columns]
    rows = RowStore(out_dir).load()
    ordered = [rows[it.name] for it in items if it.name in rows]
    complete_rows = [r for r in ordered if all(c in r["values"] for c in columns)]

    # 1. metrics.csv: one row per image, dataset order, requested columns only (deterministic content)
    with atomic_open(out_dir / "metrics.csv", "w", newline="") as f:
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
                ref_feats = _reference_features(Path(fid_ref["path"]), out_dir / "features" / "fid_ref", opts, fid_net)
                entry["reference_n"] = int(ref_feats.shape[0])
                if min(len(feats), len(ref_feats)) <= feats.shape[1]:
                    entry["value"] = fid_from_features(feats, ref_feats)
                else:
                    entry["value"] = frechet_distance(*feature_stats(feats), *feature_stats(ref_feats))
            if len(names) < 2048:
                entry["note"] = (
                    f"{len(names)} images < 2048 feature dimensions: the covariance is rank-deficient "
                    "and FID is biased upwards; compare only runs of the same size"
                )
        else:
            entry["value"] = None
            entry["note"] = "needs features of at least 2 images and a reference"
        set_metrics["fid"] = entry
    timed = [r["restore_s"] for r in ordered if isinstance(r.get("restore_s"), (int, float))]
    metric_params = {m: {"convention": METRICS[m].convention, "files": list(METRICS[m].files)} for m in opts.metrics}
    summary = {
        "dataset": ds.describe(),
        "method": {"arg": method_arg, **({"kind": method.kind, **jsonable(method.info)} if method else {})},
        "n_images": len(ordered),
        "n_complete": len(complete_rows),
        "n_expected": len(items),
        "complete": len(complete_rows) == len(items) and all(e.get("value") is not None for e in set_metrics.values()),
        "metrics": summary_metrics,
        "set_metrics": set_metrics,
        "directions": {
            c: ("higher" if d else "lower" if d is False else "info")
            for m in opts.metrics
            for c, d in METRICS[m].columns
        },
        "parameters": {
            "crop_border": opts.crop_border,
            "scale": ds.spec.scale,
            "limit": opts.limit,
            "lq_downscale": opts.lq_downscale,
            "metrics": metric_params,
            "output_quantization": "8-bit levels (as a saved PNG)",
        },
        "seed": opts.seed,
        "timing": {
            "restore_s_mean": float(np.mean(timed)) if timed else None,
            "restore_s_total": float(np.sum(timed)) if timed else None,
            "n_timed": len(timed),
        },
        "git": git_info(),  # when these tables were written
        "git_at_start": read_run_json(out_dir).get("git_at_start"),  # when the first row was computed
        "versions": versions(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": opts.command,
    }
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=False) + "\n")
    write_text(out_dir / "README.md", run_markdown(summary, ordered, columns))
    try:
        plot_run(out_dir, ordered, columns)
    except Exception as e:  # plots are a convenience: never lose the tables over them
        print(f"[eval] warning: plots not written ({type(e).__name__}: {e})", file=sys.stderr)
    return summary


def _reference_features(folder: Path, cache: Path, opts: RunOptions, net=None) -> np.ndarray:
    """Features of every image of a reference folder, cached per file under ``cache``."""
    files = list_images(folder)
    cache.mkdir(parents=True, exist_ok=True)
    feats = []
    for f in files:
        c = cache / f"{f.stem}.npy"
        if not c.is_file():
            net = net or build_metric(
                "fid", device=opts.device, weights_dir=opts.metric_weights, weight_paths=opts.weight_paths
            )
            with atomic_open(c, "wb") as fh:
                np.save(fh, net.features(read_image(f).rgb))
        feats.append(np.load(c))
    return np.stack(feats)


def num(v: float | None, digits: int = 4) -> str:
    """A table cell: ``-`` for None, ``inf``, else ``digits`` decimals."""
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
        started = (
            f" - the run started at commit `{g0.get('commit')}`, code sha256 `{g0['code_sha256'][:12]}` "
            "(sources changed since; rows are never recomputed)"
        )
    lines = [
        f"# {ds['title']} - {m['arg']}",
        "",
        f"- dataset: `{ds['arg'] or ds['name']}` ({ds['task']}, output x{ds['scale']:g}); "
        f"{summary['n_images']}/{summary['n_expected']} images scored"
        + ("" if summary["complete"] else " **(incomplete run)**"),
        f"- commit: `{commit}`{' (uncommitted changes)' if g.get('dirty') else ''}; "
        f"code sha256 `{g['code_sha256'][:12]}`{started}",
        f"- seed: {summary['seed']}; crop border: {summary['parameters']['crop_border']}; created {summary['created']}",
    ]
    down = summary["parameters"].get("lq_downscale", 1.0)
    if down and down != 1.0:
        lines.append(
            f"- the LQ was shrunk by {down:g} (bicubic, antialiased) before restoring, and the method ran at "
            f"x{ds['scale'] * down:g} (`--lq-downscale {down:g}`)"
        )
    if summary["timing"]["restore_s_mean"] is not None:
        lines.append(
            f"- restore time: {summary['timing']['restore_s_mean']:.2f} s/image mean "
            f"({summary['timing']['n_timed']} timed)"
        )
    lines += ["", "| metric | mean | std | median | n | better |", "|---|---|---|---|---|---|"]
    for c, s in summary["metrics"].items():
        d = summary["directions"].get(c, "info")
        lines.append(f"| {c} | {num(s['mean'])} | {num(s['std'])} | {num(s['median'])} | {s['n']} | {d} |")
    for c, s in summary["set_metrics"].items():
        lines.append(f"| {c} | {num(s.get('value'))} | - | - | {s['n']} | lower |")
        if s.get("note"):
            lines.append(f"\n{c}: {s['note']}\n")
    if rows and len(rows) <= 100 and columns:
        lines += ["", "## Per image", "", "| name | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for r in rows:
            lines.append(f"| {r['name']} | " + " | ".join(num(r["values"].get(c)) for c in columns) + " |")
    lines += [
        "",
        "Files: `metrics.csv` (per image), `summary.json` (means, parameters, versions), `plots/` (distributions).",
        "",
    ]
    return "\n".join(lines)

"""Every preset over every registered set, then every table (library of ``python -m diffbir_eval.run_all``).

    python -m diffbir_eval.run_all --data DATA --weights-dir W --metric-weights M [--gpus 8] [--dry-run | --estimate]

DATA holds one folder per set named as in `diffbir_eval.registry` (``DATA/realsrset``, ``DATA/realsr``, ...; ``python -m
diffbir_eval.data fetch NAME DATA/NAME`` makes the downloadable ones). Each set found and verified
(`diffbir_eval.registry.check`;
others are skipped and listed) is run with ``bicubic`` and every preset of `diffbir_core.config.PRESETS` that fits
its task (``v1-face`` on faces only, ``v1-general`` elsewhere): ``[accelerate launch --multi_gpu --num_processes N]
-m diffbir_eval.run --dataset NAME --root DATA/NAME --method M --out results/NAME_M`` with the set's default metrics
(resumable). Then ``python -m diffbir_eval.report`` and ``python -m diffbir_eval.table all --write results/README.md``.
``--estimate`` prints the expected time from per-image times MEASURED here (committed runs' restore_s_mean;
diffusion presets: results/bench's 50-step fit scaled by output pixels) - CPU measurements, so an ESTIMATE that
says so, not a GPU time.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Job", "estimate", "plan", "run_jobs", "write_reports"]

_OUT_PX_512 = 512 * 512  # output size assumed for sets not here (faces and the 128 -> 512 sets are 512x512)


@dataclass(frozen=True)
class Job:
    dataset: str
    method: str
    root: Path
    out: Path

    def argv(self, *, gpus: int, device: str, weights_dir: str | None, metric_weights: str | None) -> list[str]:
        head = (
            ["accelerate", "launch", "--multi_gpu", "--num_processes", str(gpus), "-m", "diffbir_eval.run"]
            if gpus > 1
            else [sys.executable, "-m", "diffbir_eval.run"]
        )
        cmd = head + [
            "--dataset",
            self.dataset,
            "--root",
            str(self.root),
            "--method",
            self.method,
            "--out",
            str(self.out),
            "--device",
            device,
        ]
        if weights_dir:
            cmd += ["--weights-dir", weights_dir]
        if metric_weights:
            cmd += ["--metric-weights", metric_weights]
        return cmd


def _methods_for(task: str, presets: list[str]) -> list[str]:
    out = ["bicubic"]
    for p in presets:
        if p == "v1-face" and task != "bfr":
            continue
        if p == "v1-general" and task == "bfr":
            continue
        out.append(p)
    return out


def plan(
    data: Path,
    results: Path,
    presets: list[str],
    sets: list[str] | None = None,
    verify: bool = True,
    present_only: bool = True,
) -> tuple[list[Job], dict[str, str]]:
    """Jobs for every (set present in ``data``, applicable method); ``skipped`` maps set -> why not.
    ``present_only=False`` plans every registered set (for `estimate`)."""
    from ..datasets import DATASETS
    from ..registry import REGISTRY, DataError, check

    jobs: list[Job] = []
    skipped: dict[str, str] = {}
    for name in sets or list(REGISTRY):
        root = data / name
        if not root.is_dir() and present_only:
            how = (
                f"python -m diffbir_eval.data fetch {name} {root}"
                if REGISTRY[name].download
                else REGISTRY[name].how_to_get
            )
            skipped[name] = f"no folder {root} ({how})"
            continue
        if verify and root.is_dir():
            try:
                rep = check(name, root)
            except DataError as e:
                skipped[name] = str(e)
                continue
            if not rep.ok:
                skipped[name] = "check failed:\n" + str(rep)
                continue
        for m in _methods_for(DATASETS[name].task, presets):
            jobs.append(Job(name, m, root, results / f"{name}_{m.replace('.', '')}"))
    return jobs, skipped


def _measured(results: Path) -> dict[tuple[str, str], float]:
    """{(dataset, method): mean restore seconds per image} from committed run folders."""
    out = {}
    for s in results.glob("*/summary.json"):
        try:
            d = json.loads(s.read_text())
            t = d["timing"]["restore_s_mean"]
            if t and (d.get("parameters") or {}).get("lq_downscale", 1.0) == 1.0:
                out[(d["dataset"]["name"], d["method"]["arg"])] = float(t)
        except (KeyError, TypeError, ValueError, json.JSONDecodeError):
            continue
    return out


def _bench_fit(results: Path) -> tuple[float, float, str] | None:
    """(s per megapixel, s offset, what) of the optimised 50-step restore from results/bench/README.md."""
    import re

    f = results / "bench" / "README.md"
    if not f.is_file():
        return None
    m = re.search(
        r"Linear fit of the optimised 50-step time against pixel count: ([\d.]+) s per megapixel \+ "
        r"([\d.]+) s",
        f.read_text(),
    )
    return (float(m.group(1)), float(m.group(2)), "results/bench (CPU, 2 cores, random weights, v2)") if m else None


def _out_pixels(name: str, data: Path) -> tuple[float, str]:
    """Mean output pixels per image: from the LQ headers when the set is here, else its nominal size."""
    from ..datasets import DATASETS, DatasetError, image_size, open_dataset

    spec = DATASETS[name]
    try:
        ds = open_dataset(name, root=data / name, allow_count_mismatch=True)
        sizes = [image_size(it.lq) for it in ds.items]
        return sum(h * w for h, w in sizes) / len(sizes) * spec.scale**2, f"{len(sizes)} images measured"
    except (DatasetError, OSError, ValueError, ZeroDivisionError):  # not here (or empty): nominal size
        return float(_OUT_PX_512), "512x512 nominal"


def estimate(jobs: list[Job], data: Path, results: Path, processes: int) -> str:
    """A Markdown table of the expected time per job (see the module doc: an estimate from measured times)."""
    from ..datasets import DATASETS

    measured, fit = _measured(results), _bench_fit(results)
    px_cache: dict[str, tuple[float, str]] = {}

    def px_of(name: str) -> tuple[float, str]:
        if name not in px_cache:
            px_cache[name] = _out_pixels(name, data)
        return px_cache[name]

    # s per output megapixel of each measured method, from the measured sets whose images are here
    per_mp: dict[str, list[float]] = {}
    for (ds, m), t in measured.items():
        if ds not in DATASETS:  # synthetic / folder runs: size unknown here
            continue
        px, how = px_of(ds)
        if "measured" in how:
            per_mp.setdefault(m, []).append(t / (px / 1e6))
    lines = ["| set | method | images | s/image (basis) | hours |", "|---|---|---|---|---|"]
    total = 0.0
    for j in jobs:
        n = DATASETS[j.dataset].expected
        px, px_note = px_of(j.dataset)
        if (j.dataset, j.method) in measured:
            s, basis = measured[(j.dataset, j.method)], "measured run of this set (CPU)"
        elif j.method in per_mp:
            r = sum(per_mp[j.method]) / len(per_mp[j.method])
            s, basis = r * px / 1e6, f"{j.method} measured on other sets: {r:.1f} s/MP x {px / 1e6:.2f} MP ({px_note})"
        elif fit is not None:
            s = fit[0] * px / 1e6 + fit[1]
            basis = f"{fit[2]}: {fit[0]:.0f} s/MP x {px / 1e6:.2f} MP ({px_note}) + {fit[1]:.0f} s"
        else:
            s, basis = float("nan"), "no measurement"
        h = (n or 0) * s / processes / 3600
        total += 0 if math.isnan(h) else h
        lines.append(
            f"| {j.dataset} | {j.method} | {n if n is not None else 'unknown'} | {s:.1f} ({basis}) | {h:.1f} |"
        )
    lines += [
        "",
        (
            f"ESTIMATE, total {total:.0f} h over {processes} process(es), from per-image times measured on a "
            "2-core CPU (no GPU was available to this project): on GPUs expect a small fraction of this. "
            "Sets of unknown size count 0. Measure first with `python -m diffbir_eval.bench --device cuda`."
        ),
    ]
    return "\n".join(lines)


def run_jobs(jobs: list[Job], *, gpus: int, device: str, weights_dir: str | None, metric_weights: str | None) -> dict:
    """Run each job's `diffbir_eval.run` command in turn (a failure is reported and the next job runs);
    returns {"SET x METHOD": why} for the jobs that failed."""
    failed: dict[str, str] = {}
    for j in jobs:
        cmd = j.argv(gpus=gpus, device=device, weights_dir=weights_dir, metric_weights=metric_weights)
        print(f"[run_all] {j.dataset} x {j.method}: {shlex.join(cmd)}", flush=True)
        rc = subprocess.call(cmd, env={**os.environ})
        if rc != 0:
            print(f"[run_all] {j.dataset} x {j.method} failed (exit {rc}); continuing", file=sys.stderr)
            failed[f"{j.dataset} x {j.method}"] = f"diffbir_eval.run exit {rc}"
    return failed


def write_reports(results: Path) -> None:
    """``python -m diffbir_eval.report`` then ``python -m diffbir_eval.table all --write RESULTS/README.md``."""
    subprocess.call([sys.executable, "-m", "diffbir_eval.report", "--results", str(results)])
    readme = str(results / "README.md")
    subprocess.call([sys.executable, "-m", "diffbir_eval.table", "all", "--results", str(results), "--write", readme])

"""The run folder of `diffbir_eval.run`: its options, the pinned configuration (``run.json``) and the row store.

Rows live in ``rows.jsonl`` (``rows.rankN.jsonl`` for process N > 0), one JSON line per image, appended and
fsync'ed: an interrupted run keeps every finished row and a rerun skips them (a half-written last line is
ignored); later lines for the same image add or replace columns. ``run.json`` pins dataset, method, scale,
seed, crop border and LQ downscale: a different run in the same folder is refused (`check_config`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffbir_core.atomic import probe_writable, remove_stale_temps, write_text
from diffbir_core.batch import describe_os_error

from .provenance import git_info

__all__ = [
    "RunConfigError",
    "RunOptions",
    "RowStore",
    "jsonable",
    "run_config",
    "read_run_json",
    "check_config",
    "check_out_dir",
]


class RunConfigError(ValueError):
    """Bad command line / configuration (unknown method, a metric the dataset cannot support, ...)."""


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


def jsonable(x: Any) -> Any:
    """Dicts, lists, numpy scalars and paths -> plain JSON values."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    return x


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """``--out`` must be (or become) a writable folder: checked with a probe file before any work, so a file in
    the way or a read-only place fails with one line (`RunConfigError`). Removes temporary files of killed
    writers (`diffbir_core.atomic.remove_stale_temps`) in the run folder and its sub-folders."""
    d = Path(out_dir).expanduser()
    if d.exists() and not d.is_dir():
        raise RunConfigError(f"--out {d} exists and is not a folder; choose another --out")
    for parent in d.parents:
        if parent.exists() and not parent.is_dir():
            raise RunConfigError(f"--out {d}: {parent} is a file, not a folder; choose another --out")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunConfigError(f"--out {d}: cannot create the folder: {describe_os_error(e)}") from None
    try:
        probe_writable(d)
    except OSError as e:
        raise RunConfigError(f"--out {d}: cannot write into the folder: {describe_os_error(e)}") from None
    for sub in (d, d / "features" / "fid", d / "features" / "fid_ref", d / "images", d / "plots"):
        remove_stale_temps(sub)
    return d


def run_config(ds, method_arg: str, opts: RunOptions) -> dict:
    """What ``run.json`` pins: rows computed under another configuration never mix with these."""
    d = ds.describe()
    return {
        "dataset": d["arg"] or d["name"],
        "dataset_name": d["name"],
        "scale": d["scale"],
        "synthetic": d.get("synthetic"),
        "method": method_arg,
        "crop_border": opts.crop_border,
        "seed": opts.seed,
        "lq_downscale": opts.lq_downscale,
    }


def read_run_json(out_dir: Path) -> dict:
    f = out_dir / "run.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def check_config(out_dir: Path, cfg: dict) -> None:
    """Refuse a folder pinned to another configuration; pin a new folder (with the commit at start)."""
    f = out_dir / "run.json"
    if f.is_file():
        old = json.loads(f.read_text())
        diff = {k: (old.get(k), v) for k, v in cfg.items() if old.get(k) != v}
        if diff:
            what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise RunConfigError(
                f"{out_dir} already holds a different run ({what}). "
                "Use another --out (or delete that folder) - rows of different runs never mix."
            )
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        started = {"git_at_start": git_info(), "started": now}
        write_text(f, json.dumps({**cfg, **started}, indent=2, sort_keys=True) + "\n")

"""Plots of evaluation results (matplotlib, Agg backend, PNG): per-image distributions of a run and
method comparisons on one dataset. Files go next to the tables they illustrate.

* `plot_run(run_dir, rows, columns)` -> ``RUN/plots/distributions.png``: one panel per metric column, a
  histogram of the per-image values with the mean marked.
* `plot_comparison(title, runs, out_path)` -> one panel per metric: box plots of each method's per-image
  values, with lines joining the same image across methods when there are at most 60 images.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from diffbir_core.atomic import atomic_path

__all__ = ["plot_run", "plot_comparison"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> None:
    """``fig`` -> the PNG ``out``, atomically (`diffbir_core.atomic.atomic_path`); the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)


def _finite(vals) -> np.ndarray:
    a = np.asarray([v for v in vals if v is not None], np.float64)
    return a[np.isfinite(a)]


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def plot_run(run_dir: str | os.PathLike, rows: list[dict], columns: list[str]) -> Path | None:
    """Histogram per metric column of one run; returns the PNG path (None when there is nothing to plot)."""
    cols = [c for c in columns if _finite(r["values"].get(c) for r in rows).size]
    if not cols:
        return None
    plt = _plt()
    nr, nc = _grid(len(cols))
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.2 * nr), squeeze=False)
    for ax, c in zip(axes.flat, cols):
        v = _finite(r["values"].get(c) for r in rows)
        ax.hist(v, bins=min(30, max(5, v.size // 2)), color="#4c72b0", alpha=0.85)
        ax.axvline(v.mean(), color="#c44e52", lw=1.5, label=f"mean {v.mean():.4g}")
        ax.set_title(f"{c} (n={v.size})")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(cols) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(run_dir) / "plots" / "distributions.png"
    _save(fig, out)
    return out


def plot_comparison(
    title: str, runs: dict[str, dict[str, dict[str, float]]], columns: list[str], out_path: str | os.PathLike
) -> Path | None:
    """Compare methods on one dataset.

    ``runs``: {method label: {image name: {column: value}}}. One panel per column: a box plot per method
    and, for at most 60 shared images, a grey line per image joining its values across methods.
    """
    labels = list(runs)
    cols = [c for c in columns if any(_finite(v.get(c) for v in r.values()).size for r in runs.values())]
    if not labels or not cols:
        return None
    plt = _plt()
    nr, nc = _grid(len(cols))
    fig, axes = plt.subplots(nr, nc, figsize=(max(4.2, 1.6 * len(labels) + 1.5) * nc, 3.6 * nr), squeeze=False)
    shared = sorted(set.intersection(*(set(r) for r in runs.values())))
    for ax, c in zip(axes.flat, cols):
        data = [_finite(runs[m][n].get(c) for n in runs[m]) for m in labels]
        ax.boxplot([d if d.size else [np.nan] for d in data], tick_labels=labels, showmeans=True)
        if 0 < len(shared) <= 60 and len(labels) > 1:
            for n in shared:
                ys = [runs[m][n].get(c) for m in labels]
                if all(y is not None and np.isfinite(y) for y in ys):
                    ax.plot(range(1, len(labels) + 1), ys, color="0.6", lw=0.6, alpha=0.6, zorder=0)
        ax.set_title(c)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    for ax in list(axes.flat)[len(cols) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_path)
    _save(fig, out)
    return out

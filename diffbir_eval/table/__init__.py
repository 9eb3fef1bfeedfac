"""The paper-layout tables (library of ``python -m diffbir_eval.table NAME``, CLI in ``table/__main__.py``).

Tables (`TABLES`): ``bsr-paper`` (RealSRSet, Real47 - MANIQA, NIQE - plus Set5 as a sanity set),
``bfr-paper`` (CelebA-Test PSNR/SSIM/LPIPS/IDS/FID, FID on LFW/CelebChild/WIDER-Test, plus the synthetic face
pairs we can make here), ``realsr-modern`` (OSEDiff's Table 1 protocol on DIV2K-val, RealSR, DRealSR:
PSNR/SSIM on Y, LPIPS, DISTS, FID, NIQE, MUSIQ, MANIQA-PIPAL, CLIP-IQA; 128 -> 512, no border crop).

Methods are rows, dataset x metric are columns. Every cell names its source and protocol: ours link to their
run folder (``results/NAME/README.md``) and carry ``rN`` (run: commit, images) and ``PN`` (the metric
convention recorded in that run's summary.json, with its crop); published cells carry ``sN`` (source and
protocol, `diffbir_eval.published`). Runs are the folders ``results/*/`` with ``summary.json`` + ``metrics.csv`` written
by `diffbir_eval.run`; nothing is recomputed. ``--write FILE`` replaces the block between
``<!-- diffbir_eval.table:NAME:begin -->`` and ``<!-- diffbir_eval.table:NAME:end -->`` in FILE (appends it when
absent).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from diffbir_core.atomic import write_text

__all__ = ["TABLES", "TableSpec", "build_table", "load_runs", "metrics_block", "read_blocks", "write_block"]


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    columns: tuple[tuple[str, tuple[str, ...]], ...]  # (dataset key, metric columns)
    notes: tuple[str, ...] = ()


_MODERN = ("psnr", "ssim_pyiqa", "lpips", "dists", "fid", "niqe", "musiq", "maniqa-pipal", "clipiqa")
SYNTH_FACES = "synthetic:codeformer_face"  # any synthetic run made with the codeformer_face degradation

TABLES: dict[str, TableSpec] = {
    t.name: t
    for t in [
        TableSpec(
            "bsr-paper",
            "Blind super-resolution, real images (DiffBIR paper layout)",
            (("realsrset", ("maniqa", "niqe")), ("real47", ("maniqa", "niqe")), ("set5", ("psnr", "ssim", "niqe"))),
            (
                (
                    "RealSRSet and Real47 have no ground truth (no-reference metrics only). "
                    "Set5 (bicubic x4) is not in the paper's BSR table: a sanity set with ground truth."
                ),
            ),
        ),
        TableSpec(
            "bfr-paper",
            "Blind face restoration (DiffBIR paper layout)",
            (
                ("celeba_test", ("psnr", "ssim", "lpips", "ids_deg", "fid")),
                ("lfw_test", ("fid",)),
                ("celebchild_test", ("fid",)),
                ("wider_test", ("fid",)),
                (SYNTH_FACES, ("psnr", "ssim", "niqe", "id_dist_dlib")),
            ),
            (
                (
                    "CelebA-Test, LFW-Test, CelebChild-Test and WIDER-Test are not obtainable here; the last group is "
                    "synthetic pairs from shared/data/faces/aligned (codeformer_face degradation), a stand-in that is "
                    "NOT comparable to CelebA-Test numbers."
                ),
            ),
        ),
        TableSpec(
            "realsr-modern",
            "Real-world SR, 128 -> 512 (OSEDiff Table 1 protocol)",
            (("div2k_val", _MODERN), ("realsr", _MODERN), ("drealsr", _MODERN)),
            (
                (
                    "Protocol: OSEDiff test_metrics.py - pyiqa metrics, PSNR/SSIM on Y of YCbCr, no border crop, "
                    "LQ 128x128 -> 512x512, FID of the output folder against the GT folder."
                ),
            ),
        ),
    ]
}

_ARROW = {True: "↑", False: "↓", None: ""}
_SHORT = {
    "realsrset": "RealSRSet",
    "real47": "Real47",
    "set5": "Set5",
    "celeba_test": "CelebA-Test",
    "lfw_test": "LFW-Test",
    "celebchild_test": "CelebChild-Test",
    "wider_test": "WIDER-Test",
    SYNTH_FACES: "synthetic faces",
    "div2k_val": "DIV2K-val",
    "realsr": "RealSR",
    "drealsr": "DRealSR",
}


def _dataset_key(summary: dict) -> str:
    d = summary["dataset"]
    if d.get("synthetic"):
        return f"synthetic:{d['synthetic'].get('preset', '')}"
    return d["name"] if d["name"] != "folder" else (d.get("arg") or "folder")


def _label(summary: dict) -> str:
    m = summary["method"]["arg"]
    down = (summary.get("parameters") or {}).get("lq_downscale") or 1.0
    return m if down == 1.0 else f"{m} (LQ/{down:g})"


def load_runs(results: str | os.PathLike) -> list[dict]:
    """Every ``results/*/`` folder holding an diffbir_eval.run ``summary.json`` and ``metrics.csv``."""
    results = Path(results)
    runs = []
    for s in sorted(results.glob("*/summary.json")):
        if not (s.parent / "metrics.csv").is_file():
            continue
        summary = json.loads(s.read_text())
        if not all(k in summary for k in ("dataset", "method", "metrics", "git")):
            continue
        runs.append({"dir": s.parent, "summary": summary, "key": _dataset_key(summary), "label": _label(summary)})
    return runs


def _value(summary: dict, col: str) -> float | None:
    if col in summary.get("metrics", {}):
        return summary["metrics"][col].get("mean")
    sm = (summary.get("set_metrics") or {}).get(col)
    return sm.get("value") if isinstance(sm, dict) else None


def _metric_of(col: str) -> str:
    from ..metrics import METRICS

    for name, spec in METRICS.items():
        if any(c == col for c, _ in spec.columns):
            return name
    return col


def _fmt(v: float, col: str) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.2f}" if col in ("fid", "musiq") else f"{v:.4f}"


def build_table(
    name: str, results: str | os.PathLike = "results", *, link_base: str | os.PathLike | None = None
) -> str:
    """The Markdown of table ``name``; links are relative to ``link_base`` (default: ``results``)."""
    from ..metrics import COLUMN_DIRECTIONS
    from ..published import MISSING, PUBLISHED

    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; choose from: {', '.join(TABLES)}")
    spec = TABLES[name]
    results = Path(results)
    base = Path(link_base) if link_base is not None else results
    keys = [k for k, _ in spec.columns]
    runs = [r for r in load_runs(results) if r["key"] in keys]
    published = [p for p in PUBLISHED if p.dataset in keys]

    # rows: our methods (baselines last), then published methods, then methods whose cells are missing
    ours = sorted({r["label"] for r in runs}, key=lambda m: (m.startswith("bicubic"), m))
    pub_methods = list(dict.fromkeys(p.method for p in published))
    missing = [m for (m, t) in MISSING if t == name and m not in pub_methods]
    run_fn: dict[Path, str] = {}
    proto_fn: dict[str, str] = {}
    src_fn: dict[str, str] = {}
    foot_runs, foot_protos, foot_src = [], [], []

    def proto_id(text: str) -> str:
        if text not in proto_fn:
            proto_fn[text] = f"P{len(proto_fn) + 1}"
            foot_protos.append(f"- **{proto_fn[text]}** {text}")
        return proto_fn[text]

    def our_cell(run: dict, col: str) -> str:
        s = run["summary"]
        v = _value(s, col)
        if v is None:
            return "-"
        if run["dir"] not in run_fn:
            run_fn[run["dir"]] = f"r{len(run_fn) + 1}"
            commit = (s["git"].get("commit") or "none")[:10] + ("+dirty" if s["git"].get("dirty") else "")
            rel = os.path.relpath(run["dir"], base)
            foot_runs.append(
                f"- **{run_fn[run['dir']]}** [{rel}]({rel}/README.md): method `{s['method']['arg']}`, "
                f"{s.get('n_complete', '?')}/{s.get('n_expected', '?')} images, commit `{commit}`, "
                f"created {s.get('created', '?')}"
            )
        metric = _metric_of(col)
        params = s.get("parameters") or {}
        conv = ((params.get("metrics") or {}).get(metric) or {}).get("convention") or "convention not recorded"
        crop = params.get("crop_border", 0)
        pid = proto_id(f"`{metric}` as run: {conv} (crop_border {crop})")
        rel = os.path.relpath(run["dir"], base)
        return f"[{_fmt(v, col)}]({rel}/README.md) {run_fn[run['dir']]}·{pid}"

    def pub_cell(p, col: str) -> str:
        if col not in p.values:
            return "-"
        if p.source not in src_fn:
            src_fn[p.source] = f"s{len(src_fn) + 1}"
            foot_src.append(f"- **{src_fn[p.source]}** {p.source}. Protocol: {p.protocol}")
        return f"{p.values[col]!r} {src_fn[p.source]}"  # as published, every digit

    head = ["method"] + [
        f"{_SHORT.get(k, k)} {c} {_ARROW[COLUMN_DIRECTIONS.get(c)]}".rstrip() for k, cols in spec.columns for c in cols
    ]
    lines = [f"### {spec.title} (`python -m diffbir_eval.table {name}`)", ""]
    lines += [f"_{n}_" for n in spec.notes] + [""] if spec.notes else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in ours:
        cells = []
        for k, cols in spec.columns:
            mine = [r for r in runs if r["key"] == k and r["label"] == m]
            mine.sort(key=lambda r: (not r["summary"].get("complete", False), r["dir"].name))
            for c in cols:
                cells.append(our_cell(mine[0], c) if mine else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for m in pub_methods:
        cells = []
        for k, cols in spec.columns:
            ps = [p for p in published if p.method == m and p.dataset == k]
            cells += [pub_cell(ps[0], c) if ps else "-" for c in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for m in missing:
        lines.append(f"| {m} | " + " | ".join("" for _ in head[1:]) + " |")
    if not ours:
        lines += ["", "_No run folder of ours for these datasets yet._"]
    notes = [f"- {m}: {why}" for (m, t), why in MISSING.items() if t == name]
    lines += [""] + (["Empty cells:"] + notes + [""] if notes else [])
    if foot_runs:
        lines += ["Runs (our cells link to the run folder):"] + foot_runs + [""]
    if foot_protos:
        lines += ["Protocols of our cells (from each run's summary.json):"] + foot_protos + [""]
    if foot_src:
        lines += ["Published sources:"] + foot_src + [""]
    return "\n".join(lines)


_BLOCK_RE = re.compile(
    r"<!-- diffbir_eval\.table:(?P<name>[^:\s]+):begin -->.*?<!-- diffbir_eval\.table:(?P=name):end -->", re.S
)


def read_blocks(text: str) -> list[str]:
    """Every table block (markers included) of a Markdown text, in order."""
    return [m.group(0) for m in _BLOCK_RE.finditer(text)]


def write_block(path: str | os.PathLike, name: str, text: str) -> Path:
    """Replace (or append) the block of table ``name`` in the Markdown file ``path``."""
    p = Path(path)
    begin, end = f"<!-- diffbir_eval.table:{name}:begin -->", f"<!-- diffbir_eval.table:{name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = p.read_text() if p.is_file() else ""
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + ("\n\n" if old else "") + block + "\n"
    write_text(p, new)
    return p


def metrics_block() -> str:
    """The Markdown block of the metric conventions (`diffbir_eval.metrics.convention_table`)."""
    from ..metrics import convention_table

    return (
        "### Metric conventions (`python -m diffbir_eval.table metrics`)\n\nEvery metric by its pyiqa name; a new run "
        "records this string in summary.json (parameters.metrics); the tables cite the string each run "
        "recorded itself.\n\n" + convention_table()
    )

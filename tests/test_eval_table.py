"""diffbir_eval.table: run folders in tmp_path -> one table in the paper's layout, our cells linking to their run folder
and naming run + protocol, published cells naming their source; the README block is replaced, not duplicated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffbir_eval import table as T
from diffbir_eval.published import PUBLISHED
from diffbir_eval.table.__main__ import main as table_main


def _run(
    results: Path,
    folder: str,
    dataset: str,
    method: str,
    means: dict[str, float],
    *,
    fid: float | None = None,
    down: float = 1.0,
    synthetic: dict | None = None,
    crop: int = 0,
) -> Path:
    d = results / folder
    d.mkdir(parents=True)
    summary = {
        "dataset": {
            "name": dataset,
            "arg": dataset,
            "title": dataset,
            "task": "sr",
            "scale": 4.0,
            **({"synthetic": synthetic} if synthetic else {}),
        },
        "method": {"arg": method},
        "n_complete": 3,
        "n_expected": 3,
        "complete": True,
        "metrics": {k: {"mean": v} for k, v in means.items()},
        "set_metrics": {"fid": {"value": fid}} if fid is not None else {},
        "parameters": {
            "crop_border": crop,
            "lq_downscale": down,
            "metrics": {k: {"convention": f"CONV-{k}"} for k in [*means, "fid"]},
        },
        "git": {"commit": "0123456789abcdef", "dirty": False},
        "created": "2026-12-01T00:00:00+00:00",
    }
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "metrics.csv").write_text("name," + ",".join(means) + "\n")
    return d


def test_modern_table_from_run_folders(tmp_path):
    res = tmp_path / "results"
    _run(
        res,
        "realsr_v2",
        "realsr",
        "v2",
        {"psnr": 24.5, "ssim_pyiqa": 0.7, "lpips": 0.3, "maniqa-pipal": 0.61},
        fid=130.25,
    )
    _run(res, "realsr_bicubic", "realsr", "bicubic", {"psnr": 26.0})
    _run(res, "set5_v2", "set5", "v2", {"psnr": 30.0})  # another table's dataset: not in this one
    (res / "notarun").mkdir()
    (res / "notarun" / "summary.json").write_text("{}")  # ignored: no metrics.csv
    text = T.build_table("realsr-modern", res)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert list(rows) == ["method", "v2", "bicubic", "OSEDiff (published)", "DiffBIR (paper)"]
    head = rows["method"].split(" | ")
    assert head[1:4] == ["DIV2K-val psnr ↑", "DIV2K-val ssim_pyiqa ↑", "DIV2K-val lpips ↓"] and "RealSR fid ↓" in head
    cells = dict(zip(head, rows["v2"].split(" | ")))
    assert cells["RealSR psnr ↑"] == "[24.5000](realsr_v2/README.md) r1·P1"
    assert cells["RealSR fid ↓"].startswith("[130.25](realsr_v2/README.md) r1·")
    assert cells["RealSR dists ↓"] == "-" and cells["DIV2K-val psnr ↑"] == "-"
    pub = dict(zip(head, rows["OSEDiff (published)"].split(" | ")))
    osediff = next(p for p in PUBLISHED if p.dataset == "realsr")
    assert pub["RealSR psnr ↑"] == f"{osediff.values['psnr']!r} s1" and pub["RealSR fid ↓"].startswith("123.493817")
    assert set(rows["DiffBIR (paper)"].split("|")[2:-1]) == {"  "}  # every cell empty; the note below says why
    assert "source needed" in text and "set5" not in text.split("Runs")[0]
    assert "- **r1** [realsr_v2](realsr_v2/README.md): method `v2`, 3/3 images, commit `0123456789`" in text
    assert "- **P1** `psnr` as run: CONV-psnr (crop_border 0)" in text
    assert "**s1** OSEDiff README (github.com/cswry/OSEDiff@6a7ac4f" in text and "no border crop" in text


def test_bsr_and_bfr_tables_and_readme_block(tmp_path):
    res = tmp_path / "results"
    _run(res, "realsrset_offline", "realsrset", "offline", {"niqe": 5.5, "maniqa": 0.4})
    _run(
        res,
        "faces_lq4",
        "synthetic",
        "offline",
        {"psnr": 27.0, "id_dist_dlib": 0.41},
        down=4.0,
        synthetic={"preset": "codeformer_face", "seed": 0, "hq_dir": "/x"},
    )
    bsr = T.build_table("bsr-paper", res)
    assert (
        "| offline | [0.4000](realsrset_offline/README.md) r1·P1 | [5.5000](realsrset_offline/README.md) r1·P2 |" in bsr
    )
    bfr = T.build_table("bfr-paper", res)
    assert "| offline (LQ/4) |" in bfr and "[0.4100](faces_lq4/README.md)" in bfr and "NOT comparable" in bfr
    readme = tmp_path / "README.md"
    readme.write_text("# Results\n\nkept text\n")
    for _ in range(2):  # writing twice replaces the block
        assert table_main(["bsr-paper", "--results", str(res), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert (
        text.startswith("# Results\n\nkept text\n") and text.count("<!-- diffbir_eval.table:bsr-paper:begin -->") == 1
    )
    assert "](results/realsrset_offline/README.md)" in text  # links relative to the README's folder
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        T.build_table("nope", res)
    assert table_main(["nope", "--results", str(res)]) == 2


def test_committed_runs_build():
    """The tables of results/README.md come from the committed run folders."""
    results_dir = Path(__file__).resolve().parents[1] / "results"
    text = T.build_table("bsr-paper", results_dir)
    assert "[5.6372](realsrset_offline/README.md)" in text and "[7.9696](realsrset_bicubic/README.md)" in text


def test_run_all_plans_every_method_for_each_present_set(tmp_path, data_dir, capsys):
    from diffbir_eval import run_all

    data = tmp_path / "data"
    data.mkdir()
    (data / "set5").symlink_to(data_dir / "set5")
    (data / "realsrset").mkdir()  # present but incomplete: verified and skipped
    jobs, skipped = run_all.plan(data, tmp_path / "results", ["offline", "v1-face", "v1-general", "v2.1"])
    assert [(j.dataset, j.method) for j in jobs] == [
        ("set5", "bicubic"),
        ("set5", "offline"),
        ("set5", "v1-general"),
        ("set5", "v2.1"),
    ]
    assert jobs[-1].out == tmp_path / "results" / "set5_v21"
    assert "check failed" in skipped["realsrset"] and "diffbir_eval.data fetch real47" in skipped["real47"]
    assert "GFPGAN" in skipped["lfw_test"]
    cmd = jobs[1].argv(gpus=4, device="cuda", weights_dir="W", metric_weights="M")
    assert cmd[:6] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "4", "-m"]
    assert cmd[6:] == [
        "diffbir_eval.run",
        "--dataset",
        "set5",
        "--root",
        str(data / "set5"),
        "--method",
        "offline",
        "--out",
        str(tmp_path / "results" / "set5_offline"),
        "--device",
        "cuda",
        "--weights-dir",
        "W",
        "--metric-weights",
        "M",
    ]
    faces, _ = run_all.plan(data, tmp_path / "results", ["v1-face", "v1-general"], ["celeba_test"], present_only=False)
    assert [j.method for j in faces] == ["bicubic", "v1-face"]
    text = run_all.estimate(faces, data, Path(__file__).resolve().parents[1] / "results", 2)
    assert "ESTIMATE" in text and "| celeba_test | v1-face | 3000 |" in text and "results/bench" in text


def test_published_columns_are_metric_columns():
    """Every published value sits in a column our metrics produce (a misspelt key would silently vanish)."""
    from diffbir_eval.metrics import COLUMN_DIRECTIONS

    for p in PUBLISHED:
        assert set(p.values) <= set(COLUMN_DIRECTIONS), p.values.keys() - set(COLUMN_DIRECTIONS)
        cols = {c for k, cs in T.TABLES["realsr-modern"].columns if k == p.dataset for c in cs}
        assert set(p.values) <= cols, set(p.values) - cols

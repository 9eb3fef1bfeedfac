"""diffbir_eval.run / diffbir_eval.report: interrupted runs resume to the same metrics.csv, outputs are complete, bad
configurations are refused with clear errors, outputs:DIR scoring, accelerate data parallel (2 CPU processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffbir_core.imageio import resize, save_image, to_numpy, to_tensor
from diffbir_eval.datasets import open_dataset, validate
from diffbir_eval.loop import run_eval
from diffbir_eval.methods import Method, resolve_method
from diffbir_eval.metrics import MetricWeightsError
from diffbir_eval.run import main
from diffbir_eval.store import RunConfigError, RunOptions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pairs(tmp_path) -> Path:
    """3 LQ (12x12) / GT (48x48) pairs: smooth random GT, bicubic-downscaled LQ."""
    rng = np.random.default_rng(0)
    for i in range(3):
        gt = to_numpy(resize(to_tensor(rng.random((12, 12, 3)).astype(np.float32)), (48, 48)))
        save_image(tmp_path / "gt" / f"im{i}.png", gt)
        save_image(tmp_path / "lq" / f"im{i}.png", to_numpy(resize(to_tensor(gt), (12, 12))))
    return tmp_path


def _bicubic(calls: list, fail_at: int | None = None) -> Method:
    def restore(img):
        calls.append(img.shape)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # what Ctrl-C / a kill does halfway through
        return to_numpy(resize(to_tensor(img), (img.shape[0] * 4, img.shape[1] * 4)))

    return Method("bicubic", "bicubic", restore)


def test_interrupted_run_resumes_to_the_same_metrics_csv(pairs):
    ds = validate(open_dataset(f"folder:{pairs / 'lq'}:{pairs / 'gt'}"))
    opts = RunOptions(metrics=["psnr", "ssim"], verbose=False)
    full = pairs / "full"
    run_eval(ds, "bicubic", full, opts, method=_bicubic([]))

    part = pairs / "part"
    calls: list = []
    with pytest.raises(KeyboardInterrupt):
        run_eval(ds, "bicubic", part, opts, method=_bicubic(calls, fail_at=3))
    rows = (part / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 2 and not (part / "metrics.csv").exists()
    with open(part / "rows.jsonl", "a") as f:
        f.write('{"name": "im2", "values": {"psnr": 1')  # a kill in the middle of writing a row
    calls2: list = []
    summary = run_eval(ds, "bicubic", part, opts, method=_bicubic(calls2))
    assert len(calls2) == 1  # only the image without a row was restored again
    assert (part / "metrics.csv").read_text() == (full / "metrics.csv").read_text()
    assert summary["complete"] and summary["n_images"] == 3
    # a later run asking for one more metric computes only that one, for every image
    calls3: list = []
    run_eval(
        ds, "bicubic", part, RunOptions(metrics=["psnr", "ssim", "psnr_rgb"], verbose=False), method=_bicubic(calls3)
    )
    assert len(calls3) == 3
    head = (part / "metrics.csv").read_text().splitlines()[0]
    assert head == "name,psnr,ssim,psnr_rgb"


KILLER = """
import os, signal, sys
import numpy as np
from diffbir_core.imageio import resize, to_numpy, to_tensor
from diffbir_eval.datasets import open_dataset, validate
from diffbir_eval.loop import run_eval
from diffbir_eval.methods import Method
from diffbir_eval.store import RunOptions
calls = []
def restore(img):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 halfway: no cleanup of any kind
    return to_numpy(resize(to_tensor(img), (img.shape[0] * 4, img.shape[1] * 4)))
ds = validate(open_dataset(sys.argv[1]))
run_eval(ds, "bicubic", sys.argv[2], RunOptions(metrics=["psnr", "ssim"], verbose=False),
         method=Method("bicubic", "bicubic", restore))
"""


def test_killed_run_resumes_to_the_same_metrics_csv(pairs):
    ds_arg = f"folder:{pairs / 'lq'}:{pairs / 'gt'}"
    out = pairs / "killed"
    r = subprocess.run(
        [sys.executable, "-c", KILLER, ds_arg, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert r.returncode == -9, r.stderr[-2000:]
    assert len((out / "rows.jsonl").read_text().splitlines()) == 2 and not (out / "metrics.csv").exists()
    assert (
        main(["--dataset", ds_arg, "--method", "bicubic", "--metrics", "psnr,ssim", "--out", str(out), "--quiet"]) == 0
    )
    assert len((out / "rows.jsonl").read_text().splitlines()) == 3  # only the missing image was redone
    full = pairs / "uninterrupted"
    assert (
        main(["--dataset", ds_arg, "--method", "bicubic", "--metrics", "psnr,ssim", "--out", str(full), "--quiet"]) == 0
    )
    assert (out / "metrics.csv").read_text() == (full / "metrics.csv").read_text()


def test_cli_writes_tables_summary_plots_and_report(pairs, capsys):
    out = pairs / "results" / "bic"
    args = [
        "--dataset",
        f"folder:{pairs / 'lq'}:{pairs / 'gt'}",
        "--method",
        "bicubic",
        "--metrics",
        "psnr,ssim",
        "--out",
        str(out),
        "--save-images",
        "--quiet",
    ]
    assert main(args) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0] == "name,psnr,ssim" and [r.split(",")[0] for r in rows[1:]] == ["im0", "im1", "im2"]
    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] and s["metrics"]["psnr"]["higher_better"] is True and s["directions"]["ssim"] == "higher"
    assert s["dataset"]["scale"] == 4 and s["seed"] == 231 and "code_sha256" in s["git"] and s["versions"]["torch"]
    assert "commit" in s["git"] and s["command"].startswith("python -m diffbir_eval.run")
    psnrs = [float(r.split(",")[1]) for r in rows[1:]]
    assert s["metrics"]["psnr"]["mean"] == pytest.approx(np.mean(psnrs))
    assert "| psnr |" in (out / "README.md").read_text() and (out / "plots" / "distributions.png").is_file()
    assert len(list((out / "images").glob("*.png"))) == 3

    # the same images scored as another method's outputs give the same numbers
    out2 = pairs / "results" / "scored"
    assert (
        main(
            [
                "--dataset",
                f"folder:{pairs / 'lq'}:{pairs / 'gt'}",
                "--method",
                f"outputs:{out / 'images'}",
                "--metrics",
                "psnr,ssim",
                "--out",
                str(out2),
                "--quiet",
            ]
        )
        == 0
    )
    assert (out2 / "metrics.csv").read_text() == (out / "metrics.csv").read_text()

    # the same --out with another method is refused
    assert (
        main(
            [
                "--dataset",
                f"folder:{pairs / 'lq'}:{pairs / 'gt'}",
                "--method",
                f"outputs:{pairs / 'gt'}",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )
    assert "already holds a different run" in capsys.readouterr().err

    from diffbir_eval.report.__main__ import main as report_main

    assert report_main(["--results", str(pairs / "results")]) == 0
    text = (pairs / "results" / "README.md").read_text()
    assert "| bicubic | 3/3 |" in text and f"outputs:{out / 'images'}" in text
    assert "psnr: 0/3 (0%)" in text  # identical images: neither beats the other
    assert text.index(f"outputs:{out / 'images'}") < text.index("| bicubic | 3/3 |")  # baseline listed last
    assert (pairs / "results" / "plots").is_dir() and list((pairs / "results" / "plots").glob("*.png"))

    # the report rewrites README.md but keeps the blocks `python -m diffbir_eval.table --write` put there
    from diffbir_eval.table.__main__ import main as table_main

    readme = pairs / "results" / "README.md"
    assert table_main(["metrics", "--results", str(pairs / "results"), "--write", str(readme)]) == 0
    block = readme.read_text()[readme.read_text().index("<!-- diffbir_eval.table:metrics:begin -->") :]
    assert block.rstrip().endswith("<!-- diffbir_eval.table:metrics:end -->") and "| `psnr` |" in block
    assert report_main(["--results", str(pairs / "results"), "--no-plots"]) == 0
    again = readme.read_text()
    assert again.count("<!-- diffbir_eval.table:metrics:begin -->") == 1 and block.rstrip() in again
    assert again.startswith("# Evaluation results") and "| bicubic | 3/3 |" in again


def test_clear_errors(pairs, capsys):
    with pytest.raises(RunConfigError, match=r"unknown method 'nope'; valid methods: bicubic, outputs:DIR, .*offline"):
        resolve_method("nope", scale=4, task="bsr")
    ds = validate(open_dataset(f"folder:{pairs / 'lq'}", scale=4))
    with pytest.raises(RunConfigError, match="psnr need ground truth"):
        run_eval(ds, "bicubic", pairs / "x", RunOptions(metrics=["psnr"], verbose=False))
    with pytest.raises(RunConfigError, match="FID needs a reference"):
        run_eval(ds, "bicubic", pairs / "x", RunOptions(metrics=["fid"], verbose=False))
    assert (
        main(
            ["--dataset", "realsrset", "--root", str(pairs / "nope"), "--method", "bicubic", "--out", str(pairs / "y")]
        )
        == 2
    )
    assert "is not a folder" in capsys.readouterr().err
    (pairs / "partial_outputs").mkdir()
    save_image(pairs / "partial_outputs" / "im0.png", np.zeros((48, 48, 3), np.float32))
    with pytest.raises(RunConfigError, match=r"2 of 3 images have no output file .*'im1', 'im2'"):
        run_eval(
            validate(open_dataset(f"folder:{pairs / 'lq'}:{pairs / 'gt'}")),
            f"outputs:{pairs / 'partial_outputs'}",
            pairs / "w",
            RunOptions(metrics=["psnr"], verbose=False),
        )
    # a method returning the wrong size is caught, not scored
    bad = Method("bad", "bicubic", lambda img: img)
    with pytest.raises(RuntimeError, match="gave a 12x12 image for im0; expected 48x48"):
        run_eval(
            validate(open_dataset(f"folder:{pairs / 'lq'}:{pairs / 'gt'}")),
            "bad",
            pairs / "z",
            RunOptions(metrics=["psnr"], verbose=False),
            method=bad,
        )


def test_missing_metric_weights_fail_once_listing_every_file(pairs, monkeypatch, capsys):
    """All metric files are resolved up front: one error names every missing one, before anything is written."""
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFBIR_CACHE", str(pairs / "diffbir_cache"))
    monkeypatch.delenv("DIFFBIR_METRIC_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(pairs / "torch_hub"))
    (pairs / "empty").mkdir()
    out = pairs / "never"
    assert (
        main(
            [
                "--dataset",
                f"folder:{pairs / 'lq'}:{pairs / 'gt'}",
                "--method",
                "bicubic",
                "--metrics",
                "psnr,lpips,dists,fid",
                "--metric-weights",
                str(pairs / "empty"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err and "4 file(s), 4 not found" in err
    for f in (
        "alexnet-owt-7be5be79.pth",
        "vgg16-397923af.pth",
        "DISTS_weights-f5e65c96.pth",
        "pt_inception-2015-12-05-6726825d.pth",
    ):
        assert f in err
    assert not out.exists()  # nothing was started
    # no GT: the FID reference statistics named by --fid-ref are in the same single list
    with pytest.raises(MetricWeightsError) as e:
        run_eval(
            validate(open_dataset(f"folder:{pairs / 'lq'}", scale=4)),
            "bicubic",
            out,
            RunOptions(
                metrics=["niqe_matlab", "fid"],
                fid_ref="fid_ffhq512",
                verbose=False,
                metric_weights=str(pairs / "empty"),
            ),
        )
    msg = str(e.value)
    assert "3 file(s), 3 not found" in msg and "ffhq_clean_trainval70k_512.npz" in msg
    assert "niqe_matlab_params.mat" in msg and "for the FID reference statistics (--fid-ref)" in msg
    assert not out.exists()


def test_out_that_cannot_be_a_folder_is_one_line(pairs, monkeypatch, capsys):
    ds_arg = f"folder:{pairs / 'lq'}:{pairs / 'gt'}"
    (pairs / "a_file").write_text("x")
    for out, says in (
        (pairs / "a_file", "exists and is not a folder"),
        (pairs / "a_file" / "run", "is a file, not a folder"),
    ):
        assert main(["--dataset", ds_arg, "--method", "bicubic", "--metrics", "psnr", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}") and says in err and len(err.strip().splitlines()) == 1
    assert (pairs / "a_file").read_text() == "x"
    # a read-only place (root ignores permission bits, so the probe write is made to fail as EROFS does)
    import errno

    import diffbir_eval.store as store

    def read_only(folder):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))

    monkeypatch.setattr(store, "probe_writable", read_only)
    ro = ["--dataset", ds_arg, "--method", "bicubic", "--metrics", "psnr", "--out", str(pairs / "ro")]
    assert main(ro) == 2
    err = capsys.readouterr().err
    assert "cannot write into the folder" in err and "[EROFS]" in err and len(err.strip().splitlines()) == 1
    assert not (pairs / "ro" / "run.json").exists()


def test_cleaner_and_preset_methods(pairs):
    """METHOD as a stage-1 cleaner and as a restore preset (the pipeline); both are restore_fn(img) -> img."""
    img = np.random.default_rng(0).random((8, 10, 3)).astype(np.float32)
    cleaner = resolve_method("offline", scale=4, task="bsr")
    preset = resolve_method("preset:offline", scale=4, task="bsr")
    assert cleaner.kind == "cleaner" and preset.kind == "preset" and preset.info["params"]["upscale"] == 4
    out = cleaner.restore(img)
    assert out.shape == (32, 40, 3) and np.array_equal(out, preset.restore(img))


def test_finalize_a_stopped_run(pairs):
    ds = validate(open_dataset(f"folder:{pairs / 'lq'}:{pairs / 'gt'}"))
    out = pairs / "stopped"
    with pytest.raises(KeyboardInterrupt):
        run_eval(ds, "bicubic", out, RunOptions(metrics=["psnr"], verbose=False), method=_bicubic([], fail_at=2))
    assert (
        main(
            [
                "--dataset",
                f"folder:{pairs / 'lq'}:{pairs / 'gt'}",
                "--method",
                "bicubic",
                "--metrics",
                "psnr",
                "--out",
                str(out),
                "--finalize",
                "--quiet",
            ]
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    assert s["n_images"] == 1 and s["n_expected"] == 3 and not s["complete"]
    assert "incomplete run" in (out / "README.md").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="tests the CPU (gloo) path; GPUs take --multi_gpu")
def test_accelerate_two_cpu_processes(pairs):
    ds_arg = f"folder:{pairs / 'lq'}:{pairs / 'gt'}"
    single = pairs / "single"
    assert (
        main(["--dataset", ds_arg, "--method", "bicubic", "--metrics", "psnr,ssim", "--out", str(single), "--quiet"])
        == 0
    )
    multi = pairs / "multi"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # no GPU here: accelerate's multi-process launcher starts 2 processes, diffbir_eval.run joins them with gloo on
    # the CPU
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "diffbir_eval.run",
        "--dataset",
        ds_arg,
        "--method",
        "bicubic",
        "--metrics",
        "psnr,ssim",
        "--out",
        str(multi),
        "--quiet",
        "--threads",
        "1",
    ]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (multi / "rows.jsonl").is_file() and (multi / "rows.rank1.jsonl").is_file()  # both processes worked
    assert (multi / "metrics.csv").read_text() == (single / "metrics.csv").read_text()

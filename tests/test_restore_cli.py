"""The restore CLI end to end on the offline preset (real converted Real-ESRGAN x4plus)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffbir_core.cli import collect_inputs, main


def _img(path, size=(12, 10), color=(120, 60, 30)):
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = color
    arr[::2, ::2] = 255
    Image.fromarray(arr).save(path)
    return path


def test_folder_mixing_good_and_bad_files(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    _img(src / "good1.png")
    _img(src / "good2.jpg", size=(9, 7))
    (src / "empty.png").write_bytes(b"")
    (src / "text.jpg").write_text("hello")
    data = (src / "good1.png").read_bytes()
    (src / "trunc.png").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    rc = main([str(src), "--output", str(out), "--preset", "offline", "--upscale", "2", "-q"])
    captured = capsys.readouterr()
    assert rc == 1  # something failed, and the exit status says so
    assert sorted(p.name for p in out.iterdir()) == ["good1.json", "good1.png", "good2.json", "good2.png"]
    side = json.loads((out / "good1.json").read_text())  # seed + parameters next to each output (issue 14)
    assert side["seed"] == 231 and side["params"]["upscale"] == 2.0 and side["input"] == str(src / "good1.png")
    assert json.loads(Image.open(out / "good1.png").text["diffbir"]) == json.loads(json.dumps(side))
    assert Image.open(out / "good1.png").size == (24, 20)
    assert Image.open(out / "good2.png").size == (18, 14)
    for bad in ("empty.png", "text.jpg", "trunc.png"):
        assert bad in captured.err
    assert "restored 2" in captured.out and "failed 3" in captured.out


def test_skip_existing_and_overwrite(tmp_path, capsys):
    src = _img(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main([str(src), "-o", str(out), "--upscale", "1", "-q"]) == 0
    assert "restored 1" in capsys.readouterr().out
    restored = np.asarray(Image.open(out / "a.png"))
    # an existing output that differs from what the CLI writes: left untouched without --overwrite ...
    _img(out / "a.png", size=(3, 2), color=(1, 2, 3))
    stale = (out / "a.png").read_bytes()
    first = (out / "a.png").stat().st_mtime_ns
    assert main([str(src), "-o", str(out), "--upscale", "1", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "restored 0" in printed and "skipped 1" in printed
    assert (out / "a.png").read_bytes() == stale and (out / "a.png").stat().st_mtime_ns == first
    # ... and replaced by the restoration with --overwrite
    assert main([str(src), "-o", str(out), "--upscale", "1", "-q", "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "restored 1" in printed and "skipped 0" in printed
    again = Image.open(out / "a.png")
    assert again.size == (12, 10)
    np.testing.assert_array_equal(np.asarray(again), restored)


def test_python_m_diffbir_core_runs_the_cli(tmp_path):
    """``python -m diffbir_core`` is the restore CLI (diffbir_core/__main__.py)."""
    import subprocess
    import sys
    from pathlib import Path

    src = _img(tmp_path / "a.png")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "diffbir_core", str(src), "-o", str(tmp_path / "o"), "--upscale", "1", "-q"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "restored 1" in r.stdout and Image.open(tmp_path / "o" / "a.png").size == (12, 10)


def test_flag_pairs_exclude_each_other(tmp_path, capsys):
    src = _img(tmp_path / "a.png")
    for pair in (["--aligned", "--whole-photo"], ["--tiled", "--no-tiled"]):
        with pytest.raises(SystemExit) as e:
            main([str(src), "-o", str(tmp_path / "o"), *pair])
        assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_rgba_and_one_pixel_inputs(tmp_path):
    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(np.array([[[9, 9, 9]]], np.uint8)).save(tmp_path / "dot.png")
    out = tmp_path / "out"
    assert main([str(tmp_path / "alpha.png"), str(tmp_path / "dot.png"), "-o", str(out), "--upscale", "2", "-q"]) == 0
    a = Image.open(out / "alpha.png")
    assert a.mode == "RGBA" and a.size == (10, 12)
    assert Image.open(out / "dot.png").size == (2, 2)


def test_globs_and_missing_inputs(tmp_path, capsys):
    _img(tmp_path / "x1.png")
    _img(tmp_path / "x2.png")
    files, problems = collect_inputs([str(tmp_path / "x*.png"), str(tmp_path / "nothing*.png")])
    assert [f.name for f in files] == ["x1.png", "x2.png"] and len(problems) == 1
    assert main([str(tmp_path / "nothing.png"), "-o", str(tmp_path / "o")]) == 2


def test_invalid_params_are_usage_errors(tmp_path, capsys):
    src = _img(tmp_path / "a.png")
    assert main([str(src), "-o", str(tmp_path / "o"), "--steps", "0"]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err


def test_missing_diffusion_weights_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFBIR_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    src = _img(tmp_path / "a.png")
    rc = main([str(src), "-o", str(tmp_path / "o"), "--preset", "v2", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "Missing weights" in err and "DIFFBIR_WEIGHTS_DIR" in err


@pytest.mark.slow
def test_face_task_whole_photo_offline(tmp_path, data_dir, capsys):
    """--task face on a real whole photo, fully offline: dlib finds the face, the offline cleaner restores
    it, the background is bicubic, and the output keeps the input size (upscale 1)."""
    src = data_dir / "faces" / "whole" / "diffbir_Audrey_Hepburn.jpg"
    out = tmp_path / "out"
    rc = main(
        [
            str(src),
            "-o",
            str(out),
            "--task",
            "face",
            "--whole-photo",
            "--upscale",
            "1",
            "--background",
            "bicubic",
            "--face-backend",
            "dlib",
            "-q",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    res = np.asarray(Image.open(out / "diffbir_Audrey_Hepburn.png"), dtype=np.float32)
    inp = np.asarray(Image.open(src).convert("RGB"), dtype=np.float32)
    assert res.shape == inp.shape
    # the face region changed (restored), the corners (background, bicubic x1 = identity) did not
    h, w = inp.shape[:2]
    assert np.abs(res[:20, :20] - inp[:20, :20]).mean() < 2.0
    assert (
        np.abs(res[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] - inp[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]).mean()
        > 1.0
    )


def test_gpu_only_speed_options_refused_on_cpu(tmp_path, capsys):
    src = _img(tmp_path / "a.png")
    assert main([str(src), "-o", str(tmp_path / "o"), "--precision", "bfloat16", "-q"]) == 2
    assert "GPU-only" in capsys.readouterr().err
    assert main([str(src), "-o", str(tmp_path / "o"), "--offload", "model", "-q"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_flags_map_onto_restore_params():
    from diffbir_core.cli import build_parser, params_from_args
    from diffbir_core.config import RestoreParams

    args = build_parser().parse_args(
        [
            "x.png",
            "-o",
            "o",
            "--preset",
            "v2",
            "--cfg-scale",
            "3",
            "--steps",
            "20",
            "--guidance-scale",
            "0.5",
            "--guidance-start",
            "800",
            "--whole-photo",
            "--max-faces",
            "2",
            "--background",
            "bicubic",
            "--no-tiled",
            "--tile-size",
            "256",
            "--seed",
            "-1",
            "--task",
            "face",
        ]
    )
    assert params_from_args(args) == RestoreParams.from_preset(
        "v2",
        cfg_scale=3.0,
        steps=20,
        guidance__scale=0.5,
        guidance__t_start=800,
        face__aligned=False,
        face__max_faces=2,
        face__background="bicubic",
        tiles__enabled=False,
        tiles__cleaner_tile=256,
        seed=None,
        task="face",
        device="cpu",
    )
    plain = params_from_args(build_parser().parse_args(["x.png", "-o", "o", "--preset", "v2.1"]))
    assert plain == RestoreParams.from_preset("v2.1")  # no flags: exactly the preset


def test_step_bar_counts_stage2_steps_inside_each_image(tmp_path):
    """run_batch with ``steps``: restore gets a callback, and a per-step bar (tqdm's own n/total) runs under the
    image bar; face mode's several runs restart it."""
    import io
    from types import SimpleNamespace

    from diffbir_core import batch

    src = tmp_path / "in"
    src.mkdir()
    _img(src / "a.png")
    _img(src / "b.png")
    plan = batch.plan_outputs(sorted(src.iterdir()), tmp_path / "out")
    seen = []

    def restore(img, callback=None):
        assert callback is not None
        for _run in range(2):  # e.g. one face, then the background
            for k in range(7):
                callback(SimpleNamespace(step=k))
                assert (callback.bar.n, callback.bar.total) == (k + 1, 7)  # tqdm's own count drives n/total + ETA
        seen.append(callback.runs)
        return SimpleNamespace(image=img.rgb, alpha=None, seed=5, params=None, notices=[], timings={})

    stream = io.StringIO()
    summary = batch.run_batch(plan, restore, steps=7, stream=stream)
    assert summary.done == 2 and seen == [2, 2]
    text = stream.getvalue()
    assert "stage 2" in text and "/7 [" in text and "step/s" in text
    assert json.loads((tmp_path / "out" / "a.json").read_text())["seed"] == 5

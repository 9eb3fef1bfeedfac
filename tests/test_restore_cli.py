"""The restore CLI end to end on the offline preset (real converted Real-ESRGAN x4plus)."""
from __future__ import annotations

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
    assert sorted(p.name for p in out.iterdir()) == ["good1.png", "good2.png"]
    assert Image.open(out / "good1.png").size == (24, 20)
    assert Image.open(out / "good2.png").size == (18, 14)
    for bad in ("empty.png", "text.jpg", "trunc.png"):
        assert bad in captured.err
    assert "restored 2" in captured.out and "failed 3" in captured.out


def test_skip_existing_and_overwrite(tmp_path, capsys):
    src = _img(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main([str(src), "-o", str(out), "--upscale", "1", "-q"]) == 0
    first = (out / "a.png").stat().st_mtime_ns
    assert main([str(src), "-o", str(out), "--upscale", "1", "-q"]) == 0
    assert "skipped 1" in capsys.readouterr().out and (out / "a.png").stat().st_mtime_ns == first
    assert main([str(src), "-o", str(out), "--upscale", "1", "-q", "--overwrite"]) == 0


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
    rc = main([str(src), "-o", str(out), "--task", "face", "--whole-photo", "--upscale", "1",
               "--background", "bicubic", "--face-backend", "dlib", "-q"])
    assert rc == 0, capsys.readouterr().err
    res = np.asarray(Image.open(out / "diffbir_Audrey_Hepburn.png"), dtype=np.float32)
    inp = np.asarray(Image.open(src).convert("RGB"), dtype=np.float32)
    assert res.shape == inp.shape
    # the face region changed (restored), the corners (background, bicubic x1 = identity) did not
    h, w = inp.shape[:2]
    assert np.abs(res[:20, :20] - inp[:20, :20]).mean() < 2.0
    assert np.abs(res[h // 4: 3 * h // 4, w // 4: 3 * w // 4] - inp[h // 4: 3 * h // 4, w // 4: 3 * w // 4]).mean() > 1.0


def test_gpu_only_speed_options_refused_on_cpu(tmp_path, capsys):
    src = _img(tmp_path / "a.png")
    assert main([str(src), "-o", str(tmp_path / "o"), "--precision", "bfloat16", "-q"]) == 2
    assert "GPU-only" in capsys.readouterr().err
    assert main([str(src), "-o", str(tmp_path / "o"), "--offload", "model", "-q"]) == 2
    assert "CUDA" in capsys.readouterr().err

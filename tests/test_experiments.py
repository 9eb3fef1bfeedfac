"""Smoke tests of experiments/train_stage1 (the scripts behind results/train_stage1).

Known answers: the PSNR pair on a constant offset d is 20 log10(1/d) (RGB) and 20 log10(255 / (219 d)) (BT.601
Y, studio swing); the checkpoint method equals the SwinIR run by hand (reflect pad to its multiple, crop back,
clamp) - the old scripts' own restore; evaluate and diagnose write their tables for a 2-step tiny run.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from diffbir_core.imageio import crop_to, pad_to_multiple, save_image, to_numpy, to_tensor
from diffbir_core.models.swinir import load_swinir
from diffbir_core.train import TRAIN_PRESETS, train
from experiments.train_stage1 import diagnose, evaluate
from experiments.train_stage1.common import checkpoint_method, checkpoints, load_run, psnr_rgb_y, skimage_rgb


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    r = np.random.default_rng(seed)
    img = np.stack([0.5 + 0.4 * np.sin(9 * x + 4 * y), 0.5 + 0.4 * np.cos(7 * y), (x + y) / 2], -1)
    return np.clip(img + r.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)


def test_psnr_pair_known_answers():
    hq = np.full((16, 16, 3), 0.5, np.float32)
    rgb, y = psnr_rgb_y(hq + 0.1, hq)
    assert rgb == pytest.approx(20.0, abs=1e-4)  # mse 0.01 on [0, 1]
    assert y == pytest.approx(20 * math.log10(255 / (219 * 0.1)), abs=1e-4)  # dY = 219/255 d
    assert psnr_rgb_y(np.full_like(hq, 1.7), np.ones_like(hq))[0] == math.inf  # clipped to [0, 1] first


def test_skimage_rgb():
    assert skimage_rgb("camera").shape[2] == 3  # grey -> RGB
    assert skimage_rgb("stereo_motorcycle").ndim == 3  # the left view of the pair
    with pytest.raises(ValueError, match="not an RGB photo"):
        skimage_rgb("camera", color_only=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stage1")
    for i, hw in enumerate([(40, 48), (48, 40)]):
        save_image(root / "hq" / f"{i}.png", _photo(*hw, seed=i))
    save_image(root / "heldout" / "butterfly.png", _photo(36, 44, seed=9))
    cfg = replace(
        TRAIN_PRESETS["tiny_cpu_stage1"],
        data=str(root / "hq"),
        out_dir=str(root / "run"),
        max_steps=2,
        ckpt_every=1,
        log_every=1,
    )
    torch.set_num_threads(1)
    train(cfg)
    return root / "run", root / "heldout"


def test_checkpoint_method_is_the_padded_swinir(tiny_run):
    run, heldout = tiny_run
    _, scfg = load_run(run)
    ck = checkpoints(run)[-1]
    lq = _photo(36, 44, seed=3)  # not a multiple of the SwinIR's pad multiple
    model = load_swinir(ck / "swinir.pth", scfg)
    x, hw = pad_to_multiple(to_tensor(lq), scfg.pad_multiple)
    with torch.no_grad():
        ref = np.clip(to_numpy(crop_to(model(x), hw)), 0, 1)
    np.testing.assert_allclose(checkpoint_method(ck, scfg).restore(lq), ref, atol=1e-6)


def test_evaluate_and_diagnose_write_their_tables(tiny_run, tmp_path):
    run, heldout = tiny_run
    out = tmp_path / "out"
    evaluate.main(["--run", str(run), "--heldout", str(heldout), "--out", str(out), "--draws", "2"])
    with (out / "checkpoints.csv").open() as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [1, 2]
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["draw_seed"]) for r in rows] == [("butterfly.png", "1000"), ("butterfly.png", "1001")]
    s = json.loads((out / "summary.json").read_text())
    assert s["pairs"] == 2 and s["checkpoint_step"] == 2
    assert s["mean_gain_db"] == pytest.approx(np.mean([float(r["gain"]) for r in rows]), abs=1e-3)
    assert (out / "loss_curve.png").is_file() and (out / "example.png").is_file() and (out / "log.csv").is_file()
    (tmp_path / "list.txt").write_text(str(heldout / "butterfly.png") + "\n")
    diagnose.main(
        [
            "--run",
            str(run),
            "--checkpoint",
            "0000002",
            "--images",
            str(tmp_path / "list.txt"),
            "--train",
            str(tmp_path / "list.txt"),
            "--out",
            str(out),
            "--draws",
            "1",
        ]
    )
    with (out / "diagnostics.csv").open() as f:
        diag = list(csv.DictReader(f))
    assert len(diag) == 1 and diag[0]["image"] == "butterfly.png"
    with (out / "hue_coverage.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6

"""Training (PAPER.md "Training"): tiny stage-1 runs on CPU and the stage-2 control-branch step.

Known answers: a fixed batch is overfitted (loss falls), a resumed run continues the step count and
reproduces the uninterrupted run's next losses bit-exactly, gradient accumulation equals the big batch,
checkpoints are official-layout state dicts that `load_swinir` loads strictly, configs come from
TOML/JSON/flags with clear errors.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from diffbir_core.train import TRAIN_PRESETS, TrainConfig, find_checkpoint, load_config, train
from diffbir_core.train.__main__ import main


def _image(h, w, seed):
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    r = np.random.default_rng(seed)
    f = r.uniform(3, 12, size=3)
    img = np.stack([0.5 + 0.4 * np.sin(f[0] * x + f[1] * y), 0.5 + 0.4 * np.cos(f[2] * y), (x + y) / 2], -1)
    return np.clip(img + r.normal(0, 0.01, img.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def hq_dir(tmp_path_factory) -> Path:
    from diffbir_core.imageio import save_image

    d = tmp_path_factory.mktemp("hq")
    for i, hw in enumerate([(40, 48), (36, 36), (48, 40)]):
        save_image(d / f"{i}.png", _image(*hw, seed=i))
    return d


def _tiny(hq_dir: Path, out: Path, **kw) -> TrainConfig:
    return replace(TRAIN_PRESETS["tiny_cpu_stage1"], data=str(hq_dir), out_dir=str(out), **kw)


def test_fixed_batch_overfits(hq_dir):
    from diffbir_core.data import PairedDegradationDataset, collate_pairs
    from diffbir_core.train.tasks import Stage1Task

    cfg = _tiny(hq_dir, Path("unused"))
    task = Stage1Task(cfg)
    ds = PairedDegradationDataset(hq_dir, crop=cfg.crop, seed=0)
    batch = collate_pairs([ds[(i, 0)] for i in range(3)])
    opt = torch.optim.AdamW(task.trainable(), lr=cfg.lr, weight_decay=0)
    losses = []
    for _ in range(25):
        loss = task.loss(task.model, batch, "cpu")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def test_train_resume_continues_bit_exactly(hq_dir, tmp_path):
    from diffbir_core.models.swinir import load_swinir
    from diffbir_core.train import swinir_config_for
    from diffbir_core.weights import load_state_dict

    full = train(_tiny(hq_dir, tmp_path / "full", max_steps=6, ckpt_every=3, val_data=str(hq_dir)))
    assert full["step"] == 6 and len(full["losses"]) == 6
    part = _tiny(hq_dir, tmp_path / "part", max_steps=3, ckpt_every=3)
    first = train(part)
    assert [v for _, v in first["losses"]] == [v for _, v in full["losses"][:3]]
    resumed = train(replace(part, max_steps=6, resume="latest"))
    assert resumed["step"] == 6
    assert [s for s, _ in resumed["losses"]] == [4, 5, 6]  # the step count continues
    assert [v for _, v in resumed["losses"]] == [v for _, v in full["losses"][3:]]  # bit-exact
    rows = (tmp_path / "part" / "log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4, 5, 6]
    # the final weights of both runs are identical, and the checkpoint is an official plain state dict
    ck_full, ck_part = find_checkpoint("latest", tmp_path / "full"), find_checkpoint("latest", tmp_path / "part")
    assert ck_full.name == ck_part.name == "0000006"
    sd_full = torch.load(ck_full / "swinir.pth", weights_only=True)
    sd_part = load_state_dict(ck_part / "swinir.safetensors")
    assert sd_full.keys() == sd_part.keys() and all(torch.equal(sd_full[k], sd_part[k]) for k in sd_full)
    assert "conv_first.1.weight" in sd_full and any(k.endswith("relative_position_index") for k in sd_full)
    scfg = swinir_config_for("general_v1", TRAIN_PRESETS["tiny_cpu_stage1"].swinir_overrides)
    model = load_swinir(ck_full / "swinir.pth", scfg)  # strict
    assert all(torch.equal(model.state_dict()[k], sd_full[k]) for k in sd_full)
    # validation ran and wrote its image grid and PSNR rows
    assert (tmp_path / "full" / "val" / "0000006.png").is_file()
    val_rows = (tmp_path / "full" / "val.csv").read_text().splitlines()
    assert val_rows[0].startswith("step,val_loss,psnr_lq") and len(val_rows) == 1 + 2  # steps 5 and 6


def test_gradient_accumulation_matches_big_batch(hq_dir, tmp_path):
    big = train(_tiny(hq_dir, tmp_path / "big", batch_size=2, grad_accum=1, max_steps=2, ckpt_every=2))
    acc = train(_tiny(hq_dir, tmp_path / "acc", batch_size=1, grad_accum=2, max_steps=2, ckpt_every=2))
    assert acc["step"] == 2
    np.testing.assert_allclose([v for _, v in acc["losses"]], [v for _, v in big["losses"]], rtol=1e-5)
    a = torch.load(big["checkpoint"] / "swinir.pth", weights_only=True)
    b = torch.load(acc["checkpoint"] / "swinir.pth", weights_only=True)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


def test_config_from_toml_json_and_flags(tmp_path, hq_dir):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'preset = "tiny_cpu_stage1"\nmax_steps = 7\nlr = 0.01\n'
        "swinir_overrides = { embed_dim = 8, depths = [1], num_heads = [2], "
        "window_size = 4, img_size = 4 }\n"
    )
    cfg = load_config(toml, overrides={"batch_size": "3", "val_data": "none", "face_aligned": "true"})
    assert (cfg.max_steps, cfg.lr, cfg.batch_size, cfg.crop, cfg.val_data, cfg.face_aligned) == (
        7,
        0.01,
        3,
        32,
        None,
        True,
    )
    assert cfg.swinir_overrides["embed_dim"] == 8
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"stage": "stage1", "crop": 64, "swinir_overrides": {"embed_dim": 12}}))
    assert load_config(js).crop == 64
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        load_config(overrides={"learning_rate": 1})
    with pytest.raises(ValueError, match="cannot read"):
        load_config(overrides={"max_steps": "many"})
    with pytest.raises(ValueError, match="stage must be"):
        TrainConfig(stage="stage3")
    with pytest.raises(ValueError, match="degradation"):
        TrainConfig(degradation="nope")
    # the CLI: flags over the file; a bad value is a clean exit code 2
    out = tmp_path / "cli"
    rc = main(
        [
            "stage1",
            "--config",
            str(toml),
            "--data",
            str(hq_dir),
            "--out-dir",
            str(out),
            "--max-steps",
            "2",
            "--ckpt-every",
            "2",
        ]
    )
    assert rc == 0 and (out / "checkpoints" / "0000002" / "train_state.pt").is_file()
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01
    assert main(["stage1", "--crop", "abc"]) == 2


def test_lr_schedule_warmup_cosine(hq_dir, tmp_path):
    from diffbir_core.train import lr_at

    cfg = TrainConfig(lr=1e-3, lr_schedule="cosine", warmup_steps=4, lr_min=1e-5, max_steps=104)
    assert [lr_at(cfg, s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr_at(cfg, 4) == pytest.approx(1e-3)  # cosine starts at lr ...
    assert lr_at(cfg, 54) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)  # ... is halfway at the midpoint ...
    assert lr_at(cfg, 104) == pytest.approx(1e-5)  # ... and ends at lr_min
    const = replace(cfg, lr_schedule="constant")
    assert lr_at(const, 1) == pytest.approx(5e-4) and lr_at(const, 90) == 1e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="lr_min"):
        TrainConfig(lr=1e-4, lr_min=1e-3)
    # the optimiser follows it step by step, also across a resume (logged lr = the step's lr)
    run = _tiny(hq_dir, tmp_path / "cos", max_steps=4, ckpt_every=2, lr_schedule="cosine", warmup_steps=2, lr_min=1e-4)
    train(replace(run, max_steps=2))
    train(replace(run, resume="latest"))
    rows = (tmp_path / "cos" / "log.csv").read_text().splitlines()[1:]
    logged = [float(r.split(",")[2]) for r in rows]
    assert logged == pytest.approx([lr_at(run, s) for s in range(4)], rel=1e-5)
    assert logged[0] < logged[1] == logged[2] == pytest.approx(run.lr) and logged[3] < logged[2]


def test_bad_crop_and_resume_errors(hq_dir, tmp_path):
    with pytest.raises(ValueError, match="multiple of"):
        train(_tiny(hq_dir, tmp_path / "x", crop=40))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(_tiny(hq_dir, tmp_path / "y", resume="latest"))


# ------------------------------------------------------------------------------ stage 2
def _stage2_cfg(parity_dir: Path, hq_dir: Path, out: Path, **kw) -> TrainConfig:
    c = parity_dir / "configs"
    w = parity_dir / "weights"
    values = dict(
        stage="stage2",
        data=str(hq_dir),
        out_dir=str(out),
        crop=64,
        batch_size=1,
        max_steps=1,
        num_workers=0,
        lr=1e-3,
        log_every=1,
        ckpt_every=1,
        val_every=1,
        val_images=0,
        stage2=str(c / "cldm_tiny.yaml"),
        sd_checkpoint=str(w / "sd_ldm.ckpt"),
        cleaner=str(c / "swinir_tiny.yaml"),
        cleaner_checkpoint=str(w / "swinir.pth"),
        prompt="a photo",
        prompt_dropout=0.5,
        seed=0,
    )
    values.update(kw)
    return load_config(overrides=values)


@pytest.fixture(scope="module")
def hq64_dir(tmp_path_factory) -> Path:
    from diffbir_core.imageio import save_image

    d = tmp_path_factory.mktemp("hq64")
    for i in range(2):
        save_image(d / f"{i}.png", _image(72, 80, seed=10 + i))
    return d


@pytest.mark.parity
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_stage2_step_changes_only_the_control_branch(parity_dir, hq64_dir, tmp_path, prediction):
    from diffbir_core.models.ldm import ControlNet, build_control_ldm, load_control
    from diffbir_core.train.config import stage2_config

    cfg = _stage2_cfg(
        parity_dir,
        hq64_dir,
        tmp_path / "s2",
        prediction=prediction,
        diffusion="v2.1" if prediction == "v" else "v2",
        max_steps=2,
        ckpt_every=1,
        noise_aug_timestep=100 if prediction == "v" else 0,
    )
    s2 = stage2_config(cfg.stage2)
    ref = build_control_ldm(s2, sd=cfg.sd_checkpoint)  # frozen parts as loaded + the paper's control init
    summary = train(cfg)
    model = summary["model"]
    assert summary["step"] == 2 and all(np.isfinite(v) for _, v in summary["losses"])
    for part in ("unet", "vae", "text"):  # SD untouched, bit for bit
        got, want = getattr(model, part).state_dict(), getattr(ref, part).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), part
        assert not any(p.requires_grad for p in getattr(model, part).parameters())
    got, init = model.controlnet.state_dict(), ref.controlnet.state_dict()
    changed = [k for k in init if not torch.equal(got[k], init[k])]
    assert changed, "the control branch did not learn"
    assert any(k.startswith(("controlnet_down_blocks", "controlnet_mid_block")) for k in changed)
    # the initial branch is the paper's: zero convs zero, the 4 new input channels zero, the rest = UNet
    w = init["conv_in.weight"]
    assert torch.count_nonzero(w[:, 4:]) == 0 and torch.equal(w[:, :4], ref.unet.conv_in.weight)
    # exported checkpoints load strictly with the project's control loader (official key layout)
    for ck in ("0000001", "0000002"):
        path = tmp_path / "s2" / "checkpoints" / ck / "control.pth"
        sd = torch.load(path, weights_only=True)
        assert "input_blocks.0.0.weight" in sd and sd["input_blocks.0.0.weight"].shape[1] == 8
        assert any(k.startswith("zero_convs.") for k in sd) and "middle_block_out.0.weight" in sd
        net = load_control(path, s2)
        assert isinstance(net, ControlNet)
    final = load_control(tmp_path / "s2" / "checkpoints" / "0000002" / "control.safetensors", s2).state_dict()
    assert all(torch.equal(final[k], got[k]) for k in got)


@pytest.mark.parity
def test_stage2_resume_is_bit_exact(parity_dir, hq64_dir, tmp_path):
    full = train(_stage2_cfg(parity_dir, hq64_dir, tmp_path / "full", max_steps=2))
    part = _stage2_cfg(parity_dir, hq64_dir, tmp_path / "part", max_steps=1)
    train(part)
    resumed = train(replace(part, max_steps=2, resume="latest"))
    assert [s for s, _ in resumed["losses"]] == [2]
    assert resumed["losses"][0][1] == full["losses"][1][1]


def test_sigterm_writes_a_checkpoint_and_exits(hq_dir, tmp_path):
    """`timeout` / a pre-empting scheduler sends SIGTERM: the run checkpoints the step it is at and stops."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sig"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffbir_core.train",
            "stage1",
            "--preset",
            "tiny_cpu_stage1",
            "--data",
            str(hq_dir),
            "--out-dir",
            str(out),
            "--max-steps",
            "100000",
            "--ckpt-every",
            "100000",
            "--val-every",
            "100000",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            log = out / "log.csv"
            if log.is_file() and len(log.read_text().splitlines()) >= 3:  # header + 2 steps
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    ck = find_checkpoint("latest", out)
    state = torch.load(ck / "train_state.pt", weights_only=True)
    assert state["step"] == int(ck.name) >= 2
    assert "stop requested by signal" in output


def test_csv_log_resume_drops_later_and_torn_rows(tmp_path):
    """On resume the log keeps rows up to the resumed step; a row cut short by a crash and later rows go (they
    are redone); the trimmed file is written atomically and appended rows are on disk at once (flushed)."""
    import csv

    from diffbir_core.train.loop import _CsvLog

    f = tmp_path / "log.csv"
    f.write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n4,0.")  # killed while writing step 4
    log = _CsvLog(f, ["step", "loss"], keep_until=2)
    assert f.read_text().splitlines() == ["step,loss", "1,0.5", "2,0.4"]
    log.write({"step": 3, "loss": 0.25})
    with f.open(newline="") as fh:  # read back while the writer still exists
        assert [r["loss"] for r in csv.DictReader(fh)] == ["0.5", "0.4", "0.25"]
    f.write_text("step,loss\n1,0.5\n4")  # a torn row: fewer fields than the header
    _CsvLog(f, ["step", "loss"], keep_until=10)
    assert f.read_text().splitlines() == ["step,loss", "1,0.5"]
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]  # no temporary left behind

"""Every official sampler run re-run end to end with the REAL tiny ControlLDM (fixture configs/weights).

Data-driven from the fixture folder: the model is built from ``configs/cldm_tiny.yaml`` and loaded from
``weights/sd_ldm.ckpt`` + ``weights/controlnet.pth`` through our loaders; conditions come from
``prepare_condition(swinir_out, prompt)``; the recorded noise draws are replayed in order (and must all be
used). Each run is checked teacher-forced (every step from the recorded x_t: model outputs, eps, z0_hat,
guided z0_hat, guidance deltas/losses, mean, x_prev) and end to end (z_final and the decoded image).
Covers v2.0.0 spaced sampling (CFG, control strength, latent/rgb MSE and WMSE guidance, windows, repeats),
v2.1 spaced sampling (v-prediction, zero-SNR, rescaled CFG) and the v2.0.0 "better start".
Tolerance: max|a-b| <= 1e-4 * max(1, max|ref|).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffbir_core.diffusion.cfg import CFGDenoiser
from diffbir_core.diffusion.guidance import LatentImageGuidance
from diffbir_core.diffusion.noise import ReplayNoise, TorchNoise
from diffbir_core.diffusion.samplers import sample_spaced, spaced_step
from diffbir_core.diffusion.schedule import make_spaced_schedule, make_training_schedule
from diffbir_core.stage2 import better_start_x_T

pytestmark = pytest.mark.parity

RUNS = [
    "sampler_s4_cfg1",
    "sampler_s4_cfg4_neg",
    "sampler_s10_cfg1",
    "sampler_s10_cfg4_neg",
    "sampler_s4_cfg4_neg_strength0.5",
    "guided_mse_latent_r1",
    "guided_mse_latent_r2",
    "guided_mse_latent_r1_window",
    "guided_mse_latent_r1_s10",
    "guided_mse_rgb_r1",
    "guided_mse_rgb_r2",
    "guided_wmse_rgb_r1",
    "guided_wmse_rgb_r2",
    "guided_wmse_rgb_r1_cfg1",
    "v21_spaced_v_zsnr_s4_cfg1",
    "v21_spaced_v_zsnr_s4_cfg4_neg",
    "v21_spaced_v_zsnr_s10_cfg4_neg_rescalecfg",
]

WORST: dict[str, float] = {}


def close(a, ref, what, family):
    assert a.shape == ref.shape, f"{what}: shape {tuple(a.shape)} != {tuple(ref.shape)}"
    scale = max(1.0, float(ref.abs().max()))
    dev = float((a.double() - ref.double()).abs().max()) / scale
    WORST[family] = max(WORST.get(family, 0.0), dev)
    assert dev <= 1e-4, f"{what}: max|a-b| / max(1,|ref|) = {dev:.3e} > 1e-4"


@pytest.fixture(scope="module")
def ldm(parity_dir):
    import yaml

    from diffbir_core.models.ldm import Stage2Config, build_control_ldm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest (and is what the fixtures were made with)
    cfg = Stage2Config.from_official(yaml.safe_load((parity_dir / "configs" / "cldm_tiny.yaml").read_text()))
    yield build_control_ldm(
        cfg, sd=parity_dir / "weights" / "sd_ldm.ckpt", control=parity_dir / "weights" / "controlnet.pth"
    )
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def conds(parity_dir, ldm):
    meta = json.loads((parity_dir / "meta.json").read_text())
    clean = load_file(parity_dir / "tensors" / "swinir.safetensors")["swinir_out"]
    with torch.no_grad():
        return {which: ldm.prepare_condition(clean, [meta["prompts"][which]]) for which in ("cat", "neg")}


@pytest.fixture(scope="module")
def runs(parity_dir):
    r = dict(json.loads((parity_dir / "meta.json").read_text())["runs"])
    r.update(json.loads((parity_dir / "meta_v21.json").read_text())["runs"])
    return r


def build(run_name, run, ldm, conds, d, noise):
    family = "v2.1" if run_name.startswith("v21") else ("guided" if "guidance" in run else "sampler")
    strength = run.get("control_strength", 1.0)
    calls = []

    def model(x, t, cond):
        calls.append((int(t[0]), cond is conds["cat"]))
        return ldm(x, t, cond, control_scales=strength)

    den = CFGDenoiser(
        model,
        conds["cat"],
        conds["neg"] if run["cfg_scale"] != 1 else None,
        run["cfg_scale"],
        rescale=run.get("rescale_cfg", False),
    )
    g = run.get("guidance")
    guidance = None
    if g is not None:
        guidance = LatentImageGuidance(
            d["guidance_target_rgb"],
            g["scale_arg"],
            t_start=g["t_start"],
            t_stop=g["t_stop"],
            space=g["space"],
            repeat=g["repeat"],
            weighted=g["class"] == "WeightedMSEGuidance",
            encode=lambda x, eps: ldm.vae_encode(x, sample=eps is not None, noise=eps),
            decode=ldm.vae_decode,
        )
    param = "v" if family == "v2.1" else "eps"
    sched = make_spaced_schedule(make_training_schedule("v2.1" if family == "v2.1" else "v2"), run["steps"])
    return family, den, guidance, param, sched, calls


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    """Prints the worst relative deviation per family at the end of the module (visible with -s)."""
    yield
    print("\nworst max|a-b|/max(1,|ref|) per family: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(WORST.items())))


def check_step(d, k, info, family, run):
    v21 = family == "v2.1"
    p = f"step{k:02d}."
    close(info.model_output, d[p + ("model_output_v" if v21 else "eps")], p + "model output", family)
    close(info.pred_x0, d[p + "pred_x0"], p + "pred_x0", family)
    close(info.mean, d[p + "model_mean"], p + "model_mean", family)
    close(info.variance, d[p + "model_variance"], p + "model_variance", family)
    close(info.x_prev, d[p + "x_prev"], p + "x_prev", family)
    if "guidance" in run:
        assert info.guidance.applied == run["per_step"][k]["guidance_applied"]
        close(
            info.pred_x0_guided if info.guidance.applied else info.pred_x0,
            d[p + "pred_x0_guided"],
            p + "pred_x0_guided",
            family,
        )
        for r, rec in enumerate(info.guidance.repeats):
            close(rec.pred_x0_in, d[f"{p}rep{r}.pred_x0_in"], f"{p}rep{r}.pred_x0_in", family)
            close(rec.delta, d[f"{p}rep{r}.delta_pred_x0"], f"{p}rep{r}.delta", family)
            assert rec.loss == pytest.approx(float(d[f"{p}rep{r}.loss"]), rel=1e-4)
            if rec.target_latent is not None:
                close(rec.target_latent, d[f"{p}rep{r}.target_latent"], f"{p}rep{r}.target_latent", family)


@pytest.mark.parametrize("run_name", RUNS)
def test_official_run_with_real_model(parity_dir, ldm, conds, runs, run_name):
    d = load_file(parity_dir / "tensors" / f"{run_name}.safetensors")
    run = runs[run_name]
    if "guidance" in run:  # the official pipeline's target: stage-1 output * 2 - 1 (README vae_input)
        vae_input = load_file(parity_dir / "tensors" / "vae.safetensors")["vae_input"]
        assert torch.equal(d["guidance_target_rgb"], vae_input)
    # 1. teacher forced: every step from the recorded x_t
    noise = ReplayNoise.from_tensors(d)
    family, den, guidance, param, sched, calls = build(run_name, run, ldm, conds, d, noise)
    with torch.no_grad():
        for k in range(run["steps"]):
            info = spaced_step(
                den,
                d[f"step{k:02d}.x_t"],
                sched,
                run["steps"] - 1 - k,
                parameterization=param,
                guidance=guidance,
                noise=noise,
                step=k,
            )
            check_step(d, k, info, family, run)
    noise.assert_exhausted()
    recorded_calls = sum(1 for key in d if ".model_out_" in key)
    assert len(calls) == recorded_calls  # cond only where the official code ran cond only
    # 2. end to end from x_T; the recorded draws are also what TorchNoise(seed) produces natively
    native = TorchNoise(run["torch_manual_seed"])
    assert all(
        torch.equal(native(tuple(d[k].shape), d[k]), d[k]) for k in sorted(k for k in d if k.startswith("noise."))
    )
    noise = ReplayNoise.from_tensors(d)
    family, den, guidance, param, sched, _ = build(run_name, run, ldm, conds, d, noise)
    with torch.no_grad():
        z = sample_spaced(den, d["x_T"], sched, parameterization=param, guidance=guidance, noise=noise)
        img = ldm.vae_decode(z)
    noise.assert_exhausted()
    close(z, d["z_final"], "z_final", family)
    close(img, d["image_decoded"], "image_decoded", family)


def test_better_start_with_real_encoder(parity_dir, ldm):
    d = load_file(parity_dir / "tensors" / "better_start.safetensors")
    noise = ReplayNoise.from_tensors(d)
    seen = {}

    def encode(x, eps):
        seen["z0"] = ldm.vae_encode(x, sample=True, noise=eps)
        return seen["z0"]

    with torch.no_grad():
        x_T = better_start_x_T(d["clean"], encode, make_training_schedule("v2"), noise)
    noise.assert_exhausted()
    close(seen["z0"], d["x_0_sampled_latent"], "better start x_0", "better_start")
    close(x_T, d["x_T"], "better start x_T", "better_start")


def test_batched_cfg_matches_sequential_with_real_model(parity_dir, ldm, conds):
    d = load_file(parity_dir / "tensors" / "sampler_s4_cfg4_neg.safetensors")
    x, t = d["step01.x_t"], torch.tensor([666])

    def model(x_, t_, c):
        return ldm(x_, t_, c)

    with torch.no_grad():
        seq = CFGDenoiser(model, conds["cat"], conds["neg"], 4.0)(x, t)
        bat = CFGDenoiser(model, conds["cat"], conds["neg"], 4.0, batched=True)(x, t)
    close(seq, d["step01.eps"], "sequential CFG eps", "sampler")
    close(bat, d["step01.eps"], "batched CFG eps", "sampler")

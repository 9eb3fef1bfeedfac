"""Schedules, CFG, noise sources and samplers vs the official DiffBIR fixtures (replayed model outputs).

Parity: schedule buffers (v2.0.0 and v2.1 zero-SNR) and every recorded sampler run (``sampler_*``,
``guided_*``, ``v21_spaced_*``) replayed with a fake model that returns the recorded ControlLDM outputs and
the recorded noise draws, teacher-forced step by step and end to end. Cross-checks: DDIM and the
DPM-Solver++ samplers against diffusers' schedulers; all samplers on a Gaussian toy problem with the exact
denoiser (known answer).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from toys import GaussianDenoiser

from diffbir_core.diffusion.cfg import CFGDenoiser, rescaled_cfg_scale
from diffbir_core.diffusion.guidance import GuidanceOutput, LatentImageGuidance
from diffbir_core.diffusion.k_samplers import sample_dpmpp_3m_sde
from diffbir_core.diffusion.noise import NoiseReplayError, ReplayNoise, TorchNoise
from diffbir_core.diffusion.registry import run_sampler
from diffbir_core.diffusion.samplers import (
    sample_ddim,
    sample_dpmpp_2m,
    sample_spaced,
    spaced_step,
)
from diffbir_core.diffusion.schedule import (
    DIFFUSION_PRESETS,
    DiffusionConfig,
    EDMSchedule,
    make_ddim_schedule,
    make_edm_schedule,
    make_spaced_schedule,
    make_training_schedule,
    space_timesteps,
)
from diffbir_core.stage2 import better_start_x_T

SPACED_KEYS = (
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_variance",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
)


def tol(ref: torch.Tensor) -> float:
    return 1e-4 * max(1.0, float(ref.abs().max()))


def assert_close(a: torch.Tensor, ref: torch.Tensor, what: str, atol: float | None = None) -> float:
    assert a.shape == ref.shape, f"{what}: shape {tuple(a.shape)} != {tuple(ref.shape)}"
    dev = float((a.double() - ref.double()).abs().max())
    lim = tol(ref) if atol is None else atol
    assert dev <= lim, f"{what}: max|a-b| = {dev:.3e} > {lim:.3e}"
    return dev


def assert_buffer(a: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Float buffers: same dtype, same inf positions, finite parts within ~1e-7 relative."""
    assert a.dtype == ref.dtype, f"{what}: dtype {a.dtype} != {ref.dtype}"
    assert torch.equal(torch.isinf(a), torch.isinf(ref)), f"{what}: inf positions differ"
    fin = torch.isfinite(ref)
    assert torch.equal(a[~fin], ref[~fin]), f"{what}: non-finite values differ"
    assert_close(a[fin], ref[fin], what, atol=1e-7 * max(1.0, float(ref[fin].abs().max())))


@pytest.fixture(scope="module")
def meta(parity_dir):
    runs = dict(json.loads((parity_dir / "meta.json").read_text())["runs"])
    runs.update(json.loads((parity_dir / "meta_v21.json").read_text())["runs"])
    return json.loads((parity_dir / "meta.json").read_text()), runs


# ------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------
@pytest.mark.parity
def test_training_and_spaced_schedule_parity(parity_dir, meta):
    ref = load_file(parity_dir / "tensors" / "schedule.safetensors")
    tr = make_training_schedule("v2")
    np.testing.assert_allclose(tr.betas, ref["train_betas"].numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(tr.alphas_cumprod, ref["train_alphas_cumprod"].numpy(), rtol=1e-12, atol=0)
    assert_buffer(tr.sqrt_alphas_cumprod, ref["diffusion_sqrt_alphas_cumprod_f32"], "sqrt_alphas_cumprod")
    assert_buffer(tr.sqrt_one_minus_alphas_cumprod, ref["diffusion_sqrt_one_minus_alphas_cumprod_f32"], "sqrt_1m")
    for n_str, used in meta[0]["spaced_timesteps_ascending"].items():
        n = int(n_str)
        assert sorted(space_timesteps(1000, n_str)) == used
        s = make_spaced_schedule(tr, n)
        assert s.num_steps == n
        assert torch.equal(s.timesteps, ref[f"n{n}.timesteps"])
        for k in SPACED_KEYS:
            assert_buffer(getattr(s, k), ref[f"n{n}.{k}"], f"n{n}.{k}")


@pytest.mark.parity
def test_zero_snr_schedule_parity(parity_dir):
    ref = load_file(parity_dir / "tensors" / "v21_schedule_zsnr.safetensors")
    tr = make_training_schedule("v2.1")
    assert tr.parameterization == "v"
    np.testing.assert_allclose(tr.betas, ref["zsnr_betas"].numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(tr.alphas_cumprod, ref["zsnr_alphas_cumprod"].numpy(), rtol=1e-12, atol=1e-15)
    assert tr.alphas_cumprod[-1] == 0.0 and tr.betas[-1] == 1.0
    assert_buffer(tr.sqrt_alphas_cumprod, ref["diffusion_sqrt_alphas_cumprod_f32"], "zsnr sqrt_ac")
    assert_buffer(tr.sqrt_one_minus_alphas_cumprod, ref["diffusion_sqrt_one_minus_alphas_cumprod_f32"], "zsnr sqrt_1m")
    for n in (4, 10):
        s = make_spaced_schedule(tr, n)
        assert torch.equal(s.timesteps, ref[f"n{n}.timesteps"])
        for k in SPACED_KEYS + ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            assert_buffer(getattr(s, k), ref[f"n{n}.{k}"], f"zsnr n{n}.{k}")
        assert torch.isinf(s.sqrt_recip_alphas_cumprod[-1])


@pytest.mark.parity
def test_space_timesteps_helper_and_one_step(parity_dir, meta):
    # IDDPM docstring example: 300 steps in sections [10, 15, 20]
    steps = sorted(space_timesteps(300, [10, 15, 20]))
    assert len(steps) == 45 and steps[:2] == [0, 11] and steps[-1] == 299
    assert sorted(space_timesteps(1000, "ddim4")) == [0, 250, 500, 750]
    assert sorted(space_timesteps(1000, "1")) == [0]  # the helper itself allows one step (t = 0 only) ...
    assert "IndexError" in meta[0]["make_schedule_1_step"]  # ... the official make_schedule then crashes
    with pytest.raises(ValueError, match=">= 2"):  # ... we refuse it with a clear message
        make_spaced_schedule(make_training_schedule("v2"), 1)
    with pytest.raises(ValueError, match="exceeds"):
        make_spaced_schedule(make_training_schedule("v2"), 1001)
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, "11")


@pytest.mark.parity
def test_diffusion_config_from_official(parity_dir):
    import yaml

    params = yaml.safe_load((parity_dir / "configs" / "diffusion.yaml").read_text())["params"]
    assert DiffusionConfig.from_official(params) == DIFFUSION_PRESETS["v2"]
    full = json.loads((parity_dir / "configs" / "configs.json").read_text())["official_full_size_configs"]
    v21 = next(v for k, v in full.items() if k.endswith("diffusion_v2.1.yaml"))
    assert DiffusionConfig.from_official(v21["params"]) == DIFFUSION_PRESETS["v2.1"]
    with pytest.raises(ValueError, match="beta_schedule"):
        DiffusionConfig.from_official({"beta_schedule": "cosine"})
    with pytest.raises(ValueError, match="unknown"):
        DiffusionConfig.from_official({"linear_strat": 0.1})


def test_ddim_and_edm_schedules():
    tr = make_training_schedule("v2")
    d = make_ddim_schedule(tr, 4)
    assert d.timesteps.tolist() == [1, 251, 501, 751]
    assert float(d.alphas_prev[0]) == pytest.approx(tr.alphas_cumprod[0]) and float(d.sigmas.abs().max()) == 0
    assert make_ddim_schedule(tr, 6).num_steps == 7  # official uniform stride quirk (1000 // 6 = 166)
    with pytest.raises(ValueError, match="past the schedule"):  # official: IndexError (t = 999 + 1)
        make_ddim_schedule(tr, 3)
    e = make_edm_schedule(tr, 4)
    assert e.timesteps.tolist() == [999, 749, 499, 249, 0]
    sig999 = math.sqrt((1 - tr.alphas_cumprod[999]) / tr.alphas_cumprod[999])
    assert float(e.sigmas[0]) == pytest.approx(sig999, rel=1e-6) and float(e.sigmas[-1]) == 0.0
    assert float(make_edm_schedule(tr, 4, official_sigma_max=True).sigmas[0]) == pytest.approx(1e4, rel=1e-6)
    z = make_training_schedule("v2.1")  # zero SNR: the clamp and the official overwrite agree (sigma_max 1e4)
    assert torch.equal(make_edm_schedule(z, 10).sigmas, make_edm_schedule(z, 10, official_sigma_max=True).sigmas)
    assert float(make_edm_schedule(z, 10).sigmas[0]) == pytest.approx(1e4, rel=1e-6)
    a749 = tr.alphas_cumprod[749]
    assert float(e.sigmas[1]) == pytest.approx(math.sqrt((1 - a749) / a749), rel=1e-6)
    k = make_edm_schedule(tr, 10, kind="karras")
    assert k.num_steps == 10 and torch.all(k.sigmas[:-1] > 0) and torch.all(k.sigmas[:-1].diff() < 0)
    assert torch.all(k.timesteps[:-1].diff() <= 0)


# ------------------------------------------------------------------------------------------------
# CFG and noise sources
# ------------------------------------------------------------------------------------------------
class CountingModel:
    """model(x, t, cond) = a * x + b * t/1000 with a, b depending on the condition; counts calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append((x.shape[0], cond["c_txt"][:, 0, 0].tolist()))
        a = cond["c_txt"][:, :1, :1].unsqueeze(-1)  # [B,1,1,1]
        return torch.tanh(a * x) + t.view(-1, 1, 1, 1) / 1000.0 * cond["c_img"]


@pytest.mark.parity
def test_cfg_denoiser_branches_batching_and_rescale(meta):
    x = torch.randn(2, 4, 8, 8)
    t = torch.full((2,), 500, dtype=torch.long)
    cond = {"c_txt": torch.full((2, 77, 8), 1.5), "c_img": torch.randn(2, 4, 8, 8)}
    uncond = {"c_txt": torch.full((2, 77, 8), -0.5), "c_img": cond["c_img"]}
    m = CountingModel()
    assert torch.equal(CFGDenoiser(m, cond, uncond, 1.0)(x, t), m(x, t, cond))
    assert len(m.calls) == 2  # cfg 1: only the conditional branch ran (plus the reference call)
    m.calls.clear()
    seq = CFGDenoiser(m, cond, uncond, 4.0)(x, t)
    bat = CFGDenoiser(m, cond, uncond, 4.0, batched=True)(x, t)
    assert [c[0] for c in m.calls] == [2, 2, 4]
    ref = m(x, t, uncond) + 4.0 * (m(x, t, cond) - m(x, t, uncond))
    assert_close(seq, ref, "sequential cfg", atol=1e-6)
    assert_close(bat, seq, "batched cfg", atol=1e-5)
    # v2.1 rescale_cfg: the recorded scale per step, exactly 1 (cond only) at t = 999
    used = [s["cfg_scale_used"] for s in meta[1]["v21_spaced_v_zsnr_s10_cfg4_neg_rescalecfg"]["per_step"]]
    ts = [s["t_model"] for s in meta[1]["v21_spaced_v_zsnr_s10_cfg4_neg_rescalecfg"]["per_step"]]
    assert [rescaled_cfg_scale(4.0, t_) for t_ in ts] == pytest.approx(used, rel=1e-12)
    assert rescaled_cfg_scale(4.0, 999) == 1.0 and rescaled_cfg_scale(4.0, 0) == 5.0
    m.calls.clear()
    CFGDenoiser(m, cond, uncond, 4.0, rescale=True)(x, torch.full((2,), 999, dtype=torch.long))
    assert len(m.calls) == 1
    with pytest.raises(ValueError, match="keys"):
        CFGDenoiser(m, cond, {"c_txt": cond["c_txt"]}, 4.0, batched=True)


@pytest.mark.parity
def test_noise_sources(parity_dir, meta):
    d = load_file(parity_dir / "tensors" / "sampler_s4_cfg1.safetensors")
    seed = meta[1]["sampler_s4_cfg1"]["torch_manual_seed"]
    like = torch.zeros(1, 4, 8, 8)
    tn = TorchNoise(seed)  # a private generator reproduces the official torch.manual_seed stream
    for i in range(4):
        assert torch.equal(tn((1, 4, 8, 8), like), d[f"noise.{i:03d}"])
    r = ReplayNoise.from_tensors(d)
    assert r.remaining == 4
    with pytest.raises(NoiseReplayError, match="shape"):
        r((1, 4, 4, 4), like)
    r((1, 4, 8, 8), like)
    with pytest.raises(NoiseReplayError, match="not used"):
        r.assert_exhausted()
    for _ in range(3):
        r((1, 4, 8, 8), like)
    r.assert_exhausted()
    with pytest.raises(NoiseReplayError, match="exhausted"):
        r((1, 4, 8, 8), like)


# ------------------------------------------------------------------------------------------------
# replay of the official sampler runs
# ------------------------------------------------------------------------------------------------
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


class ReplayModel:
    """Fake ControlLDM: returns the recorded raw output of the step whose model timestep is t."""

    def __init__(self, d, run):
        self.d, self.ts, self.calls = d, d["timesteps_model"].tolist(), []
        assert self.ts == run.get("timesteps_model_order", self.ts)

    def __call__(self, x, t, cond):
        k = self.ts.index(int(t[0]))
        self.calls.append((k, cond))
        return self.d[f"step{k:02d}.model_out_{cond}"]


class ReplayDeltaGuidance:
    """rgb runs without a VAE: replays the recorded latent deltas through the v2 update rule."""

    def __init__(self, d, run):
        self.d, self.run, self.ts = d, run, d["timesteps_model"].tolist()

    def __call__(self, pred_x0, *, t, x0_coef, noise):
        k = self.ts.index(t)
        g = self.run["guidance"]
        if not g["t_stop"] < t + 1 < g["t_start"]:
            return GuidanceOutput(pred_x0, pred_x0, None, False)
        assert float(1 / x0_coef.flatten()[0]) == pytest.approx(g["grad_rescale_per_step"][k], rel=1e-7)
        x0 = pred_x0
        for r in range(g["repeat"]):
            assert_close(x0, self.d[f"step{k:02d}.rep{r}.pred_x0_in"], f"step{k}.rep{r}.pred_x0_in")
            x0 = x0 + self.d[f"step{k:02d}.rep{r}.delta_pred_x0"] * (1 / x0_coef)
        return GuidanceOutput(x0, x0, None, True)


def make_guidance(d, run, noise):
    g = run.get("guidance")
    if g is None:
        return None
    if g["space"] == "rgb":
        return ReplayDeltaGuidance(d, run)
    recorded = [d[k] for k in sorted(k for k in d if k.endswith(".target_latent"))]
    state = {"i": 0}

    def encode(x, eps):  # fake VAE encoder: checks its inputs, returns the recorded sampled latent
        assert torch.equal(x, d["guidance_target_rgb"])
        assert torch.equal(eps, d[f"noise.{noise.used - 1:03d}"])  # the draw made just before
        z = recorded[state["i"]]
        state["i"] += 1
        return z

    return LatentImageGuidance(
        d["guidance_target_rgb"],
        g["scale_arg"],
        t_start=g["t_start"],
        t_stop=g["t_stop"],
        space="latent",
        repeat=g["repeat"],
        weighted=g["class"] == "WeightedMSEGuidance",
        encode=encode,
    )


def setup_run(parity_dir, run_name, runs):
    d = load_file(parity_dir / "tensors" / f"{run_name}.safetensors")
    run = runs[run_name]
    v21 = run_name.startswith("v21")
    sched = make_spaced_schedule(make_training_schedule("v2.1" if v21 else "v2"), run["steps"])
    model = ReplayModel(d, run)
    den = CFGDenoiser(
        model,
        "cond",
        "uncond" if run["cfg_scale"] != 1 else None,
        run["cfg_scale"],
        rescale=run.get("rescale_cfg", False),
    )
    return d, run, sched, model, den, ("v" if v21 else "eps")


def step_checks(d, k, info, v21, guided):
    pairs = [
        ("pred_x0", info.pred_x0),
        ("model_mean", info.mean),
        ("x_prev", info.x_prev),
        ("model_variance", info.variance),
        ("model_output_v" if v21 else "eps", info.model_output),
    ]
    if guided:
        pairs.append(("pred_x0_guided", info.pred_x0_guided if info.guidance.applied else info.pred_x0))
    return max(assert_close(v, d[f"step{k:02d}.{key}"], f"step{k}.{key}") for key, v in pairs)


@pytest.mark.parity
@pytest.mark.parametrize("run_name", RUNS)
def test_replayed_run_teacher_forced_and_end_to_end(parity_dir, meta, run_name):
    d, run, sched, model, den, param = setup_run(parity_dir, run_name, meta[1])
    guided = "guidance" in run
    # teacher forcing: each step from the recorded x_t
    noise = ReplayNoise.from_tensors(d)
    guidance = make_guidance(d, run, noise)
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
        assert info.t == run["per_step"][k]["t_model"] and info.index == run["per_step"][k]["index"]
        step_checks(d, k, info, param == "v", guided)
        if guided:
            assert info.guidance.applied == run["per_step"][k]["guidance_applied"]
            if info.guidance.applied and run["guidance"]["space"] == "latent":
                for r, rec in enumerate(info.guidance.repeats):
                    assert_close(rec.delta, d[f"step{k:02d}.rep{r}.delta_pred_x0"], f"step{k}.rep{r}.delta")
                    assert rec.loss == pytest.approx(float(d[f"step{k:02d}.rep{r}.loss"]), rel=1e-5)
                assert info.guidance.loss == pytest.approx(
                    run["per_step"][k]["guidance_loss_mean_over_repeats"], rel=1e-5
                )
    noise.assert_exhausted()
    # which branches ran: cond always, uncond only where recorded (cfg 1 / rescaled scale 1 -> cond only)
    expected = sorted((int(key[4:6]), key.rsplit("_", 1)[1]) for key in d if ".model_out_" in key)
    assert sorted(model.calls) == expected
    if "model_calls" in run:
        assert len(model.calls) == len(run["model_calls"])
    # end to end from x_T with the replayed model outputs and noise
    noise = ReplayNoise.from_tensors(d)
    infos = []
    z = sample_spaced(
        den,
        d["x_T"],
        sched,
        parameterization=param,
        guidance=make_guidance(d, run, noise),
        noise=noise,
        callback=infos.append,
    )
    noise.assert_exhausted()
    assert [i.step for i in infos] == list(range(run["steps"]))
    for k, info in enumerate(infos):
        assert_close(info.x_t, d[f"step{k:02d}.x_t"], f"e2e step{k}.x_t")
        step_checks(d, k, info, param == "v", guided)
    assert_close(z, d["z_final"], "z_final")


# ------------------------------------------------------------------------------------------------
# other samplers: diffusers cross-checks and a Gaussian known-answer problem
# ------------------------------------------------------------------------------------------------
def toy_eps(x, t):
    """A deterministic nonlinear 'model' for the cross-checks."""
    return torch.tanh(0.7 * x) * (0.5 + t.view(-1, 1, 1, 1).float() / 1000.0) + 0.1 * torch.sin(3 * x)


@pytest.mark.parametrize("param,eta", [("eps", 0.0), ("eps", 0.7), ("v", 0.0)])
def test_ddim_matches_diffusers(param, eta):
    from diffusers import DDIMScheduler

    tr = make_training_schedule("v2")
    steps = 10
    ref_s = DDIMScheduler(
        num_train_timesteps=1000,
        trained_betas=tr.betas,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon" if param == "eps" else "v_prediction",
    )
    ref_s.set_timesteps(steps)
    ours = make_ddim_schedule(tr, steps, eta=eta)
    assert ref_s.timesteps.tolist() == ours.timesteps.flip(0).tolist()
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    draws = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(100 + i)) for i in range(steps)]
    x = x_T
    for i, t in enumerate(ref_s.timesteps):
        x = ref_s.step(toy_eps(x, t.view(1)), t, x, eta=eta, variance_noise=draws[i]).prev_sample
    z = sample_ddim(toy_eps, x_T, ours, parameterization=param, noise=ReplayNoise(draws))
    assert_close(z, x, f"ddim {param} eta={eta} vs diffusers", atol=2e-4 * max(1.0, float(x.abs().max())))


def _edm_from_table(tr, ts):
    ac = tr.alphas_cumprod[ts]
    return EDMSchedule(
        sigmas=torch.tensor(np.append(((1 - ac) / ac) ** 0.5, 0.0), dtype=torch.float32),
        timesteps=torch.tensor(np.append(ts, 0), dtype=torch.long),
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 copy-keyword notice inside diffusers
@pytest.mark.parametrize("which", ["2m", "3m_ode", "3m_sde"])
def test_dpmpp_matches_diffusers(which):
    from diffusers import DPMSolverMultistepScheduler

    tr = make_training_schedule("v2")
    ts = [999, 899, 749, 599, 449, 299, 149] if which != "3m_sde" else [999, 499]
    sched = _edm_from_table(tr, np.array(ts))
    kw = {
        "num_train_timesteps": 1000,
        "trained_betas": tr.betas,
        "final_sigmas_type": "zero",
        "lower_order_final": False,
    }
    if which == "2m":
        ref_s = DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", **kw)
    elif which == "3m_ode":
        ref_s = DPMSolverMultistepScheduler(solver_order=3, algorithm_type="dpmsolver++", solver_type="heun", **kw)
    else:
        ref_s = DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++", solver_type="heun", **kw)
    ref_s.set_timesteps(timesteps=ts)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    draws = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(200 + i)) for i in range(len(ts))]
    x = x_T
    for i, t in enumerate(ref_s.timesteps):
        x = ref_s.step(toy_eps(x, t.view(1)), t, x, variance_noise=draws[i]).prev_sample
    if which == "2m":
        z = sample_dpmpp_2m(toy_eps, x_T, sched)
    else:
        noise = ReplayNoise(draws[: len(ts) - 1])  # k-diffusion draws only while sigma_next > 0
        z = sample_dpmpp_3m_sde(toy_eps, x_T, sched, eta=0.0 if which == "3m_ode" else 1.0, noise=noise)
        if which == "3m_sde":
            noise.assert_exhausted()
    assert_close(z, x, f"dpm++ {which} vs diffusers", atol=2e-4 * max(1.0, float(x.abs().max())))


@pytest.mark.parametrize("preset", ["v2", "v2.1"])
@pytest.mark.parametrize("name", ["spaced", "ddim", "edm_dpm++_2m", "edm_dpm++_3m_sde"])
def test_samplers_recover_gaussian_data(preset, name):
    """Exact denoiser for N(0.5, 0.3^2) data: unbiased mean; with 10 steps the spread is somewhat too small
    (fixed-small variance / final denoising step at sigma_min), never inflated or broken."""
    tr = make_training_schedule(preset)
    den = GaussianDenoiser(tr)
    x_T = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(7))
    z = run_sampler(name, den, x_T, tr, 10, seed=3)
    assert abs(float(z.mean()) - 0.5) < 0.03, f"{name}/{preset}: mean {float(z.mean()):.4f}"
    assert 0.15 < float(z.std()) < 0.32, f"{name}/{preset}: std {float(z.std()):.4f}"


@pytest.mark.parametrize("preset", ["v2", "v2.1"])
def test_ode_samplers_converge_to_probability_flow_solution(preset):
    """For Gaussian data the probability-flow ODE keeps xi = (x_t - sqrt(abar) mu) / sqrt(abar s^2 + 1 - abar)
    constant: the deterministic samplers must converge to that solution as the step count grows."""
    tr = make_training_schedule(preset)
    den, mu, s, p = GaussianDenoiser(tr), 0.5, 0.3, tr.parameterization
    x_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(8)).double()

    def exact(t_start, abar_end):
        a = tr.alphas_cumprod[t_start]
        xi = (x_T - math.sqrt(a) * mu) / math.sqrt(a * s * s + 1 - a)
        return math.sqrt(abar_end) * mu + math.sqrt(abar_end * s * s + 1 - abar_end) * xi

    errs = {}
    for n in (20, 200):
        d = make_ddim_schedule(tr, n)
        z = sample_ddim(den, x_T.float(), d, parameterization=p, seed=0)
        errs["ddim", n] = float((z - exact(int(d.timesteps[-1]), tr.alphas_cumprod[0])).abs().max())
        e = make_edm_schedule(tr, n)
        a_top = max(tr.alphas_cumprod[999], 1e-8)  # x_T is noise at the schedule's sigma_max
        ref = mu + s * (x_T - math.sqrt(a_top) * mu) / math.sqrt(a_top * s * s + 1 - a_top)
        errs["2m", n] = float((sample_dpmpp_2m(den, x_T.float(), e, parameterization=p) - ref).abs().max())
        errs["3m", n] = float((sample_dpmpp_3m_sde(den, x_T.float(), e, parameterization=p, eta=0.0) - ref).abs().max())
    for k in ("ddim", "2m", "3m"):
        assert errs[k, 200] < 0.04 and errs[k, 200] < errs[k, 20] / 4, errs


def test_official_sigma_max_overwrite_breaks_eps_schedule():
    """Why make_edm_schedule clamps instead of overwriting: with the v2 (eps, non-zero-SNR) schedule the
    official 1e-8 overwrite claims sigma = 1e4 at t = 999 (true 14.6) and the result is far off."""
    tr = make_training_schedule("v2")
    den = GaussianDenoiser(tr)
    x_T = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(9))
    ok = sample_dpmpp_2m(den, x_T, make_edm_schedule(tr, 10))
    bad = sample_dpmpp_2m(den, x_T, make_edm_schedule(tr, 10, official_sigma_max=True))
    assert abs(float(ok.mean()) - 0.5) < 0.03 and abs(float(bad.mean()) - 0.5) > 1.0


def test_sampler_callback_and_errors():
    tr = make_training_schedule("v2")
    den = GaussianDenoiser(tr)
    seen = []
    x_T = torch.randn(1, 4, 8, 8)
    z = run_sampler("edm_dpm++_3m_sde", den, x_T, tr, 4, seed=0, callback=seen.append)
    assert [s.t for s in seen] == [999, 749, 499, 249] and torch.equal(seen[-1].x_prev, z)
    assert all(s.pred_x0.shape == x_T.shape and s.sigma is not None for s in seen)
    with pytest.raises(ValueError, match="unknown sampler"):
        run_sampler("euler", den, x_T, tr, 4)
    with pytest.raises(ValueError, match="either"):
        sample_spaced(den, x_T, make_spaced_schedule(tr, 4), noise=TorchNoise(0), seed=1)
    with pytest.raises(ValueError, match="parameterization"):
        sample_spaced(den, x_T, make_spaced_schedule(tr, 4), parameterization="x0")
    # a seed makes runs reproducible, and ReplayNoise of the same draws gives the same result
    a = run_sampler("spaced", den, x_T, tr, 4, seed=5)
    assert torch.equal(a, run_sampler("spaced", den, x_T, tr, 4, seed=5))
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(4)]
    assert torch.equal(a, run_sampler("spaced", den, x_T, tr, 4, noise=ReplayNoise(draws)))


# ------------------------------------------------------------------------------------------------
# better start (v2.0.0)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parity
def test_better_start_with_replayed_encoder(parity_dir):
    d = load_file(parity_dir / "tensors" / "better_start.safetensors")
    noise = ReplayNoise.from_tensors(d)
    seen = {}

    def encode(x, eps):  # fake VAE: checks it gets the [0,1] low-frequency image and the first draw
        seen["x"], seen["eps"] = x, eps
        return d["x_0_sampled_latent"]

    x_T = better_start_x_T(d["clean"], encode, make_training_schedule("v2"), noise)
    noise.assert_exhausted()
    assert_close(seen["x"], d["low_freq"], "encoder input (low frequency, [0,1])")
    assert torch.equal(seen["eps"], d["noise.000"])
    assert_close(x_T, d["x_T"], "better start x_T")

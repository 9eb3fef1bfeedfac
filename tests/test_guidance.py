"""Latent image guidance (paper eqs. 5-6): weight map parity, update rules v1/v2 with known answers, the
latent-space weighted-MSE fix, and "guidance pulls every sampler toward the target" on a toy problem.

The replay of the official guided runs (latent space, teacher-forced and end to end) is in
test_schedule_samplers.py; runs that need the real VAE decoder VJP are in test_sampler_runs_parity.py.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from toys import GaussianDenoiser

from diffbir_core.diffusion.guidance import GUIDANCE_SCALE_FACTOR, LatentImageGuidance, wmse_weight_map
from diffbir_core.diffusion.noise import ReplayNoise
from diffbir_core.diffusion.registry import run_sampler
from diffbir_core.diffusion.schedule import make_training_schedule

M = torch.tensor([[0.5, 0.2, -0.1], [0.1, 0.6, 0.2], [-0.3, 0.1, 0.4], [0.2, -0.2, 0.3]])  # toy "VAE" 3 <-> 4


def toy_encode(x, eps):
    """Linear toy encoder: 8x8 average pool, 3 -> 4 channel mix; eps adds a small posterior sample."""
    z = torch.einsum("oc,bchw->bohw", M, F.avg_pool2d(x, 8))
    return z if eps is None else z + 0.05 * eps


def toy_decode(z):
    """Linear toy decoder: 4 -> 3 channel mix (M^T), nearest x8 upsampling (differentiable)."""
    return F.interpolate(torch.einsum("co,bohw->bchw", M.T, z), scale_factor=8, mode="nearest")


def two_tone_target():
    t = torch.full((1, 3, 64, 64), -0.8)
    t[..., :32, :] = 0.9
    return t


# ------------------------------------------------------------------------------------------------
# parity of the weight map
# ------------------------------------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize("run", ["guided_wmse_rgb_r1", "guided_wmse_rgb_r2", "guided_wmse_rgb_r1_cfg1"])
def test_wmse_weight_map_parity(parity_dir, run):
    d = load_file(parity_dir / "tensors" / f"{run}.safetensors")
    w = wmse_weight_map((d["guidance_target_rgb"] + 1) / 2)
    ref = d["wmse_weight_map"]
    assert w.shape == ref.shape
    assert float((w - ref).abs().max()) <= 1e-6
    assert float(w.min()) >= 0 and float(w.max()) <= 1
    # 2x2 blocks share one weight
    assert torch.equal(w[..., 0::2, 0::2], w[..., 1::2, 1::2])


# ------------------------------------------------------------------------------------------------
# update rules (known answers)
# ------------------------------------------------------------------------------------------------
def test_latent_mse_rule_v2_known_answer():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    x0 = torch.randn(1, 4, 4, 4, generator=g)
    coef = torch.tensor(0.25).view(1, 1, 1, 1)
    guid = LatentImageGuidance(target, 0.01, space="latent", repeat=2, encode=toy_encode, sample_target=False)
    out = guid(x0, t=500, x0_coef=coef)
    tl = toy_encode(target, None)
    s_int = 0.01 * GUIDANCE_SCALE_FACTOR
    expect, shift_free = x0, x0
    for r in range(2):
        delta = -s_int * 2 * (expect - tl) / tl[0].numel()
        assert torch.allclose(out.repeats[r].delta, delta, atol=1e-6)
        assert out.repeats[r].loss == pytest.approx(float(((expect - tl) ** 2).mean()), rel=1e-5)
        expect = expect + delta / coef
    assert torch.allclose(out.pred_x0, expect, atol=1e-5)
    assert out.update_pred_x0 is out.pred_x0 and out.state_shift is None and out.applied
    assert torch.equal(shift_free, x0)  # input untouched


def test_latent_mse_rule_v1_known_answer():
    g = torch.Generator().manual_seed(1)
    target = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    x0 = torch.randn(1, 4, 4, 4, generator=g)
    guid = LatentImageGuidance(target, 5.0, space="latent", repeat=3, rule="v1", encode=toy_encode, sample_target=False)
    out = guid(x0, t=10, x0_coef=0.1)  # v1 ignores the coefficient
    tl = toy_encode(target, None)
    expect, shift = x0, torch.zeros_like(x0)
    for _ in range(3):
        delta = -5.0 * 2 * (expect - tl) / tl[0].numel()  # no x3000
        expect, shift = expect + delta, shift + 0.5 * delta
    assert torch.allclose(out.pred_x0, expect, atol=1e-6)
    assert torch.allclose(out.state_shift, shift, atol=1e-6)
    assert out.update_pred_x0 is x0  # the mean is NOT recomputed from the guided x0


def test_rgb_space_vjp_known_answer():
    g = torch.Generator().manual_seed(2)
    target = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    x0 = torch.randn(1, 4, 4, 4, generator=g)
    for weighted in (False, True):
        guid = LatentImageGuidance(target, 0.5, space="rgb", weighted=weighted, decode=toy_decode)
        out = guid(x0, t=100, x0_coef=1.0)
        w = wmse_weight_map((target + 1) / 2) if weighted else torch.ones(1, 1, 32, 32)
        gimg = -0.5 * GUIDANCE_SCALE_FACTOR * 2 * w * (toy_decode(x0) - target) / target[0].numel()
        # VJP of nearest-upsample + channel mix: M @ (sum over each 8x8 block)
        expect = torch.einsum("oc,bchw->bohw", M, F.avg_pool2d(gimg, 8) * 64)
        assert torch.allclose(out.repeats[0].delta, expect, atol=1e-5)
        loss = float((w * (toy_decode(x0) - target) ** 2).mean())
        assert out.repeats[0].loss == pytest.approx(loss, rel=1e-5)


def test_guidance_window_and_noise_draws():
    target = torch.zeros(1, 3, 16, 16)
    x0 = torch.ones(1, 4, 2, 2)
    calls = []

    def enc(x, eps):
        calls.append(eps)
        return torch.zeros(1, 4, 2, 2)

    guid = LatentImageGuidance(target, 0.003, t_start=900, t_stop=300, repeat=2, encode=enc)
    active = [guid.is_active(t) for t in (999, 899, 666, 333, 300, 299, 0)]
    assert active == [False, False, True, True, True, False, False]
    noise = ReplayNoise([torch.full((1, 4, 2, 2), float(i)) for i in range(2)])
    assert not guid(x0, t=999, x0_coef=1.0, noise=noise).applied and not calls  # outside: no draws
    out = guid(x0, t=666, x0_coef=1.0, noise=noise)
    noise.assert_exhausted()  # one posterior-sample draw per repeat
    assert out.applied and [float(e[0, 0, 0, 0]) for e in calls] == [0.0, 1.0]
    with pytest.raises(ValueError, match="noise source"):
        guid(x0, t=666, x0_coef=1.0)


@pytest.mark.parity
def test_weighted_mse_in_latent_space_works(parity_dir):
    """Official v2.0.0 crashes here (3-channel gray kernel on a 4-channel latent); we pool the RGB weight map."""
    meta = json.loads((parity_dir / "meta.json").read_text())
    latent = torch.randn(1, 4, 8, 8)
    gray = torch.tensor([0.2989, 0.5870, 0.1140]).view(1, 3, 1, 1)
    with pytest.raises(RuntimeError) as err:  # what the official _get_weight does with a latent
        torch.sum(latent * gray, dim=1)
    assert str(err.value) == meta["wmse_latent"].split(": ", 1)[1]
    d = load_file(parity_dir / "tensors" / "guided_wmse_rgb_r1.safetensors")
    target = d["guidance_target_rgb"]
    guid = LatentImageGuidance(target, 0.003, space="latent", weighted=True, encode=toy_encode, sample_target=False)
    out = guid(latent, t=500, x0_coef=1.0)
    w = F.avg_pool2d(d["wmse_weight_map"], 8)  # [1,1,8,8]: the rgb weights averaged per latent pixel
    tl = toy_encode(target, None)
    expect = -0.003 * GUIDANCE_SCALE_FACTOR * 2 * w * (latent - tl) / latent[0].numel()
    assert torch.allclose(out.repeats[0].delta, expect, atol=1e-6)
    # a flat target has no edges: every weight is 1 and WMSE equals MSE
    flat = torch.full((1, 3, 64, 64), 0.2)
    kw = {"encode": toy_encode, "sample_target": False}
    a = LatentImageGuidance(flat, 0.003, weighted=True, **kw)(latent, t=5, x0_coef=1.0)
    b = LatentImageGuidance(flat, 0.003, weighted=False, **kw)(latent, t=5, x0_coef=1.0)
    assert torch.allclose(a.pred_x0, b.pred_x0)


def test_argument_errors():
    t = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="space"):
        LatentImageGuidance(t, 0.1, space="pixel", encode=toy_encode)
    with pytest.raises(ValueError, match="encode"):
        LatentImageGuidance(t, 0.1, space="latent")
    with pytest.raises(ValueError, match="decode"):
        LatentImageGuidance(t, 0.1, space="rgb")
    with pytest.raises(ValueError, match="repeat"):
        LatentImageGuidance(t, 0.1, repeat=0, encode=toy_encode)
    with pytest.raises(ValueError, match="RGB"):
        LatentImageGuidance(torch.zeros(1, 4, 16, 16), 0.1, encode=toy_encode)
    with pytest.raises(ValueError, match="rule"):
        LatentImageGuidance(t, 0.1, rule="v3", encode=toy_encode)
    with pytest.raises(ValueError, match="divisible"):
        LatentImageGuidance(torch.zeros(1, 3, 15, 16), 0.1, weighted=True, encode=toy_encode)
    with pytest.raises(ValueError, match=">= 0"):
        LatentImageGuidance(t, -1.0, encode=toy_encode)


# ------------------------------------------------------------------------------------------------
# guidance pulls every sampler toward the target
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["v2", "v2.1"])
@pytest.mark.parametrize("space", ["latent", "rgb"])
@pytest.mark.parametrize("name", ["spaced", "ddim", "edm_dpm++_2m", "edm_dpm++_3m_sde"])
def test_guidance_pulls_each_sampler_toward_target(preset, space, name):
    tr = make_training_schedule(preset)
    den, target = GaussianDenoiser(tr), two_tone_target()
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    dist = []
    for s in (0.0, 0.003, 0.01, 0.03):
        g = LatentImageGuidance(target, s, space=space, encode=toy_encode, decode=toy_decode)
        z = run_sampler(name, den, x_T, tr, 10, guidance=g, seed=1)  # same noise for every s (s=0 draws too)
        dist.append(
            float((z - toy_encode(target, None)).norm())
            if space == "latent"
            else float((toy_decode(z) - target).norm())
        )
    assert all(b < a for a, b in itertools.pairwise(dist)), f"{name}/{space}/{preset}: {dist}"
    assert dist[-1] < 0.5 * dist[0], dist


def test_rule_v1_pulls_spaced_sampler_toward_target():
    tr = make_training_schedule("v2")
    den, target = GaussianDenoiser(tr), two_tone_target()
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    dist = []
    for s in (0.0, 9.0, 30.0, 90.0):
        g = LatentImageGuidance(target, s, rule="v1", repeat=2, encode=toy_encode)
        z = run_sampler("spaced", den, x_T, tr, 10, guidance=g, seed=1)
        dist.append(float((z - toy_encode(target, None)).norm()))
    assert all(b < a for a, b in itertools.pairwise(dist)), dist

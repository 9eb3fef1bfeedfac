"""Tiling (`diffbir_core.tiling`), the VAE runner and caches (`models.vae_runner`, `models.text`), speed options.

Parity (fixture ``tiled.safetensors`` / meta.json ``sliding_windows``, official v2.0.0 helpers run on the tiny
models): ``sliding_windows``, ``gaussian_weights``, ``vae_encode_tiled(img, 64, 32)``, ``vae_decode_tiled(z, 8, 4)``
and ``predict_noise_tiled(t=500, cfg 4, tile 64 px / stride 32 px)``. The fixture README does not name the prompts
of the noise prediction; its untiled counterpart ``predict_noise_untiled_t500_cfg4`` pins them ("a photo of a
cat" / the official negative prompt), and that is checked too.

Seams: the GroupNorm-synchronised VAE equals the untiled VAE everywhere (float rounding), while the official
blend tiles do not; a Gaussian-fused tiled denoiser / cleaner around a LOCAL network equals the untiled one away
from tile borders, and the seam difference near borders is bounded by the tiny Gaussian weights there.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from diffbir_core import speed
from diffbir_core.cleaners import CLEANERS, Cleaner
from diffbir_core.config import RestoreParams, TileOptions
from diffbir_core.diffusion.cfg import CFGDenoiser
from diffbir_core.models import text, vae_runner
from diffbir_core.models.ldm import Stage2Config, build_control_ldm
from diffbir_core.tiling import cleaner as tcleaner
from diffbir_core.tiling import denoiser as tdenoiser
from diffbir_core.tiling import plan as tplan
from diffbir_core.tiling import vae_blend, vae_sync
from diffbir_core.tiling import windows as twindows


def _tol(ref: torch.Tensor) -> float:
    return 1e-4 * max(1.0, ref.abs().max().item())


def _build_tiny(parity_dir):
    cfg = Stage2Config.from_official(yaml.safe_load((parity_dir / "configs" / "cldm_tiny.yaml").read_text()))
    return build_control_ldm(
        cfg, sd=parity_dir / "weights" / "sd_ldm.ckpt", control=parity_dir / "weights" / "controlnet.pth"
    )


@pytest.fixture(scope="module")
def tiny(parity_dir):
    torch.set_num_threads(2)
    return _build_tiny(parity_dir)


@pytest.fixture(scope="module")
def ref(parity_dir):
    return load_file(parity_dir / "tensors" / "tiled.safetensors")


@pytest.fixture(scope="module")
def prompts(parity_dir):
    return json.loads((parity_dir / "meta.json").read_text())["prompts"]


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth pattern + noise in [-1, 1], [1,3,h,w]."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([torch.sin(5 * x + 3 * y), torch.cos(4 * y - 2 * x), torch.sin(7 * x * y)])[None] * 0.6
    return (img + 0.1 * torch.randn(img.shape, generator=g)).clamp(-1, 1)


# --------------------------------------------------------------------------------------------------- parity
@pytest.mark.parity
def test_sliding_windows_match_official(parity_dir):
    cases = json.loads((parity_dir / "meta.json").read_text())["sliding_windows"]
    assert cases
    for key, windows in cases.items():
        h, w, t, s = (int(n) for n in re.fullmatch(r"h(\d+)_w(\d+)_tile(\d+)_stride(\d+)", key).groups())
        assert twindows.sliding_windows(h, w, t, s) == [tuple(x) for x in windows], key


@pytest.mark.parity
def test_gaussian_weights_match_official(ref):
    keys = [k for k in ref if k.startswith("gaussian_weights_")]
    assert len(keys) == 3
    for k in keys:
        w, h = (int(p[1:]) for p in k.split("_")[-2:])
        ours = twindows.gaussian_weights(w, h)
        assert ours.dtype == torch.float64 and ours.shape == ref[k].shape
        assert torch.allclose(ours, ref[k], rtol=1e-12, atol=0), k


@pytest.mark.parity
def test_vae_encode_tiled_matches_official(tiny, ref):
    with torch.no_grad():
        ours = vae_blend.vae_encode_tiled(tiny, ref["vae_encode_tiled_in_128"], 64, 32)
        untiled = tiny.vae_encode(ref["vae_encode_tiled_in_128"])
    r = ref["vae_encode_tiled_t64_s32"]
    assert (ours - r).abs().max().item() <= _tol(r)
    assert (untiled - ref["vae_encode_untiled"]).abs().max().item() <= _tol(ref["vae_encode_untiled"])
    assert (r - ref["vae_encode_untiled"]).abs().max().item() > 100 * _tol(r)  # the official tiles differ


@pytest.mark.parity
def test_vae_decode_tiled_matches_official(tiny, ref):
    with torch.no_grad():
        ours = vae_blend.vae_decode_tiled(tiny, ref["vae_encode_tiled_t64_s32"], 8, 4)
    r = ref["vae_decode_tiled_t8_s4"]
    assert (ours - r).abs().max().item() <= _tol(r)


@pytest.mark.parity
@pytest.mark.parametrize("batched,tile_batch", [(False, 1), (True, 1), (True, 4)])
def test_predict_noise_tiled_matches_official(tiny, ref, prompts, batched, tile_batch):
    with torch.no_grad():
        c = {"c_txt": tiny.encode_text([prompts["cat"]]), "c_img": ref["tiled_c_img"]}
        u = {"c_txt": tiny.encode_text([prompts["neg"]]), "c_img": ref["tiled_c_img"]}
        t = torch.tensor([500])

        def model(x, tt, cc):
            return tiny(x, tt, cc)

        untiled = CFGDenoiser(model, c, u, 4.0)(ref["tiled_x"], t)
        tiled = tdenoiser.TiledModel(model, tile=8, stride=4, tile_batch=tile_batch)
        ours = CFGDenoiser(tiled, c, u, 4.0, batched=batched)(ref["tiled_x"], t)
    r = ref["predict_noise_tiled_t500_cfg4_tile64_stride32"]
    assert (untiled - ref["predict_noise_untiled_t500_cfg4"]).abs().max().item() <= _tol(r)
    assert (ours - r).abs().max().item() <= _tol(r)
    assert len(tiled.windows((16, 16))) == 9


# --------------------------------------------------------------------------------------------- seam-free VAE
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parity
def test_synced_vae_matches_untiled_everywhere(tiny):
    """GroupNorm statistics shared across tiles: the tiled VAE IS the untiled VAE (measured ~2e-6 relative); the
    official per-tile statistics are ~0.5 off on the same geometry (random tiny weights)."""
    img = _image(128, 192)
    with torch.no_grad():
        mean, logvar = tiny.vae_posterior(img)
        z = mean * tiny.scale_factor
        dec = tiny.vae_decode(z)
        errs = {}
        for store in (None, 8e5):  # keep every checkpoint / force recomputation from earlier ones
            m, lv = vae_sync.vae_posterior_synced(tiny, img, core=8, store_bytes=store)
            d = vae_sync.vae_decode_synced(tiny, z, core=8, store_bytes=store)
            errs[store] = (_rel(m, mean), _rel(lv, logvar), _rel(d, dec))
        blend = (
            _rel(vae_blend.vae_posterior_tiled(tiny, img, 64, 48)[0], mean),
            _rel(vae_blend.vae_decode_tiled(tiny, z, 8, 6), dec),
        )
    for e in errs.values():
        assert max(e) < 2e-5, errs
    assert min(blend) > 1000 * max(max(e) for e in errs.values()), (blend, errs)


@pytest.mark.parity
def test_synced_vae_sampled_statistics_and_cost_model(tiny):
    img = _image(128, 128, seed=3)
    with torch.no_grad():
        mean, _ = tiny.vae_posterior(img)
        approx, _ = vae_sync.vae_posterior_synced(tiny, img, core=8, stats_fraction=0.5)
    assert torch.isfinite(approx).all() and 0 < _rel(approx, mean) < 1.0
    dec_ops = vae_sync.decoder_ops(tiny.vae)
    full = vae_sync.synced_cost(dec_ops, (32, 32), 1, 4, core=8, store_bytes=None)
    tight = vae_sync.synced_cost(dec_ops, (32, 32), 1, 4, core=8, store_bytes=1e6)
    sampled = vae_sync.synced_cost(dec_ops, (32, 32), 1, 4, core=8, store_bytes=1e6, stats_fraction=0.25)
    assert 1.0 < full["factor"] < tight["factor"] and sampled["factor"] < tight["factor"]
    assert tight["store_peak_bytes"] < full["store_peak_bytes"]
    with pytest.raises(ValueError, match="stats_fraction"):
        vae_sync.vae_posterior_synced(tiny, img, core=8, stats_fraction=0)


@pytest.mark.parity
def test_decode_differentiable_is_the_blend_decoder_vjp(tiny):
    g = torch.Generator().manual_seed(5)
    z = torch.randn((1, 4, 16, 16), generator=g) * 0.5
    gout = torch.randn((1, 3, 128, 128), generator=g)
    runner = vae_runner.VAERunner(tiny, decoder=vae_runner.VAETiling("blend", tile=8, stride=4))
    z1 = z.clone().requires_grad_(True)
    y1 = runner.decode_grad(z1)
    (g1,) = torch.autograd.grad(y1, z1, grad_outputs=gout)
    z2 = z.clone().requires_grad_(True)
    y2 = vae_blend.vae_decode_tiled(tiny, z2, 8, 4)
    (g2,) = torch.autograd.grad(y2, z2, grad_outputs=gout)
    assert (y1 - y2).abs().max().item() <= _tol(y2)
    assert (g1 - g2).abs().max().item() <= 1e-4 * g2.abs().max().item()


# ----------------------------------------------------------------------------------- seams of local networks
class _LocalModel(nn.Module):
    """A denoiser with a 2-pixel receptive field: eps = conv(tanh(conv([x, c_img]))) + mean(c_txt)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.c1 = nn.Conv2d(8, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 4, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, t, cond):
        h = self.c2(torch.tanh(self.c1(torch.cat([x, cond["c_img"]], 1))))
        return h + cond["c_txt"].mean((1, 2))[:, None, None, None]


def _interior_mask(hw, windows, rf):
    """Positions that are at least ``rf`` away from every covering tile's edges (image edges excepted)."""
    h, w = hw
    ok = torch.ones(hw, dtype=torch.bool)
    for h0, h1, w0, w1 in windows:
        bad = torch.zeros(hw, dtype=torch.bool)
        if h0 > 0:
            bad[h0 : h0 + rf, w0:w1] = True
        if h1 < h:
            bad[h1 - rf : h1, w0:w1] = True
        if w0 > 0:
            bad[h0:h1, w0 : w0 + rf] = True
        if w1 < w:
            bad[h0:h1, w1 - rf : w1] = True
        ok &= ~bad
    return ok


def _seam_bound(hw, windows, rf, weights):
    """Per position: the total normalised Gaussian weight of the tiles for which it lies within ``rf`` of an
    inner tile edge (only those tiles can be wrong there)."""
    num = torch.zeros(hw, dtype=torch.float64)
    den = torch.zeros(hw, dtype=torch.float64)
    for win in windows:
        h0, h1, w0, w1 = win
        den[h0:h1, w0:w1] += weights
        near = ~_interior_mask(hw, [win], rf)[h0:h1, w0:w1]
        num[h0:h1, w0:w1] += weights * near
    return num / den


@pytest.mark.parametrize("stride", [12, 8])
def test_tiled_denoiser_seams_are_bounded(stride):
    g = torch.Generator().manual_seed(2)
    x = torch.randn((1, 4, 40, 56), generator=g)
    cond = {"c_txt": torch.randn((1, 7, 8), generator=g), "c_img": torch.randn((1, 4, 40, 56), generator=g)}
    uncond = {"c_txt": torch.randn((1, 7, 8), generator=g), "c_img": cond["c_img"]}
    model = _LocalModel()
    t = torch.tensor([300])
    with torch.no_grad():
        full = CFGDenoiser(model, cond, uncond, 3.0)(x, t)
        den = tdenoiser.TiledModel(model, tile=16, stride=stride)
        tiled = CFGDenoiser(den, cond, uncond, 3.0, batched=True)(x, t)
        crop = tdenoiser.crop_cond
        own = torch.cat(
            [
                CFGDenoiser(model, crop(cond, (40, 56), w), crop(uncond, (40, 56), w), 3.0)(
                    x[..., w[0] : w[1], w[2] : w[3]], t
                )
                .abs()
                .amax()
                .reshape(1)
                for w in den.windows((40, 56))
            ]
        )
    diff = (tiled - full).abs()[0].amax(0)
    wins = den.windows((40, 56))
    mask = _interior_mask((40, 56), wins, rf=2)
    assert mask.float().mean() > 0.3
    assert diff[mask].max().item() < 1e-5  # away from tile borders: the untiled result
    # near borders: |tiled - full| <= (weight share of the tiles that are wrong there) x (|tile out| + |full out|)
    bound = _seam_bound((40, 56), wins, 2, twindows.gaussian_weights(16, 16)) * (own.max() + full.abs().max())
    assert (diff <= bound.float() + 1e-5).all()
    assert diff.max().item() > 1e-7  # (tiles do see different padding there)
    if stride == 8:  # half-tile overlap: the seams nearly vanish
        assert diff.max().item() < 0.02 * full.abs().max().item()


class _LocalX4(nn.Module):
    """A x4 'cleaner' with a 1-pixel receptive field (conv + pixel shuffle)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(3, 48, 3, padding=1)
        self.up = nn.PixelShuffle(4)

    def forward(self, x):
        return torch.sigmoid(self.up(self.conv(x)))


def test_tiled_cleaner_matches_untiled_away_from_borders():
    base = Cleaner(CLEANERS["bsrnet"], _LocalX4())
    tiled = tcleaner.TiledCleaner(base, tile=32, overlap=8)
    x = (_image(72, 100, seed=6) + 1) / 2
    full, ours = base(x), tiled(x)
    assert ours.shape == full.shape == (1, 3, 288, 400)
    wins = twindows.rect_windows(72, 100, 32, 32, 24, 24)
    mask = _interior_mask((72, 100), wins, rf=1).repeat_interleave(4, 0).repeat_interleave(4, 1)
    diff = (ours - full).abs()[0].amax(0)
    assert diff[mask].max().item() < 1e-5
    assert diff.max().item() < 1e-3
    big = tcleaner.TiledCleaner(base, tile=128, overlap=8)  # one tile: the plain network
    assert torch.equal(big(x), full)


@pytest.mark.parity
def test_tiled_cleaner_with_swinir(parity_dir):
    from diffbir_core.models.swinir import SwinIRConfig, load_swinir

    scfg = SwinIRConfig.from_official(yaml.safe_load((parity_dir / "configs" / "swinir_tiny.yaml").read_text()))
    base = Cleaner(CLEANERS["swinir_face"], load_swinir(parity_dir / "weights" / "swinir.pth", scfg))
    x = (_image(128, 192, seed=8) + 1) / 2
    out = tcleaner.TiledCleaner(base, tile=100, overlap=32)(x)  # tile rounded down to SwinIR's multiple 64
    assert out.shape == (1, 3, 128, 192) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiple"):
        tcleaner.TiledCleaner(base, tile=32, overlap=8)(x)


# ------------------------------------------------------------------------------- stage 2 with tiling + guidance
def _params(**kw) -> RestoreParams:
    base = {
        "steps": 2,
        "sampler": "spaced",
        "cfg_scale": 4.0,
        "pos_prompt": "a photo of a cat",
        "neg_prompt": "blurry",
        "color_fix": "none",
    }
    base.update(kw)
    return RestoreParams.from_preset("v2", **base).validate()


@pytest.mark.parity
def test_sample_latent_tiled_with_cfg_and_guidance(tiny):
    from diffbir_core.stage2 import sample_latent

    clean = (_image(128, 128, seed=9) + 1) / 2
    plan = tplan.TilingPlan(
        diffusion=True,
        latent_tile=8,
        latent_stride=8,
        vae_encoder=vae_runner.VAETiling("sync", tile=8),
        vae_decoder=vae_runner.VAETiling("blend", tile=8, stride=8),
    )
    events = []
    runner = vae_runner.VAERunner(tiny, plan.vae_encoder, plan.vae_decoder, progress=events.append)
    outs = {}
    for space, scale in (("latent", 0.0), ("latent", 0.05), ("rgb", 0.05)):
        p = _params(guidance__scale=scale, guidance__space=space, guidance__loss="mse")
        outs[space, scale] = sample_latent(tiny, clean, p, seed=3, plan=plan, vae=runner, progress=events.append)
    for z in outs.values():
        assert z.shape == (1, 4, 16, 16) and torch.isfinite(z).all()
    assert {e.stage for e in events} >= {"diffusion", "vae_encoder", "vae_decoder_vjp"}
    assert not torch.allclose(outs["latent", 0.0], outs["latent", 0.05])  # guidance acts while tiled
    assert not torch.allclose(outs["latent", 0.0], outs["rgb", 0.05])
    # a plan whose tile covers the latent (and an untiled runner) gives the untiled sampler's result
    p = _params()
    z_plain = sample_latent(tiny, clean, p, seed=3)
    z_one = sample_latent(
        tiny, clean, p, seed=3, plan=tplan.TilingPlan(diffusion=True, latent_tile=16), vae=vae_runner.VAERunner(tiny)
    )
    assert (z_one - z_plain).abs().max().item() <= _tol(z_plain)


@pytest.mark.parity
def test_pipeline_stage2_with_synced_vae_matches_untiled(tiny):
    from diffbir_core.pipeline import DiffBIRPipeline

    pipe = DiffBIRPipeline(ldm=tiny)
    clean = (_image(128, 128, seed=10) + 1) / 2
    p = _params(cfg_scale=1.0, color_fix="wavelet")
    keep_a, keep_b = {}, {}
    a = pipe.run_stage2(clean, p, seed=1, keep=keep_a, plan=tplan.TilingPlan())
    sync = tplan.TilingPlan(
        vae_encoder=vae_runner.VAETiling("sync", tile=8), vae_decoder=vae_runner.VAETiling("sync", tile=8)
    )
    b = pipe.run_stage2(clean, p, seed=1, keep=keep_b, plan=sync)
    assert (keep_a["z_final"] - keep_b["z_final"]).abs().max().item() <= _tol(keep_a["z_final"])
    assert (a - b).abs().max().item() <= 1e-4
    assert pipe._text_caches[id(tiny)].misses == 1  # one prompt (cfg 1: no negative), encoded once for both runs


# ------------------------------------------------------------------------------------------- automatic plan
def test_auto_tiling_decisions():
    gib = 2**30
    p = RestoreParams.from_preset("v2")
    small = tplan.auto_tiling(p, (512, 512), "cpu", weights_bytes=int(6.7 * gib), budget_bytes=64 * gib)
    assert not small.any
    big = tplan.auto_tiling(p, (2048, 2048), "cpu", weights_bytes=int(6.7 * gib), budget_bytes=9 * gib)
    assert big.cleaner and big.diffusion and big.vae_encoder.mode == "sync" and big.vae_decoder.mode == "sync"
    assert big.vae_decoder.cost is not None and big.vae_decoder.cost <= 5.0  # 2 x max_sync_cost at most
    assert big.vae_decoder.store_gb < 9 - 6.7
    roomy = tplan.auto_tiling(p, (2048, 2048), "cpu", weights_bytes=int(6.7 * gib), budget_bytes=14 * gib)
    assert roomy.vae_decoder.mode == "sync" and roomy.vae_decoder.stats_fraction == 1.0
    assert roomy.vae_decoder.cost <= 2.5
    roomy_big = tplan.auto_tiling(p, (2048, 2048), "cpu", weights_bytes=int(6.7 * gib), budget_bytes=64 * gib)
    assert not roomy_big.any  # never tiled for speed alone (official: only when asked)
    only = tplan.auto_tiling(p.replace(tiles__diffusion=True), (2048, 2048), "cpu", budget_bytes=64 * gib)
    assert only.diffusion and not only.cleaner and only.vae_encoder.mode == only.vae_decoder.mode == "none"
    enc = tplan.auto_tiling(p.replace(tiles__vae_encoder=True), (2048, 2048), "cpu", budget_bytes=64 * gib)
    assert enc.vae_encoder.mode == "sync" and enc.vae_encoder.tile == 32 and not enc.diffusion  # 256 px official
    assert enc.vae_decoder.mode == "none" and not enc.cleaner
    small = tplan.auto_tiling(p.replace(tiles__vae_encoder=True), (128, 128), "cpu", budget_bytes=64 * gib)
    assert small.vae_encoder.mode == "none"  # HEAD pipeline.py:106-111: a tiny input is not tiled
    cl = tplan.auto_tiling(
        p.replace(tiles__cleaner=True, tiles__enabled=False), (2048, 2048), "cpu", budget_bytes=64 * gib
    )
    assert cl.cleaner and not cl.diffusion  # the per-stage switch wins over enabled=False
    off = tplan.auto_tiling(p.replace(tiles__enabled=False), (4096, 4096), "cpu", budget_bytes=gib)
    assert not off.any
    on = tplan.auto_tiling(p.replace(tiles__enabled=True), (1024, 1024), "cpu", budget_bytes=64 * gib)
    assert on.cleaner and on.diffusion and on.vae_encoder.mode == on.vae_decoder.mode == "sync"
    blend = tplan.auto_tiling(
        p.replace(tiles__enabled=True), (1024, 1024), "cpu", budget_bytes=64 * gib, vae_mode="blend"
    )
    assert blend.vae_decoder.mode == "blend"
    tiny_budget = tplan.auto_tiling(p, (2048, 2048), "cpu", weights_bytes=int(6.7 * gib), budget_bytes=7 * gib)
    assert tiny_budget.notes and tiny_budget.latent_tile <= 64
    none = tplan.auto_tiling(RestoreParams.from_preset("offline"), (4096, 4096), "cpu", budget_bytes=gib)
    assert none.cleaner and not none.diffusion and none.vae_decoder.mode == "none"
    assert tplan.estimate_stage_bytes("vae_decoder", 2 * 512 * 512) > tplan.estimate_stage_bytes(
        "vae_decoder", 512 * 512
    )
    with pytest.raises(ValueError, match="max memory"):
        tplan.memory_budget_bytes("cpu", -1)
    assert tplan.memory_budget_bytes("cpu", 3.0) == 3 * gib
    with pytest.raises(ValueError, match="unknown stage"):
        tplan.estimate_stage_bytes("unet", 10)
    d, opts = tplan.TilingPlan(), TileOptions()  # one source for the tile defaults
    assert (d.latent_tile, d.latent_stride, d.cleaner_tile, d.cleaner_overlap) == (
        opts.latent_tile,
        opts.latent_stride,
        opts.cleaner_tile,
        opts.cleaner_overlap,
    )


def test_vae_runner_imports_before_tiling():
    """models.vae_runner uses tiling.* and tiling.plan uses models.vae_runner: no import cycle either way."""
    code = (
        "import diffbir_core.models.vae_runner as r, diffbir_core.tiling.plan as p; "
        "assert p.TilingPlan().vae_decoder == r.VAETiling()"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parity
def test_pipeline_plans_from_its_models(tiny):
    from diffbir_core.pipeline import DiffBIRPipeline

    pipe = DiffBIRPipeline(ldm=tiny)
    p = RestoreParams.from_preset("v2", tiles=TileOptions(max_memory_gb=2.0))
    plan = pipe.plan_tiling(p, (2048, 2048))
    assert plan.weights_gb == pytest.approx(tplan.model_bytes(tiny) / 2**30, abs=1e-3)
    assert plan.diffusion and plan.vae_decoder.mode == "sync"
    assert pipe.plan_tiling(p.replace(tiles__max_memory_gb=64.0), (512, 512)).any is False


# ------------------------------------------------------------------------------------------- speed options
def test_speed_options_validation():
    with pytest.raises(ValueError, match="GPU-only"):
        speed.SpeedOptions(dtype="bfloat16").validate("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        speed.SpeedOptions(offload="model").validate("cpu")
    with pytest.raises(ValueError, match="attention"):
        speed.SpeedOptions(attention="flash").validate("cpu")
    with pytest.raises(ValueError, match="tile_batch"):
        speed.SpeedOptions(tile_batch=0).validate("cpu")
    assert speed.SpeedOptions().channels_last_parts("cpu") == ()
    assert speed.SpeedOptions().channels_last_parts("cuda") == ("unet", "controlnet", "vae")
    assert speed.SpeedOptions(dtype="float16").validate("cuda").torch_dtype == torch.float16


@pytest.mark.parity
def test_attention_kinds_and_offload_agree(parity_dir, ref, prompts):
    ldm = _build_tiny(parity_dir)
    c = {"c_txt": ldm.encode_text([prompts["cat"]]), "c_img": ref["tiled_c_img"]}
    t = torch.tensor([500])
    with torch.no_grad():
        n = speed.set_attention(ldm, "math")
        a = ldm(ref["tiled_x"], t, c)
        notes = speed.apply_speed_options(ldm, speed.SpeedOptions(channels_last=True), "cpu")
        b = ldm(ref["tiled_x"], t, c)
        speed.offload(ldm, torch.device("cpu"), "model")  # accelerate hooks, CPU as the "GPU"
        d = ldm(ref["tiled_x"], t, c)
    assert n > 0 and any("sdpa" in s for s in notes)
    assert (a - b).abs().max().item() <= _tol(a) and (a - d).abs().max().item() <= _tol(a)
    with speed.autocast_for("cpu", torch.bfloat16)():  # ops on autocast's list run in bf16
        assert (ref["tiled_x"][0, 0] @ ref["tiled_x"][0, 0]).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16), speed.autocast_for("cpu", torch.float32)():
        assert (ref["tiled_x"][0, 0] @ ref["tiled_x"][0, 0]).dtype == torch.float32  # float32 turns autocast off


@pytest.mark.parity
def test_text_and_posterior_caches(tiny):
    calls = []

    def enc(prompts):
        calls.append(list(prompts))
        return tiny.encode_text(prompts)

    cache = text.TextEmbeddingCache(enc, max_entries=2)
    a = cache(["x", "y", "x"])
    assert a.shape[0] == 3 and torch.equal(a[0], a[2]) and calls == [["x"], ["y"]]
    cache(["z"])  # evicts "y" (least recently used)
    cache(["x"])  # still cached
    assert calls[-1] == ["z"] and cache.misses == 3
    img = _image(64, 64)
    n_calls = []

    def post(x):
        n_calls.append(1)
        return tiny.vae_posterior(x)

    pc = vae_runner.PosteriorCache(post, tiny.scale_factor)
    eps = torch.randn((1, 4, 8, 8))
    with torch.no_grad():
        assert torch.allclose(pc(img, eps), tiny.vae_encode(img, sample=True, noise=eps), atol=1e-6)
        assert torch.allclose(pc(img, None), tiny.vae_encode(img), atol=1e-6)
    assert len(n_calls) == 1


def test_stop_tiles_cuts_rounds_short():
    calls = []

    def fn(win):
        calls.append(win)
        return torch.ones((1, 2, win[1] - win[0], win[3] - win[2]))

    def progress(ev):
        if ev.index == 1:
            raise twindows.StopTiles

    out = twindows.blend_tiles(fn, (20, 20), 8, 6, progress=progress)
    assert len(calls) == 2 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="gaps"):
        twindows.blend_tiles(fn, (20, 20), 8, 10)
    with pytest.raises(ValueError, match="larger than"):
        twindows.sliding_windows(8, 8, 16, 4)

"""Opt-in approximate modes (diffbir_core/approx.py) on a tiny ControlLDM (the e2e fixture's tiny config).

Known answers come from the exact model: DeepCache's full call IS the exact forward, and a cached call on the
SAME input must reproduce it (the cached deep feature and residuals are then exactly what a full step computes),
so the shallow path is checked layer for layer against diffusers' own UNet forward; int8 must stay close to fp32.
"""

from __future__ import annotations

import pytest
import torch
import yaml

pytestmark = pytest.mark.e2e  # builds the tiny model of the e2e fixture set


@pytest.fixture(scope="module")
def tiny(e2e_dir):
    TINY = e2e_dir / "configs" / "head" / "cldm.yaml"
    from diffbir_core.models.ldm import Stage2Config, build_control_ldm

    assert TINY.is_file(), f"tiny config not found at {TINY} (set DIFFBIR_E2E_DIR)"
    torch.manual_seed(0)
    ldm = build_control_ldm(Stage2Config.from_official(yaml.safe_load(TINY.read_text()))).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the paper's init zeroes the zero convs: make the control count
        for p in ldm.controlnet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = dict(
        c_txt=torch.randn(2, 77, ldm.cfg.unet.context_dim, generator=g), c_img=torch.randn(2, 4, 16, 16, generator=g)
    )
    return ldm, x, cond


def test_deepcache_cached_call_reproduces_exact_on_same_input(tiny):
    from diffbir_core.approx import DeepCacheModel

    ldm, x, cond = tiny
    t = torch.tensor([500, 500])
    with torch.inference_mode():
        exact = ldm(x, t, cond, control_scales=0.7)
        dc = DeepCacheModel(ldm, interval=3, control_scales=0.7)
        full, cached = dc(x, t, cond), dc(x, t, cond)
        assert dc.stats == {"full": 1, "cached": 1}
        torch.testing.assert_close(full, exact, atol=1e-6, rtol=0)
        torch.testing.assert_close(cached, exact, atol=1e-5, rtol=0)
        # on a moved input the cached call is an approximation: close to, but not equal to, the exact output
        x2, t2 = x + 0.1 * torch.randn_like(x), torch.tensor([400, 400])
        approx, ref = dc(x2, t2, cond), ldm(x2, t2, cond, control_scales=0.7)
        assert dc.stats["cached"] == 2 and 0 < (approx - ref).abs().max() < ref.abs().max()
        # the 4th call is full again; interval 1 is always exact
        torch.testing.assert_close(dc(x2, t2, cond), ref, atol=1e-6, rtol=0)
        one = DeepCacheModel(ldm, interval=1)
        torch.testing.assert_close(one(x2, t2, cond), ldm(x2, t2, cond), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        DeepCacheModel(ldm, interval=0)


@pytest.mark.parametrize("backend", ["torch.ao", "auto"])
def test_int8_close_to_fp32(tiny, backend):
    import copy

    from diffbir_core.approx import quantize_linear_int8

    ldm, x, cond = tiny
    t = torch.tensor([300, 300])
    q = copy.deepcopy(ldm)
    note = quantize_linear_int8(q.unet, backend=backend)
    assert "int8" in note
    if "torch.ao" in note:  # every Linear replaced by the dynamic int8 module
        assert not any(type(m) is torch.nn.Linear for m in q.unet.modules())
    with torch.inference_mode():
        ref, got = ldm(x, t, cond), q(x, t, cond)
    err = (got - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.1, f"int8 relative error {err}"
    with pytest.raises(ValueError):
        quantize_linear_int8(q.unet, backend="nope")


def test_speed_options_run_the_approximate_modes_in_stage2(tiny):
    """`SpeedOptions(deepcache=N)` through `stage2.run` (the product path): interval 1 is the exact run bit for
    bit, interval 3 reuses features (differs, stays close), tiled diffusion is refused with a clear message;
    `SpeedOptions(int8=True)` quantises the UNet and control linears through `apply_speed_options`."""
    import copy

    from diffbir_core import stage2
    from diffbir_core.config import RestoreParams
    from diffbir_core.speed import SpeedOptions, apply_speed_options
    from diffbir_core.tiling.plan import TilingPlan

    ldm, _, _ = tiny
    torch.manual_seed(0)
    clean = torch.rand(1, 3, 64, 64)
    params = RestoreParams.from_preset(
        "v2", steps=6, sampler="spaced", cfg_scale=4.0, pos_prompt="a cat", neg_prompt="blurry", color_fix="none"
    ).validate()
    for batched in (True, False):
        exact = stage2.run(ldm, clean, params, seed=3, speed=SpeedOptions(batched_cfg=batched))
        one = stage2.run(ldm, clean, params, seed=3, speed=SpeedOptions(batched_cfg=batched, deepcache=1))
        assert torch.equal(one, exact)
        dc = stage2.run(ldm, clean, params, seed=3, speed=SpeedOptions(batched_cfg=batched, deepcache=3))
        dev = (dc - exact).abs().max()
        assert 0 < dev < 0.5 * exact.abs().max(), (batched, dev)
    tiled = TilingPlan(diffusion=True, latent_tile=4, latent_stride=2)
    with pytest.raises(ValueError, match="DeepCache .approximate. cannot run with tiled diffusion"):
        stage2.run(ldm, clean, params, seed=3, plan=tiled, speed=SpeedOptions(deepcache=3))
    with pytest.raises(ValueError, match="deepcache must be >= 0"):
        SpeedOptions(deepcache=-1).validate("cpu")
    with pytest.raises(ValueError, match="int8 .approximate. is CPU-only"):
        SpeedOptions(int8=True).validate("cuda")
    assert not SpeedOptions().approximate and not SpeedOptions(deepcache=1).approximate
    assert SpeedOptions(deepcache=2).approximate and SpeedOptions(int8=True).approximate
    q = copy.deepcopy(ldm)
    notes = apply_speed_options(q, SpeedOptions(int8=True), "cpu")
    assert sum(n.startswith("APPROXIMATE unet") or n.startswith("APPROXIMATE controlnet") for n in notes) == 2
    assert not any(type(m) is torch.nn.Linear for part in (q.unet, q.controlnet) for m in part.modules())


def test_cli_labels_and_passes_the_approximate_flags():
    from diffbir_core.cli import build_parser

    ap = build_parser()
    text = ap.format_help()
    assert text.count("APPROXIMATE") >= 2
    args = ap.parse_args(["--input", "x.png", "--output", "o", "--deepcache", "3", "--int8"])
    assert args.deepcache == 3 and args.int8
    args = ap.parse_args(["--input", "x.png", "--output", "o"])
    assert args.deepcache == 0 and not args.int8

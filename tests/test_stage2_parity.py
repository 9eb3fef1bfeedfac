"""Parity of stage 2 (VAE, OpenCLIP text tower, control branch, UNet) with the official DiffBIR v2.0.0 code.

Data-driven from the fixture folder (README "VAE and prepare_condition", "Text encoder", "Denoiser call"):
the model is built from ``configs/cldm_tiny.yaml`` and filled from the official-layout files
``weights/sd_ldm.ckpt`` and ``weights/controlnet.pth`` through our real loaders.
Tolerance: max|a-b| <= 1e-4 * max(1, max|ref|).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.parity

PROMPTS = {
    "empty": "",
    "cat": "a photo of a cat",
    "neg": "low quality, blurry, low-resolution, noisy, unsharp, weird textures",
}


def _close(got: torch.Tensor, ref: torch.Tensor, name: str) -> float:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    dev = (got.double() - ref.double()).abs().max().item()
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    assert dev <= tol, f"{name}: max|diff| {dev:.3g} > {tol:.3g}"
    return dev


@pytest.fixture(scope="module")
def tensors(parity_dir):
    from safetensors.torch import load_file

    return lambda name: load_file(str(parity_dir / "tensors" / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def cfg(parity_dir):
    import yaml

    from diffbir_core.models.ldm import Stage2Config

    return Stage2Config.from_official(yaml.safe_load((parity_dir / "configs" / "cldm_tiny.yaml").read_text()))


@pytest.fixture(scope="module")
def model(parity_dir, cfg):
    from diffbir_core.models.ldm import ControlLDM, load_control, load_sd_ldm

    torch.set_num_threads(2)
    unet, vae, text = load_sd_ldm(parity_dir / "weights" / "sd_ldm.ckpt", cfg)
    controlnet = load_control(parity_dir / "weights" / "controlnet.pth", cfg)
    return ControlLDM(unet, controlnet, vae, text, cfg.latent_scale_factor, cfg).eval()


def test_config_from_official_yaml(cfg, parity_dir):
    import json

    import yaml

    from diffbir_core.models.ldm import STAGE2_CONFIGS, Stage2Config

    # residuals of the official ControlNet, from the fixture's own config: input conv + num_res_blocks per level
    # + one downsample between levels + the middle block (official ControlNet.input_blocks / middle_block_out)
    ctrl = yaml.safe_load((parity_dir / "configs" / "cldm_tiny.yaml").read_text())["params"]["controlnet_cfg"]
    levels = len(ctrl["channel_mult"])
    assert cfg.unet.num_residuals == 1 + levels * ctrl["num_res_blocks"] + (levels - 1) + 1
    full = json.loads((parity_dir / "configs" / "configs.json").read_text())["official_full_size_configs"]
    assert Stage2Config.from_official(full["v2.0.0:configs/inference/cldm.yaml"]) == STAGE2_CONFIGS["sd21_base"]
    assert Stage2Config.from_official(full["v2.1 (3f8b530):configs/inference/cldm.yaml"]) == STAGE2_CONFIGS["sd21_base"]


def test_sd_loader_reports_unused_keys(parity_dir, cfg):
    from diffbir_core.models.ldm import load_sd_ldm

    *_, reports = load_sd_ldm(parity_dir / "weights" / "sd_ldm.ckpt", cfg, return_reports=True)
    unused = reports[-1].unexpected
    assert "cond_stage_model.model.text_projection" in unused and "cond_stage_model.model.logit_scale" in unused
    last = cfg.text.layers - 1  # penultimate: the last text block is in the file but never run
    assert any(k.startswith(f"cond_stage_model.model.transformer.resblocks.{last}.") for k in unused)
    assert not any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in unused)


@torch.no_grad()
def test_vae(model, tensors):
    ref, stage1, inp = tensors("vae"), tensors("swinir"), tensors("input")
    devs = {}
    for suf, clean in (("", stage1["swinir_out"]), ("_lq", inp["lq"])):
        x = clean * 2 - 1
        _close(x, ref[f"vae_input{suf}"], f"vae_input{suf}")
        mean, logvar = model.vae_posterior(x)
        devs[f"posterior_mean{suf}"] = _close(mean, ref[f"posterior_mean{suf}"], f"posterior_mean{suf}")
        devs[f"posterior_logvar_clamped{suf}"] = _close(logvar, ref[f"posterior_logvar_clamped{suf}"], "logvar")
        devs[f"posterior_std{suf}"] = _close(torch.exp(0.5 * logvar), ref[f"posterior_std{suf}"], "std")
        c_img = model.prepare_condition(clean, ["a photo of a cat"])["c_img"]
        devs[f"c_img{suf}"] = _close(c_img, ref[f"c_img{suf}"], f"c_img{suf}")
        devs[f"decoded{suf}"] = _close(model.vae_decode(c_img), ref[f"decoded{suf}"], f"decoded{suf}")
    # the sampled posterior uses the given noise: (mean + std * eps) * 0.18215
    eps = torch.randn(ref["posterior_mean"].shape, generator=torch.Generator().manual_seed(0))
    z = model.vae_encode(stage1["swinir_out"] * 2 - 1, sample=True, noise=eps)
    _close(z, (ref["posterior_mean"] + ref["posterior_std"] * eps) * 0.18215, "vae_encode(sample=True)")
    print("vae max|diff|:", max(devs.values()))


@torch.no_grad()
def test_text(model, tensors):
    from diffbir_core.models.text import tokenize

    ref = tensors("text")
    devs = []
    for name, prompt in PROMPTS.items():
        assert torch.equal(tokenize([prompt]), ref[f"tokens_{name}"]), f"tokens_{name}"
        devs.append(_close(model.encode_text([prompt]), ref[f"c_txt_{name}"], f"c_txt_{name}"))
    c = model.encode_text(list(PROMPTS.values()))  # batched == one by one
    for i, name in enumerate(PROMPTS):
        _close(c[i : i + 1], ref[f"c_txt_{name}"], f"batched c_txt_{name}")
    print("text max|diff|:", max(devs))


@torch.no_grad()
def test_denoiser(model, tensors):
    ref = tensors("denoiser")
    assert _close(ref["c_txt"], tensors("text")["c_txt_cat"], "c_txt") == 0.0
    cond = {"c_txt": ref["c_txt"], "c_img": ref["c_img"]}
    x = ref["x_noisy"]
    t500 = torch.tensor([500], dtype=torch.long)
    residuals = model.control(x, t500, cond)
    n_ref = len([k for k in ref if k.startswith("control_t500.")])
    assert len(residuals) == n_ref == model.cfg.unet.num_residuals
    dev_res = max(_close(r, ref[f"control_t500.{i:02d}"], f"control_t500.{i:02d}") for i, r in enumerate(residuals))
    dev_eps = 0.0
    for t in (999, 500, 1):
        for s in (1.0, 0.5):
            eps = model(x, torch.tensor([t], dtype=torch.long), cond, control_scales=s)
            dev_eps = max(dev_eps, _close(eps, ref[f"eps_t{t}_strength{s}"], f"eps_t{t}_strength{s}"))
    # per-residual scales (official list of 13) and precomputed residuals give the same result
    eps = model(x, t500, cond, control_scales=[0.5] * len(residuals), control=residuals)
    _close(eps, ref["eps_t500_strength0.5"], "eps_t500 with list scales + precomputed residuals")
    dev_eps = max(
        dev_eps,
        _close(
            model(x, t500, cond, control=None), ref["eps_unet_only_no_control_t500"], "eps_unet_only_no_control_t500"
        ),
    )
    print(f"control residual max|diff|: {dev_res:.3g}; eps max|diff|: {dev_eps:.3g}")


def test_official_layout_round_trip(parity_dir, model):
    """Exporting our modules back to the official names reproduces the official files bit for bit."""
    from diffbir_core.models.convert import SD_PREFIXES, export_control_official, keymap_for, to_official
    from diffbir_core.weights import load_state_dict

    control_file = load_state_dict(parity_dir / "weights" / "controlnet.pth")
    exported = export_control_official(model.controlnet)
    assert set(exported) == set(control_file)
    assert all(torch.equal(exported[k], control_file[k]) for k in control_file)
    sd = load_state_dict(parity_dir / "weights" / "sd_ldm.ckpt")
    for name in ("unet", "vae", "text"):
        module = getattr(model, name)
        out = to_official(module, keymap_for(module, SD_PREFIXES[name]))
        for k, v in out.items():
            assert v.shape == sd[k].shape and torch.equal(v, sd[k]), k

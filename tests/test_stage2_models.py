"""Stage-2 models without fixtures: full-size structure, the paper's control-branch init, loaders and formats.

Tiny random components on CPU (no downloads); the full SD 2.1-base size is built on the meta device
(parameter counts, official key layout), and once for real in a `slow` test (one denoiser step).
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from diffbir_core.models.ldm import STAGE2_CONFIGS, Stage2Config, TextConfig, UNetConfig, VAEConfig
from diffbir_core.weights import WeightsError

TINY = Stage2Config(
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(1,),
        num_head_channels=16,
        context_dim=32,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),  # 32 -> 64 channels: exercises nin_shortcut
    text=TextConfig(width=32, heads=2, layers=2, vocab_size=49408, layer="penultimate"),
)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1))
    return module


@pytest.fixture(scope="module")
def tiny_model():
    from diffbir_core.models.ldm import build_control_ldm

    torch.manual_seed(0)
    torch.set_num_threads(2)
    return build_control_ldm(TINY)  # random SD parts, control branch initialised from the UNet


def _inputs(batch: int = 1, hw: int = 8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, hw, hw, generator=g)
    cond = {
        "c_txt": torch.randn(batch, 77, TINY.unet.context_dim, generator=g),
        "c_img": torch.randn(batch, 4, hw, hw, generator=g),
    }
    return x, cond


# ------------------------------------------------------------------------------- full size (meta)


def test_full_size_parameter_counts_and_official_layout():
    from diffbir_core.models.convert import export_control_official, keymap_for, to_official
    from diffbir_core.models.ldm import build_controlnet, build_text, build_unet, build_vae

    cfg = STAGE2_CONFIGS["sd21_base"]
    with torch.device("meta"):
        unet, control, vae, text = build_unet(cfg), build_controlnet(cfg), build_vae(cfg), build_text(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 865_910_724  # SD 2.1-base UNet
    assert count(vae) == 83_653_863  # SD VAE
    assert count(text) == 340_387_840  # OpenCLIP ViT-H text tower, 23 of 24 blocks (penultimate)
    # control branch = UNet encoder + middle, 4 extra conv_in input channels, 12 + 1 zero convs
    enc = sum(count(getattr(unet, n)) for n in ("conv_in", "time_embedding", "down_blocks", "mid_block"))
    zero = sum(c * c + c for c in (320,) * 4 + (640,) * 3 + (1280,) * 6)
    assert count(control) == enc + 320 * 4 * 9 + zero == 363_153_280
    assert control.num_residuals == cfg.unet.num_residuals == 13
    # official control-branch layout: per level 2 x (ResBlock 10 (+2 skip) + SpatialTransformer 26), 3
    # downsamples, middle (10 + 26 + 10), time_embed 4, input conv 2, 13 zero convs
    off = export_control_official(control)
    assert len(off) == 4 + 2 + 72 + 74 + 74 + 20 + 3 * 2 + 46 + 13 * 2
    assert tuple(off["input_blocks.0.0.weight"].shape) == (320, 8, 3, 3)
    assert tuple(off["input_blocks.3.0.op.weight"].shape) == (320, 320, 3, 3)
    assert tuple(off["input_blocks.4.0.skip_connection.weight"].shape) == (640, 320, 1, 1)
    assert tuple(off["zero_convs.11.0.weight"].shape) == (1280, 1280, 1, 1)
    assert tuple(off["middle_block_out.0.weight"].shape) == (1280, 1280, 1, 1)
    assert "input_blocks.11.1.norm.weight" not in off and "input_blocks.8.1.proj_in.weight" in off
    unet_off = to_official(unet, keymap_for(unet))
    assert {
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.weight",
        "out.2.weight",
        "middle_block.1.proj_out.weight",
    } <= set(unet_off)
    vae_off = to_official(vae, keymap_for(vae))
    assert tuple(vae_off["encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    # channel-changing blocks (the SD checkpoint's nin_shortcut keys): encoder 128->256->512, decoder 512->256->128
    assert {k for k in vae_off if "nin_shortcut.weight" in k} == {
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",
        "decoder.up.1.block.0.nin_shortcut.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
    }


def test_config_from_official_rejects_mismatch():
    base = {
        "latent_scale_factor": 0.18215,
        "unet_cfg": {
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 32,
            "attention_resolutions": [1],
            "num_res_blocks": 1,
            "channel_mult": [1, 2],
            "num_head_channels": 16,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": True,
            "context_dim": 32,
        },
        "vae_cfg": {
            "embed_dim": 4,
            "ddconfig": {
                "z_channels": 4,
                "ch": 32,
                "ch_mult": [1, 2, 2, 2],
                "num_res_blocks": 1,
                "attn_resolutions": [],
            },
        },
        "clip_cfg": {"text_cfg": {"width": 32, "heads": 2, "layers": 2}, "layer": "penultimate"},
    }
    good = {**base, "controlnet_cfg": {**base["unet_cfg"], "hint_channels": 4}}
    assert Stage2Config.from_official(good) == TINY
    with pytest.raises(ValueError, match="different network"):
        Stage2Config.from_official({**base, "controlnet_cfg": {**base["unet_cfg"], "model_channels": 64}})
    with pytest.raises(ValueError, match="unsupported option"):
        Stage2Config.from_official({**good, "unet_cfg": {**base["unet_cfg"], "use_scale_shift_norm": True}})
    assert Stage2Config.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY


# ------------------------------------------------------------------------------- control branch


@torch.no_grad()
def test_from_unet_init_has_no_effect(tiny_model):
    m = tiny_model
    w_unet, w_ctrl = m.unet.conv_in.weight, m.controlnet.conv_in.weight
    assert torch.equal(w_ctrl[:, :4], w_unet) and not w_ctrl[:, 4:].any()
    for name in ("time_embedding", "down_blocks", "mid_block"):
        a, b = getattr(m.unet, name).state_dict(), getattr(m.controlnet, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, cond = _inputs(batch=2)
    t = torch.tensor([999, 3])
    residuals = m.control(x, t, cond)
    assert len(residuals) == TINY.unet.num_residuals == 5
    assert all(not r.any() for r in residuals)
    assert torch.equal(m(x, t, cond, control_scales=1.0), m(x, t, cond, control=None))


@torch.no_grad()
def test_control_scales_and_timesteps(tiny_model):
    from diffbir_core.models.ldm import ControlLDM

    m = ControlLDM(
        tiny_model.unet,
        _randomize(type(tiny_model.controlnet).from_unet(tiny_model.unet), 3),
        tiny_model.vae,
        tiny_model.text,
        TINY.latent_scale_factor,
        TINY,
    ).eval()
    x, cond = _inputs()
    t = torch.tensor([500])
    res = m.control(x, t, cond)
    assert all(r.abs().max() > 0 for r in res)
    full, half, none = m(x, t, cond, 1.0), m(x, t, cond, 0.5), m(x, t, cond, control=None)
    assert not torch.allclose(full, none) and not torch.allclose(half, full)
    assert torch.equal(m(x, t, cond, 0.0), none)
    assert torch.equal(m(x, t, cond, [0.5] * len(res), control=res), half)
    assert torch.equal(m(x, 500, cond), full)  # a plain int timestep is accepted
    with pytest.raises(ValueError, match="residuals"):
        m(x, t, cond, [1.0] * (len(res) - 1))


# ------------------------------------------------------------------------------- loaders


def test_control_file_with_wrong_key_raises(tiny_model):
    from diffbir_core.models.convert import export_control_official
    from diffbir_core.models.ldm import load_control

    sd = export_control_official(tiny_model.controlnet)
    assert load_control(sd, TINY) is not None
    bad = dict(sd)
    bad["zero_convs.0.0.weigth"] = bad.pop("zero_convs.0.0.weight")
    with pytest.raises(WeightsError) as e:
        load_control(bad, TINY)
    assert "zero_convs.0.0.weight" in str(e.value) and "zero_convs.0.0.weigth" in str(e.value)
    with pytest.raises(WeightsError, match="input_blocks.99.0.weight"):
        load_control({**sd, "input_blocks.99.0.weight": torch.zeros(1)}, TINY)
    with pytest.raises(WeightsError, match="shape"):
        load_control({**sd, "input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)}, TINY)  # no hint channels


def _official_sd(model) -> dict[str, torch.Tensor]:
    from diffbir_core.models.convert import SD_PREFIXES, keymap_for, to_official

    sd = {}
    for name in ("unet", "vae", "text"):
        module = getattr(model, name)
        sd.update(to_official(module, keymap_for(module, SD_PREFIXES[name])))
    return sd


def _equal_modules(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sd_ldm_loader_unused_keys(tiny_model, tmp_path):
    from diffbir_core.models.ldm import load_sd_ldm

    sd = _official_sd(tiny_model)
    extra = {
        "model_ema.decay": torch.tensor(0.9999),
        "betas": torch.zeros(1000),
        "cond_stage_model.model.text_projection": torch.zeros(32, 32),
        "cond_stage_model.model.transformer.resblocks.1.ln_1.weight": torch.ones(32),
    }
    torch.save({"state_dict": {**sd, **extra}}, tmp_path / "sd.ckpt")
    unet, vae, text, reports = load_sd_ldm(tmp_path / "sd.ckpt", TINY, return_reports=True)
    assert sorted(reports[-1].unexpected) == sorted(extra)
    assert _equal_modules(unet, tiny_model.unet) and _equal_modules(vae, tiny_model.vae)
    assert _equal_modules(text, tiny_model.text)
    with pytest.raises(WeightsError, match="model.diffusion_model.stray.weight"):
        load_sd_ldm({**sd, "model.diffusion_model.stray.weight": torch.zeros(1)}, TINY)
    missing = dict(sd)
    del missing["first_stage_model.encoder.mid.attn_1.q.weight"]
    with pytest.raises(WeightsError, match="first_stage_model.encoder.mid.attn_1.q.weight"):
        load_sd_ldm(missing, TINY)


def test_full_v1_checkpoint(tiny_model):
    from diffbir_core.models.convert import CONTROL_PREFIX_V1_FULL, export_control_official
    from diffbir_core.models.ldm import load_full_v1

    ctrl = _randomize(type(tiny_model.controlnet).from_unet(tiny_model.unet), 5)
    sd = _official_sd(tiny_model)
    sd.update(export_control_official(ctrl, prefix=CONTROL_PREFIX_V1_FULL))
    sd.update(
        {
            "cond_encoder." + k[len("first_stage_model.") :]: v.clone()
            for k, v in sd.items()
            if k.startswith(("first_stage_model.encoder.", "first_stage_model.quant_conv."))
        }
    )
    sd["preprocess_model.conv_first.weight"] = torch.zeros(3)  # the stage-1 SwinIR rides along
    m = load_full_v1(sd, TINY)
    assert _equal_modules(m.controlnet, ctrl) and _equal_modules(m.unet, tiny_model.unet)
    sd["cond_encoder.conv_in.bias"] = sd["cond_encoder.encoder.conv_in.bias"]  # stray v1 key
    with pytest.raises(WeightsError, match="cond_encoder"):
        load_full_v1(sd, TINY)


def test_diffusers_folder(tiny_model, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffbir_core.models.ldm import build_control_ldm, load_sd_diffusers
    from diffbir_core.models.text import tokenize

    tiny_model.unet.save_pretrained(tmp_path / "unet")
    tiny_model.vae.save_pretrained(tmp_path / "vae")
    torch.manual_seed(7)
    hf = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        )
    ).eval()
    hf.save_pretrained(tmp_path / "text_encoder")
    *_, reports = load_sd_diffusers(tmp_path, TINY, return_reports=True)
    assert reports[-1].unexpected and all(".layers.1." in k for k in reports[-1].unexpected)  # 2nd layer unused
    m = build_control_ldm(TINY, sd=tmp_path)
    assert _equal_modules(m.unet, tiny_model.unet) and _equal_modules(m.vae, tiny_model.vae)
    tokens = tokenize(["a photo of a cat", "low quality, blurry"])
    with torch.no_grad():
        # penultimate layer + final LayerNorm == a CLIPTextModel cut after its first layer
        hidden = hf(input_ids=tokens, output_hidden_states=True).hidden_states[1]  # [B, 77, 32]
        ref = hf.text_model.final_layer_norm(hidden) if hasattr(hf, "text_model") else hf.final_layer_norm(hidden)
        got = m.text(tokens)
    assert (got - ref).abs().max() < 1e-5


def test_own_safetensors_round_trip(tiny_model, tmp_path):
    from diffbir_core.models.ldm import ControlLDM, load_control_ldm_safetensors, save_control_ldm_safetensors

    m = ControlLDM(
        tiny_model.unet,
        _randomize(type(tiny_model.controlnet).from_unet(tiny_model.unet), 9),
        tiny_model.vae,
        tiny_model.text,
        TINY.latent_scale_factor,
        TINY,
    )
    path = save_control_ldm_safetensors(m, tmp_path / "cldm.safetensors")
    back = load_control_ldm_safetensors(path)
    for name in ("unet", "controlnet", "vae", "text"):
        assert _equal_modules(getattr(back, name), getattr(m, name)), name
    x, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(back(x, torch.tensor([10]), cond), m.eval()(x, torch.tensor([10]), cond))
    with pytest.raises(WeightsError, match="different Stage2Config"):
        load_control_ldm_safetensors(path, STAGE2_CONFIGS["sd21_base"])


# ------------------------------------------------------------------------------- VAE / text API


@torch.no_grad()
def test_vae_encode_sampling(tiny_model):
    m = tiny_model
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    mean, logvar = m.vae_posterior(img)
    assert mean.shape == (1, 4, 4, 4) and logvar.min() >= -30 and logvar.max() <= 20
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(m.vae_encode(img, sample=True, noise=eps), (mean + torch.exp(0.5 * logvar) * eps) * 0.18215)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(m.vae_encode(img, sample=True, generator=g1), m.vae_encode(img, sample=True, generator=g2))
    assert torch.equal(m.vae_encode(img), mean * 0.18215)
    assert m.vae_decode(m.vae_encode(img)).shape == img.shape
    cond = m.prepare_condition((img + 1) / 2, ["a cat"])
    assert cond["c_txt"].shape == (1, 77, 32) and cond["c_img"].shape == (1, 4, 4, 4)


def test_prompt_length_limit(tiny_model):
    from diffbir_core.models.text import PromptTooLongError, count_tokens, tokenize

    assert count_tokens("a photo of a cat") == 7 and count_tokens("") == 2
    ok = " ".join(["cat"] * 75)
    assert count_tokens(ok) == 77 and tokenize([ok])[0, -1].item() == 49407
    # official open_clip tokenizer.py:183-185: first 77 ids, the last forced to EOT (49407)
    from diffbir_core.models.text import PromptTruncatedWarning

    with pytest.warns(PromptTruncatedWarning, match="78 tokens"):
        long = tokenize([ok + " dog"])
    assert torch.equal(long[0, :76], tokenize([ok])[0, :76]) and long[0, -1].item() == 49407
    assert issubclass(PromptTooLongError, ValueError)


# ------------------------------------------------------------------------------- slow: full size, real


@pytest.mark.slow
@torch.no_grad()
def test_full_size_denoiser_step_cpu():
    from diffbir_core.models.ldm import build_control_ldm

    torch.manual_seed(0)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    m = build_control_ldm(STAGE2_CONFIGS["sd21_base"])
    t_build = time.perf_counter() - t0
    for p in m.controlnet.controlnet_down_blocks.parameters():  # non-zero residuals
        p.normal_(0, 1e-3)
    x = torch.randn(1, 4, 64, 64)  # 512x512 image
    cond = {"c_txt": m.encode_text(["a photo of a cat"]), "c_img": torch.randn(1, 4, 64, 64)}
    t0, c0 = time.perf_counter(), time.process_time()
    eps = m(x, torch.tensor([999]), cond)
    t_step, c_step = time.perf_counter() - t0, time.process_time() - c0
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    print(
        f"\nfull-size build {t_build:.1f}s; one ControlLDM step at 64x64 latent: {t_step:.1f}s wall, "
        f"{c_step:.1f}s CPU (2 threads)"
    )


def test_pretrained_load_caches_the_conversion(tiny_model, tmp_path, monkeypatch):
    """Issue 14: the first start converts the official files and caches one safetensors file; the second start
    reads it (no official file is parsed: both are made unreadable) and gives the same weights; a changed official
    file gets a new cache entry (the old one is removed)."""
    import diffbir_core.models.ldm as ldm
    from diffbir_core.models.convert import export_control_official

    monkeypatch.setitem(ldm.STAGE2_CONFIGS, "sd21_base", TINY)
    sd_path, ctrl_path = tmp_path / "sd.ckpt", tmp_path / "ctrl.pth"
    torch.save({"state_dict": _official_sd(tiny_model)}, sd_path)
    torch.save(export_control_official(tiny_model.controlnet), ctrl_path)
    cache = tmp_path / "cache"
    first = ldm.load_pretrained_control_ldm(str(sd_path), str(ctrl_path), cache_dir=cache)
    (entry,) = (cache / "stage2").glob("*.safetensors")
    assert entry == ldm.conversion_cache_path(sd_path, ctrl_path, TINY, cache)
    calls = []
    monkeypatch.setattr(ldm, "build_control_ldm", lambda *a, **k: calls.append(a) or pytest.fail("converted again"))
    second = ldm.load_pretrained_control_ldm(str(sd_path), str(ctrl_path), cache_dir=cache)
    for part in ("unet", "controlnet", "vae", "text"):
        assert _equal_modules(getattr(first, part), getattr(second, part)), part
        assert _equal_modules(getattr(tiny_model, part), getattr(second, part)), part
    assert not calls and not any(p.requires_grad for p in second.unet.parameters())
    monkeypatch.undo()
    monkeypatch.setitem(ldm.STAGE2_CONFIGS, "sd21_base", TINY)
    torch.save(export_control_official(tiny_model.controlnet), ctrl_path)  # new mtime: a new file version
    ldm.load_pretrained_control_ldm(str(sd_path), str(ctrl_path), cache_dir=cache)
    (entry2,) = (cache / "stage2").glob("*.safetensors")
    assert entry2 != entry
    ldm.load_pretrained_control_ldm(str(sd_path), str(ctrl_path), cache=False, cache_dir=tmp_path / "off")
    assert not (tmp_path / "off").exists()  # cache=False writes nothing

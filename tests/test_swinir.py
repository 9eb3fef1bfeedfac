"""Tests of the stage-1 SwinIR (diffbir_core/models/swinir.py).

Parity: the model is built from the fixture's own official config (configs/swinir_tiny.yaml), the
official-layout weight file weights/swinir.pth is loaded through `load_swinir`, and every tensor of
tensors/swinir.safetensors is reproduced from the matching input of tensors/input.safetensors.
Non-parity: key map / strict-loading errors, config parsing, padding behaviour and the full-size
parameter count against an independent formula - all with micro configs on CPU.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from diffbir_core.models.swinir import (
    SWINIR_CONFIGS,
    SWINIR_WEIGHT_NAMES,
    SwinIR,
    SwinIRConfig,
    load_swinir,
    map_official_swinir_keys,
)
from diffbir_core.weights import WEIGHTS, WeightsError

TOL = 1e-5  # times max(1, max|ref|)


def _tiny_cfg(parity_dir) -> SwinIRConfig:
    return SwinIRConfig.from_official(yaml.safe_load((parity_dir / "configs" / "swinir_tiny.yaml").read_text()))


def _micro_cfg(**kw) -> SwinIRConfig:
    """A very small model (16x16 image -> 8x8 tokens, 2x2 windows of 4, one shifted block)."""
    base = dict(
        img_size=8,
        patch_size=1,
        in_chans=3,
        embed_dim=8,
        depths=(1, 2),
        num_heads=(2, 2),
        window_size=4,
        mlp_ratio=2.0,
        sf=2,
        img_range=1.0,
        upsampler="nearest+conv",
        resi_connection="1conv",
        unshuffle=True,
        unshuffle_scale=2,
    )
    return SwinIRConfig(**{**base, **kw})


def _randomised(model: SwinIR, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state dict with every parameter random (so zero-init biases do not hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    return {k: (torch.randn(v.shape, generator=g) * 0.2 if k in params else v.clone()) for k, v in sd.items()}


def _output_pairs(parity_dir) -> list[tuple[str, str]]:
    """(input key, reference key) for every tensor in swinir.safetensors: swinir_out<sfx> <- lq<sfx>."""
    refs = load_file(str(parity_dir / "tensors" / "swinir.safetensors"))
    pairs = []
    for k in sorted(refs):
        assert k.startswith("swinir_out"), f"unexpected reference key {k} in swinir.safetensors"
        pairs.append(("lq" + k[len("swinir_out") :], k))
    return pairs


# ----------------------------------------------------------------------------------------------
# parity


@pytest.mark.parity
def test_tiny_config_matches_configs_json(parity_dir):
    cfg = _tiny_cfg(parity_dir)
    used = json.loads((parity_dir / "configs" / "configs.json").read_text())["tiny_configs_used"]["swinir"]
    assert cfg == SwinIRConfig.from_official(used)
    assert cfg.to_official()["depths"] == list(used["params"]["depths"])


@pytest.mark.parity
def test_swinir_parity(parity_dir):
    cfg = _tiny_cfg(parity_dir)
    model = load_swinir(parity_dir / "weights" / "swinir.pth", cfg)
    assert not model.training
    inputs = load_file(str(parity_dir / "tensors" / "input.safetensors"))
    refs = load_file(str(parity_dir / "tensors" / "swinir.safetensors"))
    pairs = _output_pairs(parity_dir)
    assert {r for _, r in pairs} >= {"swinir_out", "swinir_out_128"}
    report = {}
    for inp_key, ref_key in pairs:
        assert inp_key in inputs, f"no input {inp_key} for reference {ref_key}"
        with torch.no_grad():
            out = model(inputs[inp_key])
        ref = refs[ref_key]
        assert out.shape == ref.shape, (ref_key, out.shape, ref.shape)
        dev = (out - ref).abs().max().item()
        report[ref_key] = dev
        assert dev <= TOL * max(1.0, ref.abs().max().item()), f"{ref_key}: max|diff| {dev:.3g}"
    print("swinir parity max|diff|:", report)


@pytest.mark.parity
def test_constructor_buffers_equal_official(parity_dir):
    """relative_position_index / attn_mask that our constructor computes == the official ones in the file."""
    sd = torch.load(parity_dir / "weights" / "swinir.pth", weights_only=True)
    own = SwinIR(_tiny_cfg(parity_dir)).state_dict()
    assert set(own) == set(sd)
    bufs = [k for k in sd if k.endswith((".relative_position_index", ".attn_mask"))]
    assert any(k.endswith(".attn_mask") for k in bufs)
    for k in bufs:
        assert own[k].dtype == sd[k].dtype and torch.equal(own[k], sd[k]), k


@pytest.mark.parity
def test_file_without_buffers_gives_same_output(parity_dir):
    cfg = _tiny_cfg(parity_dir)
    sd = torch.load(parity_dir / "weights" / "swinir.pth", weights_only=True)
    stripped = {k: v for k, v in sd.items() if not k.endswith((".relative_position_index", ".attn_mask"))}
    assert len(stripped) < len(sd)
    x = load_file(str(parity_dir / "tensors" / "input.safetensors"))["lq_128"]
    with torch.no_grad():
        a = load_swinir(sd, cfg)(x)
        b = load_swinir(stripped, cfg)(x)
    assert torch.equal(a, b)


@pytest.mark.parity
def test_full_size_keys_are_the_official_pattern(parity_dir):
    """general_v1's state-dict keys = the official tiny file's keys with the RSTB/block indices scaled."""
    sd = torch.load(parity_dir / "weights" / "swinir.pth", weights_only=True)
    tiny = _tiny_cfg(parity_dir)
    full = SWINIR_CONFIGS["general_v1"]
    expected = set()
    for k in sd:
        parts = k.split(".")
        if parts[0] != "layers":
            expected.add(k)
            continue
        for i in range(len(full.depths)):
            if parts[2:4] == ["residual_group", "blocks"]:
                j = int(parts[4])
                for jj in range(full.depths[i]):
                    if jj % 2 == j % 2:  # shifted (odd) blocks own an attn_mask, even ones do not
                        expected.add(".".join(["layers", str(i), *parts[2:4], str(jj), *parts[5:]]))
            else:
                expected.add(".".join(["layers", str(i), *parts[2:]]))
    assert all(d >= 2 for d in tiny.depths)  # both parities of block index appear in the template
    with torch.device("meta"):
        got = set(SwinIR(full).state_dict())
    assert got == expected


@pytest.mark.parity
def test_presets_are_the_official_full_size_config(parity_dir):
    official = json.loads((parity_dir / "configs" / "configs.json").read_text())["official_full_size_configs"]
    ref = SwinIRConfig.from_official(official["v2.0.0:configs/inference/swinir.yaml"])
    for name in ("general_v1", "face_v1", "realesrgan_s4"):
        assert SWINIR_CONFIGS[name] == ref, name
        assert SWINIR_WEIGHT_NAMES[name] in WEIGHTS


# ----------------------------------------------------------------------------------------------
# non-parity


def _expected_param_count(cfg: SwinIRConfig) -> int:
    """Independent count from the architecture (SwinIR paper / official layout, nearest+conv, 1conv)."""
    c, nf = cfg.embed_dim, 64
    hid = int(c * cfg.mlp_ratio)

    def conv(cin: int, cout: int, k: int = 3) -> int:
        return cin * cout * k * k + cout

    in_ch = cfg.in_chans * cfg.unshuffle_scale**2
    ws = min(cfg.window_size, cfg.token_grid)
    total = conv(in_ch, c) + 2 * c  # conv_first + patch_embed.norm
    for depth, heads in zip(cfg.depths, cfg.num_heads):
        block = 4 * c + (2 * ws - 1) ** 2 * heads + (3 * c * c + 3 * c) + (c * c + c) + (c * hid + hid) + (hid * c + c)
        total += depth * block + conv(c, c)  # blocks + RSTB conv
    total += 2 * c + conv(c, c)  # norm + conv_after_body
    total += conv(c, nf) + int(math.log2(cfg.sf)) * conv(nf, nf) + conv(nf, nf) + conv(nf, cfg.in_chans)
    return total


def test_full_size_parameter_count():
    cfg = SWINIR_CONFIGS["general_v1"]
    with torch.device("meta"):
        model = SwinIR(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_param_count(cfg) == 15_792_587  # DifFace logs this model as "15.79M"
    micro = _micro_cfg()
    assert sum(p.numel() for p in SwinIR(micro).parameters()) == _expected_param_count(micro)


def test_wrong_state_dicts_raise_with_key_names():
    cfg = _micro_cfg()
    sd = _randomised(SwinIR(cfg))
    bad_shape = dict(sd)
    bad_shape["conv_up1.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(WeightsError, match=r"conv_up1\.weight"):
        load_swinir(bad_shape, cfg)
    missing = {k: v for k, v in sd.items() if k != "layers.1.residual_group.blocks.1.mlp.fc2.bias"}
    with pytest.raises(WeightsError, match=r"missing.*layers\.1\.residual_group\.blocks\.1\.mlp\.fc2\.bias"):
        load_swinir(missing, cfg)
    extra = {**sd, "conv_up2.weight": torch.zeros(64, 64, 3, 3)}  # a x4 tail key in a x2 model
    with pytest.raises(WeightsError, match=r"unexpected.*conv_up2\.weight"):
        load_swinir(extra, cfg)
    # a config that does not fit the file (another img_size -> other attn_mask shape) is caught too
    with pytest.raises(WeightsError, match=r"attn_mask"):
        load_swinir(sd, _micro_cfg(img_size=16))
    with pytest.raises(WeightsError, match="no tensors"):
        load_swinir({}, cfg)


def test_official_key_variants_load_identically(tmp_path):
    cfg = _micro_cfg()
    sd = _randomised(SwinIR(cfg), seed=3)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_swinir(sd, cfg)(x)
        # v1 full ControlLDM checkpoint: SwinIR under preprocess_model., plus other sub-models
        full = {**{f"preprocess_model.{k}": v for k, v in sd.items()}, "model.diffusion_model.x.weight": torch.ones(2)}
        assert torch.equal(load_swinir(full, cfg)(x), ref)
        # DataParallel prefix + v1 training-only LPIPS tensors
        dp = {**{f"module.{k}": v for k, v in sd.items()}, "module.lpips_metric.net.slice1.0.weight": torch.ones(1)}
        assert torch.equal(load_swinir(dp, cfg)(x), ref)
        # a file in the official v1/v2 layout ({"state_dict": ...}) read through weights.load_state_dict
        torch.save({"state_dict": sd}, tmp_path / "swinir.ckpt")
        assert torch.equal(load_swinir(tmp_path / "swinir.ckpt", cfg)(x), ref)
    assert set(map_official_swinir_keys(full)) == set(sd)


def test_from_official_parsing():
    params = SWINIR_CONFIGS["general_v1"].to_official()
    cfg = SwinIRConfig.from_official({**params, "hq_key": "jpg", "lq_key": "hint", "learning_rate": 1e-4})
    assert cfg == SWINIR_CONFIGS["general_v1"]
    assert SwinIRConfig.from_official({"target": "diffbir.model.SwinIR", "params": params}) == cfg
    with pytest.raises(ValueError, match="embed_dims"):
        SwinIRConfig.from_official({**params, "embed_dims": 180})
    with pytest.raises(ValueError, match="not a SwinIR"):
        SwinIRConfig.from_official({"target": "model.RRDBNet", "params": params})
    with pytest.raises(ValueError, match="pixelshuffle"):
        SwinIRConfig.from_official({**params, "upsampler": "pixelshuffle"})
    with pytest.raises(ValueError, match="unshuffle_scale == sf"):
        SwinIRConfig.from_official({**params, "unshuffle_scale": 4})
    # missing keys take the OFFICIAL constructor defaults (window 7, embed 96, ...)
    partial = SwinIRConfig.from_official({"upsampler": "nearest+conv", "sf": 4})
    assert (partial.window_size, partial.embed_dim, partial.unshuffle) == (7, 96, False)


def test_padding_and_grid_rules():
    cfg = _micro_cfg()
    model = SwinIR(cfg).eval()
    model.load_state_dict(_randomised(model, seed=5))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 14, 13, generator=g)
    with torch.no_grad():
        out = model(x)
        # official behaviour: reflect-pad bottom/right to a multiple of window_size, NO crop of it
        padded = F.pad(x, (0, 3, 0, 2), "reflect")
        assert out.shape == (1, 3, 16, 16)
        assert torch.equal(out, model(padded))
        # a token grid that does not fit the windows is a clear error (pad to cfg.pad_multiple first)
        assert cfg.pad_multiple == 8
        with pytest.raises(ValueError, match="multiple of the window size"):
            model(torch.rand(1, 3, 20, 16, generator=g))  # 10x8 tokens, windows of 4
        with pytest.raises(ValueError, match=r"expects \(B, 3, H, W\)"):
            model(torch.rand(1, 1, 16, 16))
        # a grid other than img_size (16x16 tokens here) recomputes the mask; batch items stay independent
        big = torch.rand(2, 3, 32, 32, generator=g)
        both = model(big)
        assert torch.allclose(both[1:], model(big[1:]), rtol=1e-5, atol=1e-5 * both.abs().max().item())


def test_shift_window_mask_known_answer():
    from diffbir_core.models.swinir import _shift_window_mask

    m = _shift_window_mask(8, 8, 4, 2)  # 8x8 tokens, windows of 4, shift 2 -> 4 windows of 16 tokens
    assert m.shape == (4, 16, 16)
    assert set(m.unique().tolist()) == {-100.0, 0.0}
    # zeros per window: one region (16*16), two halves (2 * 8*8), two halves, four quarters (4 * 4*4)
    assert [(w == 0).sum().item() for w in m] == [256, 128, 128, 64]
    # window 1 (top-right): tokens 0 (col 4) and 2 (col 6) lie in different column regions
    assert m[1, 0, 2].item() == -100.0 and m[1, 0, 1].item() == 0.0
    assert torch.equal(m, m.transpose(1, 2))


def test_drop_path_only_in_train_mode():
    cfg = _micro_cfg(drop_path_rate=0.5)
    model = SwinIR(cfg)
    model.load_state_dict(_randomised(model, seed=7))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(0)
        c = model(x)
    assert not torch.equal(a, c)

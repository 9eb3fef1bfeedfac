"""Tests of the stage-1 cleaner registry (diffbir_core.cleaners) and the RRDBNet / SCUNet loaders.

Every kind runs from a checkpoint written in its OFFICIAL layout (BSRGAN keys for BSRNet.pth, the
authors' keys for SCUNet and SwinIR) with random weights, loaded through `load_cleaner(path=...)`.
BSRNet / SCUNet files are full size because `weights.resolve` rejects files far below the known size as
truncated downloads; they run on tiny inputs. Known answers: the cleaner's output equals the official
pipeline semantics recomputed by hand (resize -> pad -> net -> crop for x1, net -> resize for x4), and our
RRDBNet equals spandrel's independent ESRGAN implementation on the same file.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from diffbir_core import imageio
from diffbir_core.cleaners import CLEANERS, Cleaner, CleanerSpec, load_cleaner
from diffbir_core.models.ncnn import offline_realesrgan_weights
from diffbir_core.models.rrdbnet import (
    RRDBNET_CONFIGS,
    RRDBNet,
    RRDBNetConfig,
    detect_rrdbnet_config,
    load_rrdbnet,
    to_basicsr_layout,
)
from diffbir_core.models.scunet import SCUNET_CONFIGS, SCUNetConfig, build_scunet, load_scunet
from diffbir_core.weights import WEIGHTS, WeightsError


def _randomise(net: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return net.eval()


def _to_bsrgan_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BasicSR -> BSRGAN/KAIR names (written out independently of the loader's key map)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"body\.(\d+)\.rdb(\d)\.(.*)", k)
        k = f"RRDB_trunk.{m.group(1)}.RDB{m.group(2)}.{m.group(3)}" if m else k
        k = (
            k.replace("conv_body.", "trunk_conv.")
            .replace("conv_up1.", "upconv1.")
            .replace("conv_up2.", "upconv2.")
            .replace("conv_hr.", "HRconv.")
        )
        out[k] = v
    return out


def _to_old_esrgan_keys(sd: dict[str, torch.Tensor], nb: int) -> dict[str, torch.Tensor]:
    fixed = {
        "conv_first": "model.0",
        "conv_body": f"model.1.sub.{nb}",
        "conv_up1": "model.3",
        "conv_up2": "model.6",
        "conv_hr": "model.8",
        "conv_last": "model.10",
    }
    out = {}
    for k, v in sd.items():
        m = re.match(r"body\.(\d+)\.rdb(\d)\.(conv\d)\.(weight|bias)", k)
        if m:
            out[f"model.1.sub.{m.group(1)}.RDB{m.group(2)}.{m.group(3)}.0.{m.group(4)}"] = v
        else:
            name, kind = k.rsplit(".", 1)
            out[f"{fixed[name]}.{kind}"] = v
    return out


TINY = RRDBNetConfig(nf=8, nb=2, gc=4, sf=4)


@pytest.fixture(scope="module")
def tiny_rrdb() -> RRDBNet:
    return _randomise(RRDBNet(TINY), seed=1)


@pytest.fixture(scope="module")
def full_files(tmp_path_factory):
    """Full-size random checkpoints in the official layouts: BSRNet.pth (BSRGAN keys), scunet .pth, SwinIR .ckpt."""
    from diffbir_core.models.swinir import SWINIR_CONFIGS, SwinIR

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    bsr = RRDBNet(RRDBNET_CONFIGS["bsrnet"])
    torch.save(_to_bsrgan_keys(bsr.state_dict()), d / "BSRNet.pth")
    torch.save(build_scunet(SCUNET_CONFIGS["color_real_psnr"]).state_dict(), d / "scunet_color_real_psnr.pth")
    torch.save({"state_dict": SwinIR(SWINIR_CONFIGS["general_v1"]).state_dict()}, d / "swinir.ckpt")
    return d


# ----------------------------------------------------------------------------------------------
# Registry


def test_registry():
    assert set(CLEANERS) == {
        "offline",
        "swinir_general",
        "swinir_face",
        "swinir_realesrgan",
        "bsrnet",
        "scunet_psnr",
        "bicubic",
    }
    for spec in CLEANERS.values():
        assert spec.weight is None or spec.weight in WEIGHTS
        assert spec.scale == (4 if spec.kind == "rrdbnet" else 1)
        assert spec.multiple == (64 if spec.kind in ("swinir", "scunet") else 1)
    assert CLEANERS["offline"].weight == "realesrgan_x4plus_ncnn" and WEIGHTS["realesrgan_x4plus_ncnn"].offline
    with pytest.raises(ValueError, match="weights.WEIGHTS"):
        CleanerSpec("x", "rrdbnet", 4, "no_such_weight", "")
    with pytest.raises(ValueError, match="choose one of"):
        load_cleaner("esrgan_x8")


# ----------------------------------------------------------------------------------------------
# RRDBNet: layouts, detection, independent implementation


def test_rrdbnet_three_layouts_give_the_same_network(tiny_rrdb):
    sd = tiny_rrdb.state_dict()
    x = torch.rand(1, 3, 7, 9)
    ref = tiny_rrdb(x)
    assert ref.shape == (1, 3, 28, 36)
    for layout, file_sd in [("basicsr", sd), ("bsrgan", _to_bsrgan_keys(sd)), ("esrgan", _to_old_esrgan_keys(sd, 2))]:
        mapped, found = to_basicsr_layout(file_sd)
        assert found == layout and set(mapped) == set(sd)
        net = load_rrdbnet(file_sd)  # config read off the file
        assert net.cfg == TINY
        torch.testing.assert_close(net(x), ref, rtol=0, atol=0)


def test_rrdbnet_matches_spandrel_esrgan():
    from spandrel import ModelLoader

    ours = _randomise(RRDBNet(RRDBNetConfig(nf=8, nb=2, gc=32, sf=4)), seed=4)  # spandrel assumes gc = 32
    desc = ModelLoader().load_from_state_dict(_to_bsrgan_keys(ours.state_dict()))
    assert desc.architecture.id == "ESRGAN" and desc.scale == 4 and {"8nf", "2nb"} <= set(desc.tags)
    x = torch.rand(1, 3, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(desc.model.eval()(x), ours(x), rtol=0, atol=1e-5)


def test_rrdbnet_wrong_files(tiny_rrdb):
    sd = tiny_rrdb.state_dict()
    with pytest.raises(WeightsError, match=r"nb=2.*but.*nb=23"):
        load_rrdbnet(sd, RRDBNET_CONFIGS["bsrnet"], what="bsrnet")
    with pytest.raises(WeightsError, match="unexpected keys.*extra_head.weight"):
        load_rrdbnet({**sd, "extra_head.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="missing keys.*conv_hr.bias"):
        load_rrdbnet({k: v for k, v in sd.items() if k != "conv_hr.bias"})
    with pytest.raises(WeightsError, match="not an RRDBNet"):
        load_rrdbnet({"m_head.0.weight": torch.zeros(64, 3, 3, 3)})
    assert detect_rrdbnet_config(sd) == TINY


# ----------------------------------------------------------------------------------------------
# Each kind through load_cleaner(path=...): sizes and the official size semantics


def test_bsrnet_cleaner(full_files):
    c = load_cleaner("bsrnet", path=full_files / "BSRNet.pth")
    assert isinstance(c, Cleaner) and c.scale == 4 and c.multiple == 1
    _randomise(c.net, seed=2)  # default init gives near-constant outputs; make the check discriminative
    x = torch.rand(1, 3, 9, 13)
    y = c(x)
    assert y.shape == (1, 3, 36, 52) and 0 <= y.min() and y.max() <= 1
    y2 = c(x, out_size=(37, 53))  # x4 network: run at native scale, then resize
    with torch.no_grad():
        ref = imageio.resize(c.net(x), (37, 53)).clamp(0, 1)
    assert y2.shape == (1, 3, 37, 53)
    torch.testing.assert_close(y2, ref, rtol=0, atol=1e-6)


def test_scunet_cleaner(full_files):
    c = load_cleaner("scunet_psnr", path=full_files / "scunet_color_real_psnr.pth")
    assert c.scale == 1 and c.multiple == 64
    _randomise(c.net, seed=3, std=0.02)
    x = torch.rand(1, 3, 37, 53)
    assert c(x).shape == (1, 3, 37, 53)
    # HEAD SCUNetPipeline (diffbir/pipeline.py:402-420): run at the input size (replicate-pad to 64, crop), then resize
    y = c(x, out_size=(50, 70))
    with torch.no_grad():
        net_out = c.net(F.pad(x, (0, 11, 0, 27), mode="replicate"))[..., :37, :53]
        ref = imageio.resize(net_out, (50, 70)).clamp(0, 1)
    assert y.shape == (1, 3, 50, 70)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    assert (y - imageio.resize(x, (50, 70)).clamp(0, 1)).abs().mean() > 1e-3  # the network did something


def test_swinir_presets_match_the_swinir_module():
    from diffbir_core.models.swinir import SWINIR_CONFIGS, SWINIR_WEIGHT_NAMES

    for name in ("swinir_general", "swinir_face", "swinir_realesrgan"):
        spec = CLEANERS[name]
        assert spec.preset in SWINIR_CONFIGS and SWINIR_WEIGHT_NAMES[spec.preset] == spec.weight
        assert spec.multiple == SWINIR_CONFIGS[spec.preset].window_size * SWINIR_CONFIGS[spec.preset].unshuffle_scale


def test_swinir_cleaner(full_files):
    c = load_cleaner("swinir_general", path=full_files / "swinir.ckpt")
    assert c.scale == 1 and c.multiple == 64
    x = torch.rand(1, 3, 37, 53)
    y = c(x, out_size=(45, 30))
    with torch.no_grad():  # official SwinIRPipeline: resize, zero-pad to 64, SwinIR, crop
        r = imageio.resize(x, (45, 30))
        ref = c.net(F.pad(r, (0, 34, 0, 19)))[..., :45, :30].clamp(0, 1)
    assert y.shape == (1, 3, 45, 30)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    assert c(x).shape == (1, 3, 37, 53)


def test_bicubic_cleaner():
    c = load_cleaner("bicubic")
    x = torch.rand(1, 3, 37, 53)
    assert torch.equal(c(x), x)
    y = c(x, out_size=(74, 106))
    torch.testing.assert_close(y, F.interpolate(x, (74, 106), mode="bicubic", antialias=True).clamp(0, 1))


def test_offline_cleaner_runs_without_download(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("cache")
    offline_realesrgan_weights(cache_dir=cache)
    monkeypatch.setenv("DIFFBIR_CACHE", str(cache))
    monkeypatch.delenv("DIFFBIR_WEIGHTS_DIR", raising=False)
    c = load_cleaner("offline")
    x = torch.rand(1, 3, 17, 23) * 0.5 + 0.25
    y = c(x)
    assert y.shape == (1, 3, 68, 92) and 0 <= y.min() and y.max() <= 1
    assert not y.is_inference() and not y.requires_grad  # usable by autograd code downstream (guidance)
    y.mul_(1.0)
    assert c(x, out_size=(40, 60)).shape == (1, 3, 40, 60)


# ----------------------------------------------------------------------------------------------
# Errors


def test_wrong_file_raises_weights_error(full_files, tmp_path):
    with pytest.raises(WeightsError, match="not an SCUNet"):
        load_cleaner("scunet_psnr", path=full_files / "BSRNet.pth")
    with pytest.raises(WeightsError, match="not an RRDBNet"):
        load_cleaner("bsrnet", path=full_files / "scunet_color_real_psnr.pth")
    with pytest.raises(WeightsError):
        load_cleaner("swinir_general", path=full_files / "BSRNet.pth")
    junk = tmp_path / "BSRNet.pth"
    junk.write_bytes(b"<html>404</html>")
    with pytest.raises(WeightsError, match="truncated"):
        load_cleaner("bsrnet", path=junk)
    with pytest.raises(WeightsError, match="could not read"):
        load_cleaner("swinir_face", path=junk)


@pytest.mark.parametrize("name", ["swinir_general", "bsrnet", "scunet_psnr"])
def test_missing_file_offline_says_how_to_get_it(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DIFFBIR_WEIGHTS_DIR", raising=False)
    with pytest.raises(WeightsError) as e:
        load_cleaner(name, weights_dir=tmp_path)
    msg = str(e.value)
    spec = WEIGHTS[CLEANERS[name].weight]
    assert spec.filename in msg and "HF_HUB_OFFLINE" in msg and "How to get it" in msg
    assert str(tmp_path) in msg


def test_scunet_loader_reports_shape(tmp_path):
    small = SCUNetConfig(config=(2, 2, 2, 2, 2, 2, 2), dim=32)
    sd = build_scunet(small).state_dict()
    with pytest.raises(WeightsError, match=r"dim 32 and stage depths \(2, 2, 2, 2, 2, 2, 2\)"):
        load_scunet(sd)
    net = load_scunet(sd, small)
    assert not any(p.requires_grad for p in net.parameters())
    assert SCUNetConfig.from_official({"in_nc": 3, "config": [4] * 7, "dim": 64}) == SCUNET_CONFIGS["color_real_psnr"]


def test_bad_input_is_explained():
    c = load_cleaner("bicubic")
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        c(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        c(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="float"):
        c(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))

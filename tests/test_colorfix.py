"""Colour fix (wavelet / AdaIN) and the official uint8 conversion vs the official fixtures and known answers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffbir_core.colorfix import (
    adain_color_fix,
    color_fix,
    to_uint8_official,
    wavelet_blur,
    wavelet_decomposition,
    wavelet_reconstruction,
)


def assert_close(a, ref, what):
    lim = 1e-4 * max(1.0, float(ref.abs().max()))
    dev = float((a - ref).abs().max())
    assert a.shape == ref.shape and dev <= lim, f"{what}: max|a-b| = {dev:.3e} > {lim:.3e}"


@pytest.mark.parity
def test_wavelet_parity(parity_dir):
    d = load_file(parity_dir / "tensors" / "colorfix.safetensors")
    assert_close(wavelet_blur(d["content"], 1), d["wavelet_blur_content_r1"], "blur r1")
    assert_close(wavelet_blur(d["content"], 16), d["wavelet_blur_content_r16"], "blur r16")
    for name in ("content", "style"):
        high, low = wavelet_decomposition(d[name])
        assert_close(high, d[f"{name}_high"], f"{name} high")
        assert_close(low, d[f"{name}_low"], f"{name} low")
    assert_close(wavelet_reconstruction(d["content"], d["style"]), d["wavelet_reconstruction"], "reconstruction")
    assert_close(color_fix(d["pair2_content"], d["pair2_style"]), d["pair2_wavelet_reconstruction"], "pair2")


@pytest.mark.parity
def test_official_uint8_postprocessing(parity_dir):
    d = load_file(parity_dir / "tensors" / "colorfix.safetensors")
    out = to_uint8_official(d["wavelet_reconstruction"], size=(64, 64))
    assert out.dtype == torch.uint8 and out.shape == d["post_uint8_hwc"].shape
    assert int((out.int() - d["post_uint8_hwc"].int()).abs().max()) <= 1
    # truncation, not rounding; clamping at both ends
    x = torch.tensor([254.9, 0.6, -3.0, 300.0]).div(255).view(1, 1, 2, 2)
    assert to_uint8_official(x).flatten().tolist() == [254, 0, 0, 255]
    assert to_uint8_official(torch.rand(1, 3, 16, 16), size=(8, 12)).shape == (1, 8, 12, 3)


def test_known_answers():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 48, generator=g)
    high, low = wavelet_decomposition(x)
    assert torch.allclose(high + low, x, atol=1e-6)  # telescoping sum
    assert torch.allclose(wavelet_reconstruction(x, x), x, atol=1e-6)
    flat = torch.full((1, 3, 16, 16), 0.25)
    assert torch.allclose(wavelet_blur(flat, 4), flat)  # kernel sums to 1, replicate padding
    assert float(low.std()) < float(x.std()) / 3  # low-pass
    style = torch.rand(2, 3, 40, 40, generator=g) * 0.2 + 0.6
    y = adain_color_fix(x, style)
    assert torch.allclose(y.mean((2, 3)), style.mean((2, 3)), atol=1e-5)
    assert torch.allclose(y.flatten(2).std(2), style.flatten(2).std(2), atol=1e-3)
    assert torch.equal(color_fix(x, x, "none"), x)
    assert wavelet_blur(torch.rand(1, 4, 16, 16), 2).shape == (1, 4, 16, 16)  # any channel count


def test_errors():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="mode"):
        color_fix(x, x, "histogram")
    with pytest.raises(ValueError, match="same shape"):
        wavelet_reconstruction(x, torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="NCHW"):
        wavelet_blur(x[0], 1)
    with pytest.raises(ValueError, match="levels"):
        wavelet_decomposition(x, 0)

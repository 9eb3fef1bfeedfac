"""Library inputs (issue 14): `imageio.as_loaded_image` and the one-line entry points take what callers hold.

Known answers come from numpy / Pillow themselves (``u8 / 255``, ``PIL.ImageOps.exif_transpose``), never from our
own output; the restore test checks that every input kind of the SAME pixels gives the same restored image with
the real offline preset (Real-ESRGAN x4plus from the ncnn wheel) on a small crop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from diffbir_core.imageio import ImageReadError, LoadedImage, as_loaded_image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "samples" / "49.jpg"


@pytest.fixture(scope="module")
def u8() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE).convert("RGB"))[40:64, 20:44].copy()  # 24 x 24 x 3


def test_uint8_is_scaled_not_white(u8):
    # the bug of issue 14: a uint8 array came back clipped to an all-white image
    got = as_loaded_image(u8)
    np.testing.assert_allclose(got.rgb, u8.astype(np.float32) / 255.0, rtol=0, atol=1e-7)
    assert got.bit_depth == 8 and got.alpha is None


def test_every_kind_of_the_same_pixels_reads_the_same(u8, tmp_path):
    ref = u8.astype(np.float64) / 255.0
    p = tmp_path / "crop.png"
    Image.fromarray(u8).save(p)
    kinds = {
        "path": str(p),
        "Path": p,
        "PIL": Image.open(p),
        "PIL RGBA": Image.fromarray(u8).convert("RGBA"),
        "uint16": u8.astype(np.uint16) * 257,
        "float64": ref,
        "float32 0-255": u8.astype(np.float32),
        "tensor CHW": torch.from_numpy(ref).permute(2, 0, 1).float(),
        "tensor NCHW": torch.from_numpy(ref).permute(2, 0, 1)[None].half(),
        "tensor HWC": torch.from_numpy(ref).float(),
        "loaded": LoadedImage(rgb=ref.astype(np.float32)),
    }
    for name, x in kinds.items():
        got = as_loaded_image(x)
        atol = 1e-3 if name == "tensor NCHW" else 1e-6  # float16 keeps ~3 digits
        np.testing.assert_allclose(got.rgb, ref, rtol=0, atol=atol, err_msg=name)
    assert as_loaded_image(kinds["float32 0-255"]).notices  # says it read 0-255 floats
    np.testing.assert_array_equal(as_loaded_image(kinds["PIL RGBA"]).alpha, np.ones(u8.shape[:2], np.float32))


def test_gray_and_gray_alpha_arrays(u8):
    g = u8[..., 0]
    got = as_loaded_image(g)
    np.testing.assert_allclose(got.rgb, np.repeat(g[..., None], 3, 2) / 255.0, atol=1e-7)
    la = as_loaded_image(np.dstack([g, np.full_like(g, 51)]))
    np.testing.assert_allclose(la.alpha, 0.2, atol=1e-7)
    np.testing.assert_allclose(as_loaded_image(g[..., None]).rgb, got.rgb)


def test_pil_exif_orientation_matches_pillow(u8, tmp_path):
    wide = np.ascontiguousarray(np.concatenate([u8, u8[:, :8]], axis=1))  # 24 x 32: rotation visible in shape
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    Image.fromarray(wide).save(p, exif=exif.tobytes(), quality=95)
    expect = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"), np.float32) / 255.0
    got = as_loaded_image(Image.open(p))
    assert got.rgb.shape == (32, 24, 3)
    np.testing.assert_allclose(got.rgb, expect, atol=1e-7)


def test_pil_16bit_and_float_modes():
    a16 = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500
    im16 = Image.fromarray(a16)
    assert im16.mode.startswith("I;16")
    got = as_loaded_image(im16)
    np.testing.assert_allclose(got.rgb[..., 0], a16 / 65535.0, atol=1e-6)
    f = np.linspace(0, 1, 120, dtype=np.float32).reshape(12, 10)
    np.testing.assert_allclose(as_loaded_image(Image.fromarray(f)).rgb[..., 1], f, atol=1e-7)


@pytest.mark.parametrize(
    "bad, err, words",
    [
        (object(), TypeError, "builtins.object"),
        ([[0, 1], [1, 0]], TypeError, "builtins.list"),
        (np.zeros((3, 20, 20), np.uint8), ImageReadError, "channel-first"),
        (np.zeros((20, 20, 5), np.uint8), ImageReadError, "shape"),
        (np.zeros((2, 3, 8, 8)), ImageReadError, "shape"),
        (torch.zeros(2, 3, 8, 8), ImageReadError, "batch of 2"),
        (np.full((4, 4, 3), np.nan), ImageReadError, "NaN"),
        (np.full((4, 4, 3), 70000.0), ImageReadError, "70000"),
        (np.zeros((4, 4, 3), np.complex64), ImageReadError, "complex64"),
        (np.zeros((0, 4, 3), np.uint8), ImageReadError, "no pixels"),
    ],
)
def test_refused_with_a_clear_error(bad, err, words):
    with pytest.raises(err, match=words):
        as_loaded_image(bad)


def test_restore_gives_the_same_output_for_every_input_kind(u8, tmp_path):
    from diffbir_core import api
    from diffbir_core.config import RestoreParams

    p = tmp_path / "crop.png"
    Image.fromarray(u8).save(p)
    params = RestoreParams.from_preset("offline", upscale=2.0)
    pipe = api.make_pipeline()
    outs = {
        name: api.restore(x, params, pipe=pipe).image
        for name, x in {
            "path": p,
            "PIL": Image.open(p),
            "uint8": u8,
            "uint16": u8.astype(np.uint16) * 257,
            "float": u8 / 255.0,
            "tensor": torch.from_numpy(u8 / 255.0).permute(2, 0, 1).float(),
        }.items()
    }
    ref = outs["path"]
    assert ref.shape == (48, 48, 3)
    assert 0.05 < ref.mean() < 0.95  # not the all-white (or black) image of the bug
    for name, out in outs.items():
        np.testing.assert_allclose(out, ref, rtol=0, atol=1 / 255, err_msg=name)


def test_one_line_entry_points_return_pil(u8):
    import diffbir_core
    from diffbir_core import DiffBIRPipeline

    r = diffbir_core.from_pretrained("offline", device="auto")
    out = r(u8, upscale=2.0, seed=3)
    assert isinstance(out, Image.Image) and out.size == (48, 48) and out.mode == "RGB"
    out2 = DiffBIRPipeline.from_pretrained("offline", device="cpu")(Image.fromarray(u8), upscale=2.0)
    assert np.abs(np.asarray(out, int) - np.asarray(out2, int)).max() <= 1
    rgba = r(np.dstack([u8, np.full(u8.shape[:2], 128, np.uint8)]), upscale=2.0)
    assert rgba.mode == "RGBA" and np.asarray(rgba)[..., 3].mean() == pytest.approx(128, abs=1)
    with pytest.raises(ValueError, match="unknown parameter"):
        r(u8, stepz=3)


def test_missing_weights_are_all_named_in_one_error(tmp_path, monkeypatch):
    import diffbir_core
    from diffbir_core.weights import WEIGHTS, WeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("DIFFBIR_WEIGHTS_DIR", str(tmp_path / "w"))
    with pytest.raises(WeightsError) as e:
        diffbir_core.from_pretrained("v2", device="cpu")
    msg = str(e.value)
    for name in ("bsrnet", "sd_v2.1", "v2"):  # the v2 preset's sr cleaner, SD and control branch
        assert WEIGHTS[name].filename in msg
    assert "3 missing" in msg and str(tmp_path / "w") in msg

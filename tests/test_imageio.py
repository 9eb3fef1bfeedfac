"""Image input handling: every odd file a user may drop in (issue: foundation, bad inputs)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffbir_core.imageio import ImageReadError, crop_to, pad_to_multiple, read_image, save_image


def _png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG") if mode else Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_truncated_png(tmp_path):
    data = _png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    p = tmp_path / "trunc.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="trunc.png"):
        read_image(p)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_image(p)


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image\n" * 10)
    with pytest.raises(ImageReadError, match="not a readable image"):
        read_image(p)


def test_one_by_one(tmp_path):
    p = tmp_path / "dot.png"
    p.write_bytes(_png_bytes(np.array([[[10, 20, 30]]], dtype=np.uint8)))
    img = read_image(p)
    assert img.rgb.shape == (1, 1, 3)
    np.testing.assert_allclose(img.rgb[0, 0], np.array([10, 20, 30]) / 255.0, atol=1e-6)


def test_16bit_png_keeps_precision(tmp_path):
    import cv2

    rng = np.random.default_rng(1)
    arr16 = rng.integers(0, 65535, (8, 9, 3), dtype=np.uint16)
    p = tmp_path / "deep.png"
    cv2.imwrite(str(p), arr16[..., ::-1])  # OpenCV writes BGR
    img = read_image(p)
    assert img.bit_depth == 16
    np.testing.assert_allclose(img.rgb, arr16.astype(np.float32) / 65535.0, atol=1e-6)


def test_16bit_grayscale_png(tmp_path):
    arr = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    p = tmp_path / "g16.png"
    Image.fromarray(arr).save(p)
    img = read_image(p)
    assert img.rgb.shape == (8, 8, 3)
    assert img.rgb.max() <= 1.0 and img.rgb[..., 0].max() == pytest.approx(63000 / 65535, abs=1e-4)


def test_rgba_png_alpha_kept(tmp_path):
    rgba = np.zeros((5, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.linspace(0, 255, 6, dtype=np.uint8)[None, :]
    p = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(p)
    img = read_image(p)
    assert img.rgb.shape == (5, 6, 3) and img.alpha is not None
    np.testing.assert_allclose(img.alpha[0], rgba[0, :, 3] / 255.0, atol=1e-6)
    out = save_image(tmp_path / "o.png", img.rgb, img.alpha)
    back = np.asarray(Image.open(out))
    assert back.shape == (5, 6, 4) and np.array_equal(back[..., 3], rgba[..., 3])


def test_grayscale_and_palette(tmp_path):
    g = tmp_path / "g.png"
    Image.fromarray(np.full((4, 4), 128, np.uint8), "L").save(g)
    assert read_image(g).rgb.shape == (4, 4, 3)
    pal = tmp_path / "p.png"
    Image.fromarray(np.full((4, 4, 3), 77, np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE).save(pal)
    np.testing.assert_allclose(read_image(pal).rgb, 77 / 255.0, atol=1 / 255)


def test_exif_rotated_jpeg(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # white band on the left of the stored (landscape) pixels
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW for display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif.tobytes(), quality=95)
    img = read_image(p)
    assert img.rgb.shape == (40, 20, 3)  # displayed portrait
    assert img.rgb[:10].mean() > 0.9 and img.rgb[-10:].mean() < 0.1  # band now on top


def test_pad_and_crop_roundtrip():
    x = torch.rand(1, 3, 37, 53)
    y, hw = pad_to_multiple(x, 64)
    assert y.shape[-2:] == (64, 64)
    assert torch.equal(crop_to(y, hw), x)
    tiny = torch.rand(1, 3, 1, 1)
    t, hw = pad_to_multiple(tiny, 8)  # reflect impossible -> replicate
    assert t.shape[-2:] == (8, 8) and torch.equal(crop_to(t, hw), tiny)

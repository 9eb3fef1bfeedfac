"""Degradation model (PAPER.md "Degradation model") and the paired data set built on it.

Known answers: every drawn parameter lies in the Appendix A / CodeFormer ranges over many seeds, the
same seed reproduces bit-exactly, kernels are normalised Gaussians with the requested covariance, the
degraded image has the input's size and 8-bit levels, and heavier settings really degrade more.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffbir_core.degradation import DEGRADATIONS, DegradationConfig, DegradationRound, degrade, gaussian_kernel


def _image(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth colour pattern with edges (so blur/JPEG have something to act on)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.5 + 0.4 * np.sin(9 * x + 2 * y), 0.5 + 0.4 * np.cos(7 * y), (x + y) / 2], -1)
    img[h // 4 : h // 2, w // 4 : w // 2] = [0.9, 0.1, 0.2]
    return np.clip(img + np.random.default_rng(seed).normal(0, 0.01, img.shape), 0, 1).astype(np.float32)


def _in(v: float, r: tuple[float, float]) -> bool:
    return r[0] - 1e-9 <= v <= r[1] + 1e-9


def _check_round(rp: dict, r: DegradationRound, orig_hw: tuple[int, int]) -> None:
    b = rp["blur"]
    if b["applied"]:
        assert b["kind"] in r.kernel_kinds
        assert b["kernel_size"] % 2 == 1 and _in(b["kernel_size"], r.kernel_size)
        assert _in(b["sigma_x"], r.blur_sigma) and _in(b["sigma_y"], r.blur_sigma)
        if b["kind"] == "iso":
            assert b["sigma_x"] == b["sigma_y"] and b["theta"] == 0.0
        else:
            assert _in(b["theta"], r.rotation)
    rs = rp["resize"]
    assert rs["applied"]
    assert rs["mode"] in r.resize_modes
    if r.resize_scale is not None:
        assert _in(rs["scale"], r.resize_scale)
        assert {"up": rs["scale"] >= 1, "down": rs["scale"] <= 1, "keep": rs["scale"] == 1}[rs["direction"]]
    else:
        assert _in(rs["downsample"], r.downsample)
    assert rs["size"] == (max(1, int(orig_hw[0] * rs["scale"])), max(1, int(orig_hw[1] * rs["scale"])))
    n = rp["noise"]
    assert n["kind"] in ("gaussian", "poisson")
    if n["kind"] == "gaussian":
        assert _in(n["sigma"], r.gaussian_sigma)
    else:
        assert _in(n["scale"], r.poisson_scale)
    q = rp["jpeg"]["quality"]
    assert isinstance(q, int) and _in(q, r.jpeg_quality)


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_params_stay_in_range_over_many_seeds(name):
    cfg = DEGRADATIONS[name]
    img = _image()
    kinds, modes, noise_kinds, blurs = set(), set(), set(), 0
    for seed in range(200):
        lq, p = degrade(img, cfg, seed)
        assert lq.shape == img.shape and lq.dtype == np.float32
        assert lq.min() >= 0 and lq.max() <= 1
        assert np.allclose(lq * 255, np.rint(lq * 255), atol=1e-3)  # 8-bit levels
        assert p["preset"] == name and p["input_size"] == (64, 64) and len(p["rounds"]) == len(cfg.rounds)
        for rp, r in zip(p["rounds"], cfg.rounds):
            _check_round(rp, r, (64, 64))
            if rp["blur"]["applied"]:
                kinds.add(rp["blur"]["kind"])
                blurs += 1
            modes.add(rp["resize"]["mode"])
            noise_kinds.add(rp["noise"]["kind"])
        assert p["final_resize"]["mode"] in cfg.final_resize_modes
    # every option is actually drawn
    assert kinds == set(cfg.rounds[0].kernel_kinds)
    assert modes == set().union(*[r.resize_modes for r in cfg.rounds])
    expect_noise = {"gaussian"} if all(r.poisson_scale is None for r in cfg.rounds) else {"gaussian", "poisson"}
    assert noise_kinds == expect_noise
    if name == "realesrgan_2nd_order":  # 1st round always blurs, 2nd with p = 0.8: ~360 of 400
        assert 320 <= blurs <= 395


def test_paper_ranges_in_presets():
    """The Appendix A numbers, written out once more so a silent edit of a preset fails here."""
    r1, r2 = DEGRADATIONS["realesrgan_2nd_order"].rounds
    assert (r1.kernel_size, r1.blur_sigma, r1.resize_scale, r1.gaussian_sigma, r1.poisson_scale, r1.jpeg_quality) == (
        (7, 21),
        (0.2, 3.0),
        (0.15, 1.5),
        (1.0, 30.0),
        (0.05, 3.0),
        (30, 95),
    )
    assert (r2.kernel_size, r2.blur_sigma, r2.resize_scale, r2.gaussian_sigma, r2.poisson_scale, r2.jpeg_quality) == (
        (7, 21),
        (0.2, 1.5),
        (0.3, 1.2),
        (1.0, 25.0),
        (0.05, 2.5),
        (30, 95),
    )
    assert r1.kernel_kinds == ("iso", "aniso") and r1.kernel_probs == (0.5, 0.5)
    assert set(r1.resize_modes) == {"area", "bilinear", "bicubic"}
    (f,) = DEGRADATIONS["codeformer_face"].rounds
    assert (f.kernel_size, f.blur_sigma, f.downsample, f.gaussian_sigma, f.jpeg_quality, f.kernel_probs) == (
        (41, 41),
        (0.1, 12.0),
        (1.0, 12.0),
        (0.0, 15.0),
        (30, 100),
        (0.5, 0.5),
    )
    (w,) = DEGRADATIONS["face_wide"].rounds
    assert (w.downsample, w.blur_sigma) == ((1.0, 12.0), (0.1, 12.0))


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_same_seed_bit_exact_different_seeds_differ(name):
    img = _image(48, 80)
    a, pa = degrade(img, name, 1234)
    b, pb = degrade(img, name, 1234)
    assert np.array_equal(a, b) and pa == pb
    c, pc = degrade(img, name, 1235)
    assert not np.array_equal(a, c) and pa != pc
    # a Generator continues its stream: two draws from one generator differ, and equal a re-run
    g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
    x1, y1 = degrade(img, name, g1)[0], degrade(img, name, g1)[0]
    x2, y2 = degrade(img, name, g2)[0], degrade(img, name, g2)[0]
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, y1)
    assert a.shape == img.shape  # non-square input comes back at its own size


def test_gaussian_kernel_moments():
    k = gaussian_kernel(41, 2.0, 4.0, math.pi / 6)
    assert k.shape == (41, 41) and abs(k.sum() - 1) < 1e-5 and (k >= 0).all()
    ax = np.arange(41) - 20.0
    xx, yy = np.meshgrid(ax, ax)
    cov = np.array([[np.sum(k * xx * xx), np.sum(k * xx * yy)], [np.sum(k * xx * yy), np.sum(k * yy * yy)]])
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rot = np.array([[c, -s], [s, c]])
    want = rot @ np.diag([4.0, 16.0]) @ rot.T
    np.testing.assert_allclose(cov, want, atol=0.02)  # a wide kernel: truncation is negligible
    iso = gaussian_kernel(7, 1.0, 1.0, 0.0)
    np.testing.assert_allclose(iso, iso.T, atol=1e-7)
    np.testing.assert_allclose(iso, iso[::-1, ::-1], atol=1e-7)


def test_severity_orders_the_damage():
    """Pure noise: sigma 25 hurts more than sigma 2; pure blur: sigma 3 more than 0.3 (measured by MSE)."""
    img = _image(64, 64)

    def only(**kw):
        base = DegradationRound(
            blur_sigma=None, resize_scale=None, gaussian_sigma=None, poisson_scale=None, jpeg_quality=None
        )
        return DegradationConfig("t", (replace(base, **kw),), quantize=False)

    def mse(cfg):
        return float(np.mean([np.mean((degrade(img, cfg, s)[0] - img) ** 2) for s in range(5)]))

    assert mse(only(gaussian_prob=1.0, gaussian_sigma=(25.0, 25.0), gray_noise_prob=0.0)) > 20 * mse(
        only(gaussian_prob=1.0, gaussian_sigma=(2.0, 2.0), gray_noise_prob=0.0)
    )
    gauss = only(gaussian_prob=1.0, gaussian_sigma=(10.0, 10.0), gray_noise_prob=0.0)
    noise = degrade(img, gauss, 0)[0] - img
    assert abs(noise[16:48].std() * 255 - 10) < 1.0  # sigma is in 0-255 units
    assert mse(only(blur_sigma=(3.0, 3.0))) > 3 * mse(only(blur_sigma=(0.3, 0.3)))
    nothing = DegradationConfig(
        "none",
        (
            DegradationRound(
                blur_sigma=None, resize_scale=None, gaussian_sigma=None, poisson_scale=None, jpeg_quality=None
            ),
        ),
        quantize=False,
    )
    assert np.array_equal(degrade(img, nothing, 0)[0], img)


def test_bad_configs_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="low <= high"):
        DegradationRound(blur_sigma=(3.0, 0.2))
    with pytest.raises(ValueError, match="not both"):
        DegradationRound(downsample=(1.0, 4.0))
    with pytest.raises(ValueError, match="probabilities"):
        DegradationRound(kernel_probs=(0.7, 0.7))
    with pytest.raises(ValueError, match="odd"):
        DegradationRound(kernel_size=(8, 8))
    with pytest.raises(KeyError, match="unknown degradation preset"):
        degrade(_image(), "nope", 0)
    with pytest.raises(ValueError, match="HxWx3"):
        degrade(np.zeros((8, 8)), "realesrgan_2nd_order", 0)
    with pytest.raises(ValueError, match="seed"):
        degrade(_image(), "realesrgan_2nd_order", None)


# ------------------------------------------------------------------------------ data set
def _write_images(folder, sizes):
    from diffbir_core.imageio import save_image

    folder.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        save_image(folder / f"img{i}.png", _image(h, w, seed=i))
    return folder


def test_dataset_deterministic_per_seed_index_epoch(tmp_path):
    from diffbir_core.data import PairedDegradationDataset, collate_pairs

    folder = _write_images(tmp_path / "hq", [(40, 56), (24, 30), (64, 64)])
    ds = PairedDegradationDataset(folder, crop=32, cfg="realesrgan_2nd_order", seed=3)
    assert len(ds) == 3
    a, b = ds[(1, 0)], ds[(1, 0)]
    assert torch.equal(a["hq"], b["hq"]) and torch.equal(a["lq"], b["lq"]) and a["params"] == b["params"]
    assert a["hq"].shape == (3, 32, 32) and a["lq"].shape == (3, 32, 32) and a["hq"].dtype == torch.float32
    assert a["params"]["crop"]["box"][2:] == (32, 32)  # 24x30 was resized up to fit a 32 crop
    assert not torch.equal(ds[(1, 1)]["lq"], a["lq"])  # another epoch, another draw
    assert not torch.equal(PairedDegradationDataset(folder, crop=32, seed=4)[(1, 0)]["lq"], a["lq"])
    ds.set_epoch(0)
    assert torch.equal(ds[1]["lq"], a["lq"])
    # the HQ crop is the image's pixels (up to flip) for a big-enough image
    it = ds[(0, 0)]
    top, left, _, _ = it["params"]["crop"]["box"]
    from diffbir_core.imageio import read_image

    src = read_image(ds.files[0]).rgb[top : top + 32, left : left + 32]
    if it["params"]["hflip"]:
        src = src[:, ::-1]
    assert np.array_equal(it["hq"].permute(1, 2, 0).numpy(), src)
    batch = collate_pairs([ds[(i, 0)] for i in range(3)])
    assert batch["hq"].shape == (3, 3, 32, 32) and len(batch["params"]) == 3
    # aligned faces: whole image resized, never cropped
    face = PairedDegradationDataset(folder, crop=32, cfg="codeformer_face", seed=0, face_aligned=True)
    assert face[(2, 0)]["params"]["crop"]["box"] is None and face[(2, 0)]["hq"].shape == (3, 32, 32)


def test_dataset_errors(tmp_path):
    from diffbir_core.data import PairedDegradationDataset
    from diffbir_core.imageio import ImageReadError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        PairedDegradationDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        PairedDegradationDataset(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    ds = PairedDegradationDataset(bad, crop=16)
    with pytest.raises(ImageReadError, match="broken.png"):
        ds[0]
    lst = tmp_path / "list.txt"
    lst.write_text("# header\n\n")
    with pytest.raises(ValueError, match="empty"):
        PairedDegradationDataset(lst)


def test_epoch_sampler_resumes_and_shards():
    from itertools import islice

    from diffbir_core.data import EpochSampler

    full = list(islice(iter(EpochSampler(5, 2, seed=1)), 14))  # 7 micro-steps
    assert sorted(i for i, e in full if e == 0) == list(range(5))  # each epoch is a permutation
    resumed = list(islice(iter(EpochSampler(5, 2, seed=1, start_micro_step=3)), 8))
    assert resumed == full[6:14]
    r0 = list(islice(iter(EpochSampler(5, 1, seed=1, rank=0, world_size=2)), 7))
    r1 = list(islice(iter(EpochSampler(5, 1, seed=1, rank=1, world_size=2)), 7))
    assert [x for pair in zip(r0, r1) for x in pair] == full  # 2 ranks x batch 1 == 1 rank x batch 2

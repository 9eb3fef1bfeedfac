"""diffbir_eval.metrics: PSNR/SSIM/NIQE against pyiqa's calibration file, closed-form checks, weight-file handling
of LPIPS / MANIQA / FID / IDS (offline errors name the file and its source; loading works from a path).
Library equality (lpips, pyiqa) is in tests/test_eval_names.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffbir_eval import metrics as M
from diffbir_eval.metrics import MetricWeightsError, build_metric, psnr, rgb_to_y, ssim

CAL_NAMES = ["I03.bmp", "I04.bmp", "I06.bmp", "I08.bmp", "I19.bmp"]
# pyiqa tests/test_metric_general.py: torch.allclose(ours, official, atol, rtol), niqe has its own rtol
PYIQA_TOL = {"psnr": (1e-2, 1e-2), "ssim": (1e-2, 1e-2), "niqe": (1e-2, 6e-2)}


def _official(data_dir: Path) -> dict[str, np.ndarray]:
    rows = (data_dir / "iqa_calibration" / "results_official.csv").read_text().splitlines()
    head = rows[0].split(",")[1:]
    assert head == CAL_NAMES
    return {r.split(",")[0]: np.array([float(x) for x in r.split(",")[1:]]) for r in rows[1:]}


@pytest.fixture(scope="module")
def calibration(data_dir):
    from diffbir_core.imageio import read_image

    cal = data_dir / "iqa_calibration"
    dist = [read_image(cal / "dist_dir" / n).rgb for n in CAL_NAMES]
    ref = [read_image(cal / "ref_dir" / n).rgb for n in CAL_NAMES]
    return dist, ref, _official(data_dir)


def _assert_pyiqa_close(ours, official, metric):
    atol, rtol = PYIQA_TOL[metric]
    ours, official = np.asarray(ours), np.asarray(official)
    bad = np.abs(ours - official) > atol + rtol * np.abs(official)
    assert not bad.any(), f"{metric}: ours {ours} vs official {official}"


def test_psnr_ssim_reproduce_calibration(calibration):
    dist, ref, off = calibration
    # the calibration's PSNR is on RGB, its SSIM on MATLAB rgb2gray (as MATLAB's ssim.m is run)
    _assert_pyiqa_close([psnr(d, r, channel="rgb") for d, r in zip(dist, ref)], off["psnr"], "psnr")
    _assert_pyiqa_close([ssim(d, r, channel="gray") for d, r in zip(dist, ref)], off["ssim"], "ssim")
    # the metric objects used by the runner give the same numbers
    assert build_metric("psnr_rgb")(dist[0], ref[0])["psnr_rgb"] == psnr(dist[0], ref[0], channel="rgb")


def test_niqe_reproduces_calibration(calibration):
    dist, _, off = calibration
    niqe = build_metric("niqe")
    _assert_pyiqa_close([niqe(d)["niqe"] for d in dist], off["niqe"], "niqe")


def test_y_channel_ssim_and_psnr_match_independent_implementations(calibration):
    from pyiqa.archs.psnr_arch import psnr as pyiqa_psnr
    from skimage.metrics import structural_similarity

    dist, ref, _ = calibration
    for d, r in zip(dist[:3], ref[:3]):
        sk = structural_similarity(
            rgb_to_y(d), rgb_to_y(r), gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
        )
        assert abs(ssim(d, r) - sk) < 1e-9
        t = [torch.from_numpy(x).permute(2, 0, 1)[None].double() for x in (d, r)]
        ref_psnr = float(pyiqa_psnr(t[0], t[1], test_y_channel=True, color_space="ycbcr", eps=0).item())
        assert abs(psnr(d, r) - ref_psnr) < 1e-6


def test_niqe_params_equal_basicsr(shared_dir):
    import scipy.io

    mat = scipy.io.loadmat(M.NIQE_PARAMS)
    npz = np.load(shared_dir / "params" / "niqe_pris_params.npz")
    np.testing.assert_array_equal(np.ravel(mat["mu_prisparam"]), np.ravel(npz["mu_pris_param"]))
    np.testing.assert_array_equal(mat["cov_prisparam"], npz["cov_pris_param"])


def test_psnr_closed_form_and_border_crop():
    rng = np.random.default_rng(0)
    gt = rng.integers(20, 200, (40, 48, 3)).astype(np.float32) / 255
    img = gt + np.float32(5 / 255)  # every value off by 5 levels -> MSE 25 on RGB
    assert psnr(img, gt, channel="rgb") == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-4)
    # on Y the offset is scaled by (65.481 + 128.553 + 24.966) / 255
    dy = 5 * (65.481 + 128.553 + 24.966) / 255
    assert psnr(img, gt) == pytest.approx(10 * math.log10(255**2 / dy**2), abs=1e-4)
    assert psnr(gt, gt) == math.inf
    edge = gt.copy()
    edge[:2] = 0  # only the top two rows differ
    assert psnr(edge, gt, crop_border=2) == math.inf and psnr(edge, gt) < 40
    with pytest.raises(ValueError, match="differ in size"):
        psnr(gt[:-1], gt)


def test_ssim_identity_rgb_mean_and_small_input():
    rng = np.random.default_rng(1)
    gt = rng.random((32, 32, 3)).astype(np.float32)
    assert ssim(gt, gt) == pytest.approx(1.0) and ssim(gt, gt, channel="rgb") == pytest.approx(1.0)
    noisy = np.clip(gt + rng.normal(0, 0.1, gt.shape), 0, 1).astype(np.float32)
    per_channel = [
        ssim(np.repeat(noisy[..., c : c + 1], 3, 2), np.repeat(gt[..., c : c + 1], 3, 2), channel="gray")
        for c in range(3)
    ]
    assert 0 < ssim(noisy, gt, channel="rgb") < 1
    # rgb2gray of a grey image is the image itself (up to rounding to 8 bits), so this is the channel mean
    assert ssim(noisy, gt, channel="rgb") == pytest.approx(np.mean(per_channel), abs=2e-2)
    with pytest.raises(ValueError, match="11x11"):
        ssim(gt[:10, :10], gt[:10, :10])


def test_parse_metrics_and_directions():
    assert M.parse_metrics("psnr, ssim niqe,psnr") == ["psnr", "ssim", "niqe"]
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        M.parse_metrics("psnr,nope")
    d = M.COLUMN_DIRECTIONS
    assert d["psnr"] is True and d["ssim"] is True and d["maniqa"] is True and d["ids_cos"] is True
    assert d["lpips"] is False and d["niqe"] is False and d["fid"] is False and d["ids_deg"] is False
    assert d["id_dist_dlib"] is False and d["id_dlib_fallback"] is None


@pytest.fixture
def no_metric_caches(tmp_path, monkeypatch):
    """Offline, with every cache folder empty."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFBIR_CACHE", str(tmp_path / "diffbir_cache"))
    monkeypatch.delenv("DIFFBIR_METRIC_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    return tmp_path


@pytest.mark.parametrize(
    "metric, filename, source",
    [
        ("lpips", "alexnet-owt-7be5be79.pth", "download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
        ("maniqa", "ckpt_koniq10k.pt", "huggingface.co/chaofengc/IQA-PyTorch-Weights"),
        ("fid", "pt_inception-2015-12-05-6726825d.pth", "github.com/mseitzer/pytorch-fid/releases"),
        ("ids", "arcface_resnet18.pth", "github.com/TencentARC/GFPGAN/releases/download/v0.1.0/arcface_resnet18.pth"),
    ],
)
def test_offline_missing_weights_error_names_file_and_source(no_metric_caches, metric, filename, source):
    with pytest.raises(MetricWeightsError) as e:
        build_metric(metric)
    msg = str(e.value)
    assert filename in msg and source in msg and "HF_HUB_OFFLINE" in msg and "--metric-weights" in msg


def test_explicit_path_that_does_not_exist(no_metric_caches):
    with pytest.raises(MetricWeightsError, match="the given path .*does not exist"):
        build_metric("lpips", weight_paths={"lpips_alexnet": str(no_metric_caches / "nope.pth")})


def test_weights_found_in_folder(no_metric_caches):
    d = no_metric_caches / "w"
    d.mkdir()
    (d / "arcface_resnet18.pth").write_bytes(b"x")
    assert M.resolve_metric_file("arcface_resnet18", weights_dir=d) == d / "arcface_resnet18.pth"


def test_lpips_refuses_a_file_that_is_not_alexnet(tmp_path):
    torch.save({"classifier.1.weight": torch.zeros(2, 2)}, tmp_path / "bad.pth")
    with pytest.raises(MetricWeightsError, match=r"lpips: the library could not load .*alexnet-owt-7be5be79.pth"):
        build_metric("lpips", weight_paths={"lpips_alexnet": str(tmp_path / "bad.pth")})


def test_ids_arcface_layout_and_identity(tmp_path):
    from diffbir_eval.arcface import ResNetArcFace

    torch.manual_seed(0)
    net = ResNetArcFace()
    sd = net.state_dict()
    # the key layout of GFPGAN's arcface_resnet18.pth (ResNetArcFace, IRBlock [2,2,2,2], no SE)
    assert tuple(sd["fc5.weight"].shape) == (512, 512 * 8 * 8)
    for k in (
        "conv1.weight",
        "prelu.weight",
        "layer1.0.bn0.weight",
        "layer1.1.prelu.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "bn4.weight",
        "bn5.running_var",
    ):
        assert k in sd
    assert "layer1.0.downsample.0.weight" not in sd
    f = tmp_path / "arcface_resnet18.pth"
    torch.save(sd, f)
    m = build_metric("ids", weight_paths={"arcface_resnet18": str(f)})
    rng = np.random.default_rng(0)
    a = rng.random((96, 96, 3)).astype(np.float32)
    same = m(a, a)
    assert same["ids_cos"] == pytest.approx(1.0, abs=1e-6) and same["ids_deg"] < 0.2
    other = m(a, rng.random((96, 96, 3)).astype(np.float32))
    assert other["ids_cos"] < 1 - 1e-6
    assert other["ids_deg"] == pytest.approx(math.degrees(math.acos(other["ids_cos"])))

"""diffbir_eval.metrics by pyiqa names: every name resolves, and each library-backed metric equals the library's own
call on the same images and the same (random) weights - LPIPS vs ``lpips.LPIPS(net="alex")`` finding its
weights in its own torch-hub cache, FID features and value vs pyiqa's ``get_folder_features`` / ``fid``, pyiqa
metrics vs ``pyiqa.create_metric(name, pretrained_model_path=...)``; PSNR/SSIM vs pyiqa's psnr/psnry/ssim/ssimc;
IDS in degrees = degrees(arccos(cosine)); one error listing every missing file of a metric set. Offline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from diffbir_eval import metrics as M
from diffbir_eval.metrics import METRICS, MetricWeightsError, build_metric

ISSUE_NAMES = [
    "psnr",
    "ssim",
    "ssim_pyiqa",
    "psnr_rgb",
    "ssim_rgb",
    "lpips",
    "lpips-vgg",
    "dists",
    "niqe",
    "niqe_matlab",
    "musiq",
    "clipiqa",
    "maniqa",
    "maniqa-pipal",
    "fid",
    "ids",
]


def random_state_dict(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Random tensors in the module's key layout (positive BN variances)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if not v.is_floating_point():
            out[k] = torch.zeros_like(v)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(v.shape, generator=g) * scale
    return out


def _images(n: int = 3, hw: tuple[int, int] = (64, 72), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = [rng.random((hw[0] // 8, hw[1] // 8, 3)) for _ in range(n)]
    return [
        np.clip(np.kron(b, np.ones((8, 8, 1))) + rng.normal(0, 0.05, (*hw, 3)), 0, 1).astype(np.float32) for b in base
    ]


def _t(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float()


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFBIR_CACHE", str(tmp_path / "diffbir_cache"))
    monkeypatch.delenv("DIFFBIR_METRIC_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    return tmp_path


def test_every_issue_name_resolves_with_a_full_convention():
    assert set(ISSUE_NAMES) <= set(METRICS)
    for name in ISSUE_NAMES:
        assert M.parse_metrics(name) == [name]
        s = METRICS[name]
        conv = s.convention
        for part in ("checkpoint:", "colour:", "crop:"):
            assert part in conv, (name, conv)
        if s.dist:  # a library: its installed version is in the string
            from importlib.metadata import version

            assert f"[{s.dist} {version(s.dist)}]" in conv
        for f in s.files:
            assert f in M.METRIC_FILES and f in M.LIBRARY_PLACE
    # pyiqa's own spellings of the same computations
    assert M.parse_metrics("ssimc lpips_vgg ids_deg") == ["ssim_rgb", "lpips-vgg", "ids"]
    with pytest.raises(ValueError, match="unknown metric 'psnry'"):  # pyiqa's psnry is Y of YIQ: not ours
        M.parse_metrics("psnry")
    assert [c for c, _ in METRICS["ids"].columns] == ["ids_cos", "ids_deg"]
    assert "| `maniqa` |" in M.convention_table() and "KonIQ" in METRICS["maniqa"].convention
    assert "PIPAL" in METRICS["maniqa-pipal"].convention and "clean-fid" in METRICS["fid"].convention
    assert "FFHQ" in METRICS["fid"].convention


def _ssim_map_parts(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Luminance and contrast-structure maps of SSIM on one 0..255 plane (Gaussian 11, sigma 1.5, 'valid')."""
    import cv2

    g = cv2.getGaussianKernel(11, 1.5)
    w = g @ g.T

    def f(x):
        return cv2.filter2D(x, -1, w)[5:-5, 5:-5]

    ma, mb = f(a), f(b)
    saa, sbb, sab = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return (2 * ma * mb + c1) / (ma**2 + mb**2 + c1), (2 * sab + c2) / (saa + sbb + c2)


def test_pixel_metrics_equal_pyiqa(data_dir):
    import pyiqa

    from diffbir_core.imageio import read_image

    cal = data_dir / "iqa_calibration"
    heavy = [
        (read_image(cal / "dist_dir" / n).rgb[:160, :192], read_image(cal / "ref_dir" / n).rgb[:160, :192])
        for n in ("I03.bmp", "I04.bmp")
    ]
    gt = heavy[0][1]
    mild = (np.clip(gt + np.random.default_rng(0).normal(0, 0.02, gt.shape), 0, 1).astype(np.float32), gt)
    y = {"test_y_channel": True, "color_space": "ycbcr"}  # OSEDiff's calls; pyiqa's default Y channel is YIQ
    # eps=0: BasicSR's PSNR has none; pyiqa adds 1e-8 to the MSE by default (< 0.001 dB below 40 dB)
    lib = {
        "psnr": pyiqa.create_metric("psnr", device="cpu", eps=0, **y),
        "psnr_rgb": pyiqa.create_metric("psnr", device="cpu", eps=0),
        "ssim": pyiqa.create_metric("ssim", device="cpu", **y),
        "ssim_rgb": pyiqa.create_metric("ssimc", device="cpu"),
    }
    ours = {k: build_metric(k) for k in [*lib, "ssim_pyiqa"]}
    assert ours["ssim_rgb"](*mild)["ssim_rgb"] == pytest.approx(
        float(lib["ssim_rgb"](_t(mild[0]), _t(mild[1]))), abs=2e-3
    )
    for d, r in [*heavy, mild]:
        for k in ("psnr", "psnr_rgb"):
            assert ours[k](d, r)[k] == pytest.approx(float(lib[k](_t(d), _t(r)).item()), abs=1e-3), k
        # ssim_pyiqa is pyiqa's own call
        assert ours["ssim_pyiqa"](d, r)["ssim_pyiqa"] == pytest.approx(float(lib["ssim"](_t(d), _t(r))), abs=1e-7)
    # pyiqa's SSIM = the same formula on Y rounded to integer levels, contrast-structure map clipped at 0 (ReLU);
    # ours (BasicSR/MATLAB) = unrounded Y, no clipping. Both checked against the closed form on each pair.
    for d, r in [*heavy, mild]:
        ya, yb = M.rgb_to_y(d), M.rgb_to_y(r)
        lum, cs = _ssim_map_parts(ya, yb)
        assert ours["ssim"](d, r)["ssim"] == pytest.approx(float((lum * cs).mean()), abs=1e-9)
        lum_r, cs_r = _ssim_map_parts(np.rint(ya), np.rint(yb))
        want = float((lum_r * np.maximum(cs_r, 0)).mean())
        assert float(lib["ssim"](_t(d), _t(r))) == pytest.approx(want, abs=1e-4)
        assert ours["ssim_pyiqa"](d, r)["ssim_pyiqa"] == pytest.approx(want, abs=1e-4)
    assert _ssim_map_parts(M.rgb_to_y(heavy[0][0]), M.rgb_to_y(heavy[0][1]))[1].min() < 0  # the clip matters here


def test_lpips_equals_lpips_package_with_its_own_weights(tmp_path, monkeypatch):
    import lpips
    import torchvision

    sd = random_state_dict(torchvision.models.alexnet(), seed=1)
    ours_dir, hub = tmp_path / "w", tmp_path / "hub"
    for d in (ours_dir, hub / "checkpoints"):
        d.mkdir(parents=True)
        torch.save(sd, d / "alexnet-owt-7be5be79.pth")
    m = build_metric("lpips", weights_dir=ours_dir)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))  # the library finds the file in its own cache
    ref = lpips.LPIPS(net="alex", version="0.1", verbose=False).eval()
    a, b, c = _images(3)
    for x, y in ((a, b), (a, c), (b, c)):
        want = float(ref(_t(x), _t(y), normalize=True).item())
        assert m(x, y)["lpips"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert m(a, b)["lpips"] != m(a, c)["lpips"] and m(a, a)["lpips"] == pytest.approx(0.0, abs=1e-7)


@pytest.fixture(scope="module")
def random_fid_file(tmp_path_factory):
    from diffbir_eval.fid import FIDInception

    f = tmp_path_factory.mktemp("fidw") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_state_dict(FIDInception().net, seed=2, scale=0.1), f)
    return f


def test_fid_features_and_value_equal_pyiqa(tmp_path, monkeypatch, random_fid_file):
    import pyiqa
    import pyiqa.utils.download_util as du
    from pyiqa.archs.fid_arch import get_folder_features

    from diffbir_core.imageio import read_image, save_image

    folders = {}
    for k, seed in (("a", 0), ("b", 1)):
        folders[k] = tmp_path / k
        for i, img in enumerate(_images(2, (48, 40), seed)):
            save_image(folders[k] / f"im{i}.png", img)
    m = build_metric("fid", weight_paths={"fid_inception": str(random_fid_file)})
    ours = {k: np.stack([m.features(read_image(p).rgb) for p in sorted(d.glob("*.png"))]) for k, d in folders.items()}
    monkeypatch.setattr(du, "DEFAULT_CACHE_DIR", str(random_fid_file.parent))  # pyiqa's own cache lookup
    lib = pyiqa.create_metric("fid", device="cpu")
    theirs = get_folder_features(
        str(folders["a"]),
        lib.net.model,
        num_workers=0,
        batch_size=2,
        device=torch.device("cpu"),
        mode="clean",
        verbose=False,
    )
    assert ours["a"].shape == (2, 2048) and np.ptp(ours["a"], axis=0).max() > 0
    np.testing.assert_allclose(ours["a"], theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
    want = float(lib(str(folders["a"]), str(folders["b"]), mode="clean", num_workers=0, verbose=False))
    from diffbir_eval.fid import fid_from_features

    assert fid_from_features(ours["a"], ours["b"]) == pytest.approx(want, rel=1e-4)


def test_niqe_and_niqe_matlab_equal_pyiqa_calls(data_dir):
    import pyiqa

    from diffbir_core.imageio import read_image

    img = read_image(data_dir / "iqa_calibration" / "dist_dir" / "I04.bmp").rgb
    # niqe_matlab's own file is not here: give it the standard parameters (same keys) on both sides
    for name, kw in (("niqe", {}), ("niqe_matlab", {"weight_paths": {"niqe_matlab": str(M.NIQE_PARAMS)}})):
        want = float(pyiqa.create_metric(name, device="cpu", pretrained_model_path=str(M.NIQE_PARAMS))(_t(img)).item())
        assert build_metric(name, **kw)(img)[name] == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="at least 96x96"):
        build_metric("niqe")(img[:90, :90])


def test_musiq_equals_pyiqa_with_the_same_checkpoint(tmp_path):
    import pyiqa
    from pyiqa.archs.musiq_arch import MUSIQ

    f = tmp_path / "musiq_koniq_ckpt-e95806b9.pth"
    torch.save(random_state_dict(MUSIQ(pretrained=False), seed=3), f)
    m = build_metric("musiq", weights_dir=tmp_path)
    ref = pyiqa.create_metric("musiq", device="cpu", pretrained_model_path=str(f))
    img = _images(1, (64, 48), 5)[0]
    assert m(img)["musiq"] == pytest.approx(float(ref(_t(img)).item()), rel=1e-5)


def test_clipiqa_equals_pyiqa_with_the_same_backbone_file(tmp_path):
    """A tiny random ResNet CLIP saved as TorchScript (pyiqa's loader reads OpenAI's RN50.pt, a TorchScript archive,
    and builds the model from its state dict): our metric vs pyiqa's own call on the same file."""
    import pyiqa
    from pyiqa.archs.clip_model import CLIP

    class Holder(torch.nn.Module):  # CLIP's state-dict keys with a trivial, traceable forward
        def __init__(self, m):
            super().__init__()
            for k, v in m.named_children():
                setattr(self, k, v)
            for k, v in m.named_parameters(recurse=False):
                setattr(self, k, v)

        def forward(self, x):
            return x * self.logit_scale

    torch.manual_seed(0)
    clip = CLIP(64, 224, (1, 1, 1, 1), 32, None, 77, 49408, 64, 2, 1)
    holder = Holder(clip)
    assert holder.state_dict().keys() == clip.state_dict().keys()
    f = tmp_path / "RN50.pt"
    torch.jit.save(torch.jit.trace(holder, torch.zeros(1)), str(f))
    m = build_metric("clipiqa", weight_paths={"clip_rn50": str(f)})
    ref = pyiqa.create_metric("clipiqa", device="cpu", backbone=str(f))
    a, b = _images(2, (64, 80), 9)
    assert m(a)["clipiqa"] == pytest.approx(float(ref(_t(a))), rel=1e-6)
    assert m(b)["clipiqa"] == pytest.approx(float(ref(_t(b))), rel=1e-6) and m(a) != m(b)


def test_ids_degrees_are_arccos_of_cosine(tmp_path):
    from diffbir_eval.arcface import ResNetArcFace

    torch.manual_seed(0)
    f = tmp_path / "arcface_resnet18.pth"
    torch.save(ResNetArcFace().state_dict(), f)
    m = build_metric("ids", weights_dir=tmp_path)
    a, b = _images(2, (96, 96), 7)
    r = m(a, b)
    assert set(r) == {"ids_cos", "ids_deg"} and -1 <= r["ids_cos"] < 1 - 1e-6
    assert r["ids_deg"] == pytest.approx(math.degrees(math.acos(r["ids_cos"])), abs=1e-12)
    assert m(a, a)["ids_deg"] < 0.2


def test_one_error_lists_every_missing_file_of_a_metric_set(offline_caches):
    with pytest.raises(MetricWeightsError) as e:
        M.build_metrics(["psnr", "lpips", "dists", "fid", "maniqa-pipal", "clipiqa"])
    msg = str(e.value)
    assert msg.count("\n  - ") == 6  # alexnet, vgg16, DISTS, inception, MANIQA-PIPAL, RN50 - once each
    for f in (
        "alexnet-owt-7be5be79.pth",
        "vgg16-397923af.pth",
        "DISTS_weights-f5e65c96.pth",
        "pt_inception-2015-12-05-6726825d.pth",
        "MANIQA_PIPAL-ae6d356b.pth",
        "RN50.pt",
        "download.pytorch.org/models/vgg16-397923af.pth",
        "huggingface.co/chaofengc/IQA-PyTorch-Weights",
        "HF_HUB_OFFLINE",
        "--metric-weights",
    ):
        assert f in msg, f
    assert "for lpips-vgg" not in msg and "for dists" in msg
    assert M.build_metrics(["psnr", "niqe"]).keys() == {"psnr", "niqe"}  # nothing to download: builds offline


def test_library_cache_refuses_downloads_and_restores(tmp_path):
    import pyiqa.utils.download_util as du

    before = (torch.hub.get_dir(), du.DEFAULT_CACHE_DIR)
    (tmp_path / "x.pth").write_bytes(b"0")
    with M.library_cache({"dists": tmp_path / "x.pth"}) as view:
        assert (view / "pyiqa" / "DISTS_weights-f5e65c96.pth").resolve() == (tmp_path / "x.pth").resolve()
        assert du.DEFAULT_CACHE_DIR == str(view / "pyiqa") and torch.hub.get_dir() == str(view)
        with pytest.raises(MetricWeightsError, match="tried to download"):
            torch.hub.load_state_dict_from_url("https://example.invalid/nothing.pth")
    assert (torch.hub.get_dir(), du.DEFAULT_CACHE_DIR) == before and not Path(view).exists()


@pytest.mark.slow
@pytest.mark.parametrize("name, key", [("maniqa", "maniqa_koniq"), ("maniqa-pipal", "maniqa_pipal")])
def test_maniqa_equals_pyiqa_with_the_same_checkpoint(tmp_path, name, key):
    import pyiqa
    from pyiqa.archs.maniqa_arch import MANIQA

    opts = {"train_dataset": "koniq", "scale": 0.8} if name == "maniqa" else {"train_dataset": "pipal"}
    with M._timm_without_download():
        sd = random_state_dict(MANIQA(pretrained=False, **opts), seed=4)
    f = tmp_path / M.METRIC_FILES[key].filename
    torch.save(sd, f)  # bare state dict, as pyiqa's released files
    torch.save({"params": sd}, tmp_path / "wrapped.pth")  # pyiqa's pretrained_model_path wants 'params'
    m = build_metric(name, weights_dir=tmp_path)
    with M._timm_without_download():
        ref = pyiqa.create_metric(name, device="cpu", pretrained_model_path=str(tmp_path / "wrapped.pth"))
    m.net.net.test_sample = ref.net.test_sample = 1  # one crop checks the weights (ViT-B/8 is slow on a CPU)
    img = _images(1, (240, 256), 6)[0]
    torch.manual_seed(0)
    got = m(img)[name]
    torch.manual_seed(0)
    assert got == pytest.approx(float(ref(_t(img)).item()), rel=1e-5)


@pytest.mark.slow
def test_lpips_vgg_and_dists_equal_their_libraries(tmp_path, monkeypatch):
    import lpips
    import pyiqa
    import torchvision
    from pyiqa.archs.dists_arch import DISTS

    with torch.device("meta"):
        vgg = torchvision.models.vgg16()
    sd = random_state_dict(vgg, seed=5, scale=0.02)
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(sd, hub / "checkpoints" / "vgg16-397923af.pth")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "vgg16-397923af.pth").symlink_to(hub / "checkpoints" / "vgg16-397923af.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    d_sd = {k: v for k, v in DISTS(pretrained=False).state_dict().items() if k in ("alpha", "beta")}
    d_sd = {"alpha": d_sd["alpha"].abs() + 0.01, "beta": d_sd["beta"].abs() + 0.01}
    torch.save(d_sd, tmp_path / "w" / "DISTS_weights-f5e65c96.pth")
    a, b = _images(2, (64, 64), 8)
    m = build_metric("lpips-vgg", weights_dir=tmp_path / "w")
    ref = lpips.LPIPS(net="vgg", version="0.1", verbose=False).eval()
    assert m(a, b)["lpips-vgg"] == pytest.approx(float(ref(_t(a), _t(b), normalize=True).item()), rel=1e-5)
    m = build_metric("dists", weights_dir=tmp_path / "w")
    ref = pyiqa.create_metric(
        "dists", device="cpu", pretrained_model_path=str(tmp_path / "w" / "DISTS_weights-f5e65c96.pth")
    )
    assert m(a, b)["dists"] == pytest.approx(float(ref(_t(a), _t(b)).item()), rel=1e-5)

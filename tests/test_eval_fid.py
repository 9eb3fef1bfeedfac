"""diffbir_eval.fid: the Frechet distance against the closed form on Gaussian features, the statistics path, and FID
through the runner with a real Inception-V3 graph (random weights) whose features must equal those of pyiqa's
own FID Inception (`pyiqa.archs.inception.InceptionV3`, use_fid_inception=True) given the same weights."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from diffbir_eval.fid import feature_stats, fid_from_features, frechet_distance, load_stats, save_stats


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d)


def closed_form(mu1, s1, mu2, s2):
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2), the trace from the (general) eigenvalues of S1 S2."""
    lam = np.linalg.eigvals(s1 @ s2)
    assert np.abs(lam.imag).max() < 1e-8 and lam.real.min() > 0
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(lam.real)))


def scipy_sqrtm_form(mu1, s1, mu2, s2):
    """pytorch-fid's formula with scipy.linalg.sqrtm."""
    from scipy import linalg

    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_closed_form():
    rng = np.random.default_rng(0)
    for d in (1, 3, 16):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _spd(rng, d), _spd(rng, d)
        got = frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(closed_form(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
        assert got == pytest.approx(scipy_sqrtm_form(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
    # diagonal (commuting) covariances: sum (sqrt(a) - sqrt(b))^2 + ||dmu||^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    assert frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b)) == pytest.approx(3 + 1 + 1)
    s = _spd(rng, 5)
    assert frechet_distance(np.ones(5), s, np.ones(5), s) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_path_converges_to_closed_form(tmp_path):
    rng = np.random.default_rng(1)
    d, n = 4, 40000
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _spd(rng, d), _spd(rng, d)
    f1 = rng.multivariate_normal(mu1, s1, size=n)
    f2 = rng.multivariate_normal(mu2, s2, size=n)
    expect = closed_form(mu1, s1, mu2, s2)
    m1, c1 = feature_stats(f1)
    np.testing.assert_allclose(c1, np.cov(f1, rowvar=False))  # unbiased covariance, as clean-fid
    # reference statistics through a clean-fid style .npz, scored with the runner's FID entry point
    p = save_stats(tmp_path / "ref.npz", *feature_stats(f2))
    mu_r, s_r = load_stats(p)
    from diffbir_eval.metrics import FIDMetric

    got = FIDMetric.score(f1, mu_r, s_r)
    assert got == pytest.approx(expect, rel=0.05, abs=0.05)
    assert frechet_distance(m1, c1, mu_r, s_r) == got
    # the low-rank path (features on both sides, N < D) is the same number
    g1, g2 = rng.normal(size=(7, 32)), rng.normal(size=(9, 32)) * 2 + 1
    assert fid_from_features(g1, g2) == pytest.approx(
        frechet_distance(*feature_stats(g1), *feature_stats(g2)), rel=1e-7, abs=1e-7
    )
    assert fid_from_features(g1, g1) == pytest.approx(0.0, abs=1e-9)
    np.savez(tmp_path / "bad.npz", mean=mu1)
    with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
        load_stats(tmp_path / "bad.npz")


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    from diffbir_eval.fid import FIDInception

    torch.manual_seed(0)
    f = tmp_path_factory.mktemp("fidw") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(FIDInception().net.state_dict(), f)
    return f


@pytest.fixture(scope="module")
def pyiqa_fid_net(random_inception_file):
    """pyiqa's FID Inception with the same random weights: its weight download is replaced by a strict load of
    our file, which has the file name pyiqa asks for."""
    from pyiqa.archs import inception as pi

    asked = []

    def load(net, url, *args, **kwargs):
        asked.append(url)
        net.load_state_dict(torch.load(random_inception_file, weights_only=True), strict=True)

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision: "pretrained is deprecated" (it is False)
        mp.setattr(pi, "load_pretrained_network", load)
        net = pi.InceptionV3(output_blocks=[3], resize_input=False, normalize_input=False).eval()
    assert [u.rsplit("/", 1)[-1] for u in asked] == [random_inception_file.name]
    return net


def test_fid_features_are_pyiqas_and_a_folder_against_itself_is_zero(tmp_path, random_inception_file, pyiqa_fid_net):
    from diffbir_core.imageio import read_image, save_image
    from diffbir_eval.datasets import open_dataset, validate
    from diffbir_eval.fid import clean_resize
    from diffbir_eval.loop import run_eval
    from diffbir_eval.store import RunOptions

    rng = np.random.default_rng(0)
    gt = tmp_path / "gt"
    for i in range(3):
        base = rng.random((8, 8, 3)).astype(np.float32)
        save_image(gt / f"im{i}.png", np.kron(base, np.ones((6, 6, 1), np.float32)))  # 48x48, smooth blocks
    ds = validate(open_dataset(f"folder:{gt}:{gt}"))
    opts = RunOptions(metrics=["fid"], weight_paths={"fid_inception": str(random_inception_file)}, verbose=False)
    summary = run_eval(ds, f"outputs:{gt}", tmp_path / "run", opts)
    fid = summary["set_metrics"]["fid"]
    assert fid["reference"]["kind"] == "folder" and fid["n"] == 3 and fid["reference_n"] == 3
    feats = np.stack([np.load(p) for p in sorted((tmp_path / "run" / "features" / "fid").glob("*.npy"))])
    assert feats.shape == (3, 2048) and np.ptp(feats, axis=0).max() > 0  # real, varying features
    # the features are pyiqa's FID Inception's on the same 8-bit images (Inception input (x - 128) / 128, as
    # TF-FID; pyiqa's own normalize_input is 2x - 1 on [0, 1], hence given the scaled input)
    for i, f in enumerate(feats):
        x = torch.from_numpy((clean_resize(read_image(gt / f"im{i}.png").rgb) - 128.0) / 128.0)[None]
        with torch.no_grad():
            want = pyiqa_fid_net(x)[0].flatten().double().numpy()
        np.testing.assert_allclose(f, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    scale = np.trace(np.cov(feats, rowvar=False))
    assert scale > 0 and abs(fid["value"]) <= 1e-9 * max(1.0, scale)

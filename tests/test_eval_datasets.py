"""diffbir_eval.datasets: named sets under --root, folder:/synthetic: specs, validation errors that say what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from diffbir_core.imageio import save_image
from diffbir_eval.datasets import DATASETS, DatasetError, open_dataset, validate


def _img(path: Path, h: int, w: int, seed: int = 0) -> Path:
    save_image(path, np.random.default_rng(seed).random((h, w, 3)).astype(np.float32))
    return path


def test_registry_matches_the_paper():
    expected = {
        "realsrset": 20,
        "real47": 47,
        "celeba_test": 3000,
        "lfw_test": 1711,
        "celebchild_test": 180,
        "wider_test": 970,
    }
    for name, n in expected.items():
        assert DATASETS[name].expected == n
        assert DATASETS[name].source  # where to download it
    assert DATASETS["celeba_test"].has_gt and not DATASETS["wider_test"].has_gt
    assert DATASETS["realsrset"].scale == 4 and DATASETS["celeba_test"].scale == 1
    assert DATASETS["lfw_test"].fid_reference == "fid_ffhq512"


def test_shared_data_sets_open(data_dir):
    for name, n in (("realsrset", 20), ("Real47", 47), ("set5", 5)):
        ds = validate(open_dataset(name, root=data_dir))
        assert len(ds.items) == n
    s5 = open_dataset("set5", root=data_dir)
    assert s5.items[0].name == "baby" and s5.items[0].lq.name == "babyx4.png" and s5.spec.crop_border == 4


def test_count_mismatch_and_missing_folder(tmp_path):
    d = tmp_path / "RealSRSet"
    for i in range(19):
        _img(d / f"im{i:02d}.png", 8, 8, i)
    with pytest.raises(DatasetError, match=r"(?s)19 images .* RealSRSet has 20 .*github.com/cszn/BSRGAN"):
        validate(open_dataset("realsrset", root=tmp_path))
    ds = validate(open_dataset("RealSRSet", root=tmp_path, allow_count_mismatch=True))
    assert len(ds.items) == 19 and ds.lq_dir == d
    with pytest.raises(DatasetError, match=r"(?s)no LQ folder found .*WIDER-Test.*CodeFormer"):
        open_dataset("wider_test", root=tmp_path)
    with pytest.raises(DatasetError, match="--root"):
        open_dataset("lfw_test")
    with pytest.raises(DatasetError, match="unknown dataset 'celeba'.*celeba_test"):
        open_dataset("celeba", root=tmp_path)


def test_pairs_sizes_and_missing_gt(tmp_path):
    lq, gt = tmp_path / "Set5" / "LR_bicubic" / "X4", tmp_path / "Set5" / "HR"
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        _img(lq / f"{name}x4.png", 6, 5, i)
        _img(gt / f"{name}.png", 24, 20 if name != "c" else 21, i)
    with pytest.raises(DatasetError, match=r"(?s)size mismatch.*c: LQ 6x5 x4 = 24x20 but GT is 24x21"):
        validate(open_dataset("set5", root=tmp_path))
    (gt / "c.png").unlink()
    with pytest.raises(DatasetError, match=r"LQ image\(s\) have no GT.*'c'"):
        validate(open_dataset("set5", root=tmp_path))


def test_folder_dataset(tmp_path):
    for i in range(3):
        _img(tmp_path / "lq" / f"im{i}_lq.png", 8, 8, i)
        _img(tmp_path / "gt" / f"im{i}.png", 16, 16, i)
    ds = validate(open_dataset(f"folder:{tmp_path / 'lq'}:{tmp_path / 'gt'}"))
    assert [it.name for it in ds.items] == ["im0", "im1", "im2"] and ds.spec.scale == 2 and ds.has_gt
    nogt = validate(open_dataset(f"folder:{tmp_path / 'lq'}", scale=4))
    assert nogt.spec.scale == 4 and not nogt.has_gt and nogt.items[0].gt is None
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "lq" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"1 unreadable LQ image\(s\): broken.png"):
        validate(open_dataset(f"folder:{tmp_path / 'lq'}"))


def test_synthetic_pairs_are_reproducible(tmp_path):
    for i in range(3):
        _img(tmp_path / "hq" / f"f{i}.png", 32, 32, i)
    a = validate(open_dataset(f"synthetic:{tmp_path / 'hq'}:codeformer_face:7"))
    b = open_dataset(f"synthetic:{tmp_path / 'hq'}:codeformer_face:7")
    assert a.has_gt and a.items[1].lq is None and a.spec.scale == 1
    lq_a, params = a.load_lq(a.items[1])
    lq_b, _ = b.load_lq(b.items[1])  # same seed, same name -> the same LQ, whatever came before
    assert lq_a.shape == (32, 32, 3) and np.array_equal(lq_a, lq_b) and params["preset"] == "codeformer_face"
    other, _ = open_dataset(f"synthetic:{tmp_path / 'hq'}:codeformer_face:8").load_lq(a.items[1])
    assert not np.array_equal(lq_a, other)
    assert not np.array_equal(lq_a, a.load_lq(a.items[0])[0])
    with pytest.raises(DatasetError, match="unknown degradation preset 'nope'"):
        open_dataset(f"synthetic:{tmp_path / 'hq'}:nope")

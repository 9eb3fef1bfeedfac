"""diffbir_eval.registry / diffbir_eval.data: every set of the issue is registered with its provenance; the shipped
sha256 lists
match the copies in shared/data; `check` finds missing, extra and corrupted files; `fetch` verifies what it
downloads and fails offline with a message saying what to do (the network is simulated, never used)."""

from __future__ import annotations

import io
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from diffbir_eval import registry as R
from diffbir_eval.data import __main__ as cli
from diffbir_eval.datasets import DATASETS, open_dataset, validate

ISSUE_SETS = [
    "realsrset",
    "real47",
    "celeba_test",
    "lfw_test",
    "celebchild_test",
    "wider_test",
    "set5",
    "realsr",
    "drealsr",
    "div2k_val",
]


def test_every_set_is_registered_with_provenance():
    assert sorted(R.REGISTRY) == sorted(ISSUE_SETS)
    for name, rec in R.REGISTRY.items():
        assert name in DATASETS  # diffbir_eval.run can open it
        assert rec.url.startswith("https://") and rec.paper and rec.licence and rec.count_source and rec.layout
        sums = rec.checksums
        if sums is None:
            assert rec.total_bytes is None and rec.download is None and rec.how_to_get
        else:
            assert len(sums) == rec.count and rec.total_bytes == sum(b for _, b, _ in sums) > 0
            assert all(len(s) == 64 for _, _, s in sums)
    have = {n for n, r in R.REGISTRY.items() if r.checksums is not None}
    assert have == {"realsrset", "real47", "set5", "realsr", "drealsr"}
    # DatasetSpec counts are pairs / images; the registry counts files
    assert R.REGISTRY["realsr"].count == 2 * DATASETS["realsr"].expected == 200
    assert R.REGISTRY["drealsr"].count == 2 * DATASETS["drealsr"].expected == 186
    assert R.REGISTRY["celeba_test"].count == 2 * DATASETS["celeba_test"].expected


@pytest.mark.parametrize("name, sub", [("realsrset", "realsrset"), ("real47", "real47"), ("set5", "set5")])
def test_shipped_checksums_match_shared_data(data_dir, name, sub):
    rep = R.check(name, data_dir / sub)
    assert rep.ok and rep.checksums_known and not rep.bad_sha, str(rep)
    assert "OK" in str(rep)


def test_check_finds_missing_extra_and_corrupted(tmp_path, data_dir):
    d = tmp_path / "set5"
    shutil.copytree(data_dir / "set5", d)
    (d / "LR_bicubic" / "X4" / "headx4.png").unlink()
    (d / "HR" / "extra.png").write_bytes(b"x")
    f = d / "HR" / "bird.png"
    f.write_bytes(f.read_bytes()[:-1] + b"\0")
    rep = R.check("set5", d)
    assert not rep.ok
    assert (
        rep.missing == ["LR_bicubic/X4/headx4.png"] and rep.extra == ["HR/extra.png"] and rep.bad_sha == ["HR/bird.png"]
    )
    assert cli.main(["check", "set5", str(d)]) == 1
    assert cli.main(["check", "set5", str(data_dir / "set5")]) == 0
    with pytest.raises(R.DataError, match="is not a folder"):
        R.check("set5", tmp_path / "nope")
    with pytest.raises(R.DataError, match="unknown set 'nope'"):
        R.check("nope", d)


def test_check_without_checksums_counts_files(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    rep = R.check("celebchild_test", tmp_path)
    assert not rep.ok and not rep.checksums_known and "checksums unknown" in str(rep) and "expected 180" in str(rep)


def test_fetch_offline_says_what_to_do(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(R.DataError) as e:
        R.fetch("realsrset", tmp_path / "out")
    msg = str(e.value)
    assert "raw.githubusercontent.com/cszn/BSRGAN/5ce1a9c6ae292f30ccfce4b597ecb73c70401733/testsets/RealSRSet/" in msg
    assert (
        "0/20 files" in msg
        and "python -m diffbir_eval.data check realsrset" in msg
        and "run the same command again" in msg
    )
    with pytest.raises(R.DataError, match=r"(?s)cannot be downloaded directly.*GFPGAN project page.*check lfw_test"):
        R.fetch("lfw_test", tmp_path / "lfw")
    assert cli.main(["fetch", "wider_test", str(tmp_path / "w")]) == 2


def test_fetch_verifies_every_download(tmp_path, monkeypatch, data_dir):
    """A fake server that serves the files of shared/data by their GitHub raw URL."""
    rec = R.REGISTRY["set5"]
    served = {rec.download.url(rel): (data_dir / "set5" / rel).read_bytes() for rel, _, _ in rec.checksums}
    calls = []

    def serve(url, timeout=None):
        calls.append(url)
        return io.BytesIO(served[url])

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    rep = R.fetch("set5", tmp_path / "s5")
    assert rep.ok and len(calls) == 10
    ds = validate(open_dataset("set5", root=tmp_path / "s5"))  # the layout diffbir_eval.run reads
    assert len(ds.items) == 5
    R.fetch("set5", tmp_path / "s5")  # everything verified already: nothing downloaded again
    assert len(calls) == 10
    first = next(iter(served))
    served[first] = b"changed upstream"
    with pytest.raises(R.DataError, match="another sha256"):
        R.fetch("set5", tmp_path / "other")
    assert not any(Path(tmp_path / "other").rglob("*.png"))


def test_cli_list_prints_every_set(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ISSUE_SETS:
        assert f"| `{name}` |" in out
    assert "diffbir_eval/assets/checksums/realsr.tsv (fetch: yes)" in out and "| unknown |" in out

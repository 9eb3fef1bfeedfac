"""The offline identity metric (dlib face descriptors): same-identity pairs of shared/data/identity_pairs
must be closer than every pair of different people."""

from __future__ import annotations

import itertools
import re

import pytest

from diffbir_core.imageio import read_image
from diffbir_eval.metrics import build_metric

SAME = {("Einstein01.png", "Einstein02.png"), ("Hepburn01.png", "Hepburn02.png")}


def _identity(name: str) -> str:
    """'Hepburn02.png' -> 'Hepburn'; the numbered files ('067_David_Beckham_00.png') are one person each."""
    return re.sub(r"\d+\.png$", "", name) if name[0].isalpha() else name


def test_dlib_identity_ranks_same_person_pairs_first(data_dir):
    folder = data_dir / "identity_pairs"
    names = sorted(p.name for p in folder.glob("*.png"))
    assert {n for pair in SAME for n in pair} <= set(names)
    m = build_metric("id_dist_dlib")
    desc = {}
    for n in names:
        d, fallback = m.descriptor(read_image(folder / n).rgb)
        assert not fallback, f"no face detected in {n}"
        desc[n] = d
    dist = {(a, b): float(((desc[a] - desc[b]) ** 2).sum() ** 0.5) for a, b in itertools.combinations(names, 2)}
    same = [dist[p] for p in SAME]
    different = [v for (a, b), v in dist.items() if _identity(a) != _identity(b)]
    assert len(different) == len(dist) - len(SAME)
    assert max(same) < min(different), (same, sorted(different)[:3])
    assert max(same) < 0.6  # dlib's own same-person threshold
    # the metric object: the distance between an image and itself is 0, no fallback
    img = read_image(folder / "Hepburn01.png").rgb
    assert m(img, img) == {"id_dist_dlib": pytest.approx(0.0, abs=1e-9), "id_dlib_fallback": 0.0}
    pair = m(img, read_image(folder / "Hepburn02.png").rgb)
    assert pair["id_dist_dlib"] == pytest.approx(dist[("Hepburn01.png", "Hepburn02.png")])

"""End-to-end parity with the official ``inference.py`` runs in DIFFBIR_E2E_DIR (set C; see tests/e2e_support.py).

For every run the official code completed: our CLI parser turns the translated argv into `RestoreParams`, our
pipeline runs with the tiny models built from the folder's own configs and weights and the recorded draws,
and the PNG (max abs diff <= 2/255) and the recorded intermediates (within 1e-4 * max(1, max|ref|)) must
match. Runs the official code crashed on get a test of OUR behaviour for the same request instead.
The folder must exist (the tests fail, never skip, without it).
"""
from __future__ import annotations

import pytest
import torch

import e2e_support as E

pytestmark = pytest.mark.e2e

META = E.load_meta(E.E2E_DIR) if (E.E2E_DIR / "meta.json").is_file() else {"runs": {}}


@pytest.fixture(scope="module")
def fixture_dir():
    assert (E.E2E_DIR / "meta.json").is_file(), (
        f"e2e fixtures not found at {E.E2E_DIR}; set DIFFBIR_E2E_DIR to the diffbir_e2e folder")
    torch.set_num_threads(1)
    return E.E2E_DIR


@pytest.fixture(scope="module")
def models(fixture_dir):
    return E.ModelCache(fixture_dir)


def test_fixture_present_and_enumerated(fixture_dir):
    assert E.run_names(META, ok=True), "no successful official run in meta.json"


@pytest.mark.parametrize("name", E.run_names(META, ok=True))
def test_official_run(name, fixture_dir, models, tmp_path):
    out = E.run_ours(name, fixture_dir, models, tmp_path, meta=META)
    assert out.noise_left == 0, f"{out.noise_left} recorded draws unused"
    res = E.compare_run(name, out, fixture_dir, META)
    bad = {k: v for k, v in res.items() if v[0] > v[1]}
    print(name, {k: f"{v[0]:.3g}" for k, v in res.items()})
    assert not bad, f"{name}: {bad}\nour argv: {E.quote(out.argv)}"

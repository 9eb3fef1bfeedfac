"""Shared pytest set-up: offline hub, fixture locations, tiny helpers.

Tests never touch the network: HF_HUB_OFFLINE=1 is set before anything imports huggingface_hub.
Parity fixtures are read from DIFFBIR_PARITY_DIR (default ../shared/fixtures/diffbir_ref), whole official CLI
runs from DIFFBIR_E2E_DIR (default ../shared/fixtures/diffbir_e2e). Markers say what a test needs, and the
collection hook below keeps them true: a test that uses `parity_dir` must be marked `parity`, one that uses
`e2e_dir` must be marked `e2e`, a test module that names a fixture folder itself must mark all its tests, and
every `e2e` test is also `parity` (so `-m "not parity"` runs without ../shared/fixtures at all).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFBIR_SHARED_DIR", ROOT.parent / "shared"))
PARITY_DIR = Path(os.environ.get("DIFFBIR_PARITY_DIR", SHARED / "fixtures" / "diffbir_ref"))
E2E_DIR = Path(os.environ.get("DIFFBIR_E2E_DIR", SHARED / "fixtures" / "diffbir_e2e"))
DATA_DIR = SHARED / "data"

# fixture -> the marker every test using it (directly or through other fixtures) must carry
FIXTURE_MARKERS = {"parity_dir": "parity", "e2e_dir": "e2e"}
# a test module whose source names a fixture folder itself (not through the fixture) -> marker for all its tests
SOURCE_MARKERS = {
    "parity": re.compile(r"PARITY_DIR|diffbir_ref|fixtures/diffbir"),
    "e2e": re.compile(r"E2E_DIR|diffbir_e2e"),
}


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The parity fixture directory. Parity tests FAIL (never skip) when it is missing."""
    assert PARITY_DIR.is_dir(), (
        f"parity fixtures not found at {PARITY_DIR}; set DIFFBIR_PARITY_DIR to the diffbir_ref folder"
    )
    return PARITY_DIR


@pytest.fixture(scope="session")
def e2e_dir() -> Path:
    """The whole-CLI official runs (set C). e2e tests FAIL (never skip) when it is missing."""
    assert (E2E_DIR / "meta.json").is_file(), (
        f"e2e fixtures not found at {E2E_DIR}; set DIFFBIR_E2E_DIR to the diffbir_e2e folder"
    )
    return E2E_DIR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA_DIR.is_dir(), f"shared test data not found at {DATA_DIR} (set DIFFBIR_SHARED_DIR)"
    return DATA_DIR


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"shared folder not found at {SHARED} (set DIFFBIR_SHARED_DIR)"
    return SHARED


_SOURCE_CACHE: dict[Path, str] = {}


def _module_source(item: pytest.Item) -> str:
    path = Path(str(item.fspath))
    if path not in _SOURCE_CACHE:
        _SOURCE_CACHE[path] = path.read_text(encoding="utf-8") if path.suffix == ".py" else ""
    return _SOURCE_CACHE[path]


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker, so the added `parity` marks count
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fail the run when a test needs ../shared/fixtures but does not say so with its marker."""
    problems = []
    for item in items:
        used = set(getattr(item, "fixturenames", ()))  # the whole closure, fixtures of fixtures included
        for fixture, mark in FIXTURE_MARKERS.items():
            if fixture in used and item.get_closest_marker(mark) is None:
                problems.append(f"{item.nodeid}: uses the {fixture} fixture but is not marked @pytest.mark.{mark}")
        source = _module_source(item)
        for mark, pattern in SOURCE_MARKERS.items():
            hit = pattern.search(source)
            if hit and item.get_closest_marker(mark) is None:
                problems.append(
                    f"{item.nodeid}: its module names the fixture folder ({hit.group(0)!r}) but the "
                    f"test is not marked @pytest.mark.{mark} (or use the {mark}_dir fixture)"
                )
        if item.get_closest_marker("e2e") is not None and item.get_closest_marker("parity") is None:
            item.add_marker(pytest.mark.parity)  # e2e runs need ../shared/fixtures too
    if problems:
        raise pytest.UsageError("tests that need ../shared/fixtures without their marker:\n  " + "\n  ".join(problems))

"""Shared pytest set-up: offline hub, fixture locations, tiny helpers.

Tests never touch the network: HF_HUB_OFFLINE=1 is set before anything imports huggingface_hub.
Parity fixtures are read from DIFFBIR_PARITY_DIR (default ../shared/fixtures/diffbir_ref).
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFBIR_SHARED_DIR", ROOT.parent / "shared"))
PARITY_DIR = Path(os.environ.get("DIFFBIR_PARITY_DIR", SHARED / "fixtures" / "diffbir_ref"))
DATA_DIR = SHARED / "data"


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    """The parity fixture directory. Parity tests FAIL (never skip) when it is missing."""
    assert PARITY_DIR.is_dir(), (
        f"parity fixtures not found at {PARITY_DIR}; set DIFFBIR_PARITY_DIR to the diffbir_ref folder"
    )
    return PARITY_DIR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA_DIR.is_dir(), f"shared test data not found at {DATA_DIR} (set DIFFBIR_SHARED_DIR)"
    return DATA_DIR


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"shared folder not found at {SHARED} (set DIFFBIR_SHARED_DIR)"
    return SHARED

"""diffbir_core/allocator.py: the glibc tuning keeps freed memory, `release_freed_memory` hands it back.

Known answers from the kernel's own accounting (/proc/self/status RssAnon) around a 256 MiB tensor freed while
tuned: kept in the heap (resident) until the release, gone after it. Linux + glibc (the machines we support for
the tuning; elsewhere it is a documented no-op).
"""

from __future__ import annotations

import platform

import pytest
import torch

from diffbir_core.allocator import malloc_is_tuned, release_freed_memory, tune_malloc

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc tuning"
)


def _anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_release_returns_what_the_tuning_kept():
    try:
        assert tune_malloc(True).startswith("allocator: glibc keeps") and malloc_is_tuned()
        before = _anon_mib()
        x = torch.ones(64, 1024, 1024)  # 256 MiB, written: resident
        assert _anon_mib() - before > 200
        del x
        kept = _anon_mib() - before
        assert kept > 200, f"the tuning should keep the freed block resident, kept {kept:.0f} MiB"
        assert release_freed_memory() is True
        assert _anon_mib() - before < 64, "malloc_trim should have returned the kept block"
    finally:
        tune_malloc(False)
    assert not malloc_is_tuned() and release_freed_memory() is False


def test_defaults_while_a_tiled_run():
    from diffbir_core.allocator import defaults_while

    try:
        tune_malloc(True)
        with defaults_while(False) as switched:
            assert not switched and malloc_is_tuned()
        with defaults_while(True) as switched:
            assert switched and not malloc_is_tuned()
            before = _anon_mib()
            x = torch.ones(64, 1024, 1024)
            del x
            assert _anon_mib() - before < 64, "glibc's defaults unmap a freed 256 MiB block at once"
        assert malloc_is_tuned()
    finally:
        tune_malloc(False)
    with defaults_while(True) as switched:  # not tuned: nothing to switch
        assert not switched

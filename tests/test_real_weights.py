"""Real official weights (never present in CI): run only where $DIFFBIR_WEIGHTS_DIR holds the files.

These check what tiny fixtures cannot: the full-size checkpoints load strictly through our loaders and
restore a real photo. Everything else about them (key maps, formulas) is covered by the parity tests.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from diffbir_core.weights import WeightsError, resolve

pytestmark = pytest.mark.weights


def _need(*names: str) -> None:
    if not os.environ.get("DIFFBIR_WEIGHTS_DIR"):
        pytest.skip("real weights: set DIFFBIR_WEIGHTS_DIR to a folder with the official checkpoints")
    try:
        for n in names:
            resolve(n, download=False)
    except WeightsError as e:
        pytest.skip(f"real weights missing: {str(e).splitlines()[0]}")


@pytest.mark.parametrize("preset", ["v1-general", "v2", "v2.1"])
def test_preset_restores_a_real_photo(preset, data_dir):
    from diffbir_core.config import RestoreParams
    from diffbir_core.imageio import read_image
    from diffbir_core.pipeline import DiffBIRPipeline

    params = RestoreParams.from_preset(preset, steps=4, upscale=2)
    _need(params.stage2.sd, params.stage2.control, params.cleaner_for_task())
    img = read_image(data_dir / "realsrset" / "Lincoln.png")
    res = DiffBIRPipeline(device="cuda" if os.environ.get("DIFFBIR_TEST_CUDA") else "cpu").restore(img, params)
    assert res.image.shape == (320, 320, 3) and np.isfinite(res.image).all()
    # a real restorer stays close to its own stage-1 output in colour (wavelet colour fix)
    assert abs(float(res.image.mean()) - float(res.stage1.mean())) < 0.05

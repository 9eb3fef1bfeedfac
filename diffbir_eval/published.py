"""Published numbers placed beside ours by `diffbir_eval.table`, each with its primary source and protocol.

Only numbers read from a primary source belong here (the authors' own paper, README or released log), copied
digit for digit, with the file and commit they come from. A set of cells with no primary source at hand is
listed in `MISSING` instead, so the table says "source needed" rather than guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MISSING", "OSEDIFF_PROTOCOL", "PUBLISHED", "Published"]


@dataclass(frozen=True)
class Published:
    """One method's published numbers on one dataset ({our column name: value}; a published SSIM computed with
    pyiqa is our ``ssim_pyiqa`` column)."""

    method: str
    dataset: str  # diffbir_eval.datasets name
    values: dict[str, float]
    source: str  # where exactly the numbers are written
    protocol: str  # how they were computed, as far as the source says


OSEDIFF_PROTOCOL = (
    "OSEDiff test_metrics.py (cswry/OSEDiff@851cb88): pyiqa create_metric('psnr'/'ssim', test_y_channel=True, "
    "color_space='ycbcr') (pyiqa's PSNR adds eps 1e-8 to the MSE), 'lpips' (pyiqa's LPIPS v0.1 alex checkpoint), "
    "'dists', 'clipiqa', 'niqe' (pyiqa's own parameter file), 'musiq', 'maniqa-pipal'; means over images; "
    "FID = pyiqa 'fid' of the GT folder vs the output folder (clean mode); no border crop; 128 -> 512; 8-bit PNG "
    "outputs read with cv2"
)

_OSEDIFF_README = (
    "OSEDiff README (github.com/cswry/OSEDiff@6a7ac4f, section 'Benchmark Results'; the same lines end "
    "the committed logs preset/datasets/benchmark_{realsr,drealsr}/results_osediff/metrics/"
    "test_METRICS_*.log @851cb88; the README says they match the paper's Table 1)"
)

PUBLISHED: list[Published] = [
    Published(
        "OSEDiff (published)",
        "realsr",
        {
            "psnr": 25.1511,
            "ssim_pyiqa": 0.7341,
            "lpips": 0.2921,
            "dists": 0.2128,
            "clipiqa": 0.6693,
            "niqe": 5.6476,
            "musiq": 69.0896,
            "maniqa-pipal": 0.6331,
            "fid": 123.493817,
        },
        _OSEDIFF_README,
        OSEDIFF_PROTOCOL,
    ),
    Published(
        "OSEDiff (published)",
        "drealsr",
        {
            "psnr": 27.9243,
            "ssim_pyiqa": 0.7835,
            "lpips": 0.2968,
            "dists": 0.2165,
            "clipiqa": 0.6963,
            "niqe": 6.4902,
            "musiq": 64.6537,
            "maniqa-pipal": 0.5895,
            "fid": 135.296586,
        },
        _OSEDIFF_README,
        OSEDIFF_PROTOCOL,
    ),
]

# (method, table) -> why the cells are empty
MISSING: dict[tuple[str, str], str] = {
    ("DiffBIR (paper)", "bsr-paper"): "source needed: the DiffBIR paper's tables (arXiv 2308.15070) were not "
    "available to us; cells left empty rather than guessed",
    ("DiffBIR (paper)", "bfr-paper"): "source needed: the DiffBIR paper's tables (arXiv 2308.15070) were not "
    "available to us; cells left empty rather than guessed",
    ("DiffBIR (paper)", "realsr-modern"): "source needed: DiffBIR's numbers under this protocol appear in OSEDiff's "
    "Table 1 (an image in its README), not transcribed here",
    ("OSEDiff (published)", "realsr-modern"): "DIV2K-val: the README gives only RealSR and DRealSR numbers as text",
}

"""The benchmark's roofline arithmetic (diffbir_eval/bench_official/roofline.py) against closed forms.

FLOP counts of single ops from their textbook formulas (conv: 2 N Cout Cin kh kw Ho Wo; matmul: 2 M N K; attention:
4 B H Lq Lk D, the same number torch's FlopCounterMode gives the explicit softmax(QK^T)V form), and the
floor / best-ratio rows from hand-computed values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffbir_eval.bench_official.roofline import count_flops, matmul_peak, roofline_rows


def test_conv_and_matmul_closed_form():
    x, w = torch.randn(2, 3, 10, 12), torch.randn(5, 3, 3, 3)
    assert count_flops(lambda: F.conv2d(x, w, padding=1)) == 2 * 2 * 5 * 3 * 3 * 3 * 10 * 12
    a, b = torch.randn(7, 11), torch.randn(11, 13)
    assert count_flops(lambda: a @ b) == 2 * 7 * 11 * 13
    lin = torch.nn.Linear(11, 4)
    assert count_flops(lambda: lin(a)) == 2 * 7 * 11 * 4


def test_cpu_attention_counted_like_the_math_form():
    q, k, v = torch.randn(1, 2, 64, 32), torch.randn(1, 2, 48, 32), torch.randn(1, 2, 48, 32)
    fused = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    math = count_flops(lambda: torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, -1) @ v)
    assert fused == math == 4 * 1 * 2 * 64 * 48 * 32


def test_rows_from_hand_values():
    cases = {
        "cfg_step": {"official_s": [9.0, 10.0, 11.0], "ours_s": [8.0, 9.0, 10.0]},
        "untimed": {"official_s": [], "ours_s": []},
    }
    flops = {"cfg_step": {"official": 2.0e12, "ours": 1.9e12}, "untimed": {"official": 1, "ours": 1}}
    (row,) = roofline_rows(cases, flops, peak_gflops=250.0, targets={"cfg_step": 0.5})
    assert row["case"] == "cfg_step"
    assert row["official_gflops"] == pytest.approx(200.0) and row["ours_gflops"] == pytest.approx(211.1, abs=0.05)
    assert row["official_peak_share"] == pytest.approx(0.8) and row["floor_s"] == pytest.approx(7.6)
    assert row["best_ratio"] == pytest.approx(7.6 / 10.0) and row["target"] == 0.5


def test_matmul_peak_is_a_rate():
    pk = matmul_peak(n=128, repeats=3)
    assert pk["n"] == 128 and 0 < pk["gflops_median"] <= pk["gflops_max"]

"""Roofline of the side-by-side benchmark: how many floating-point operations each case does, and the fastest
any fp32 implementation could run them on this machine (issue 17).

    python -m diffbir_eval.bench --against-official DIR --roofline      # after (or instead of) a timed run

What it computes
    * FLOPs per case, counted by torch's own ``torch.utils.flop_counter.FlopCounterMode`` (matmul, conv, bmm,
      SDPA; elementwise ops, norms and softmax are not counted, so the counts are lower bounds). The CPU SDPA
      kernel (``aten._scaled_dot_product_flash_attention_for_cpu``) is not in torch's table; it is counted with
      torch's own formula for the other SDPA kernels (``sdpa_flop_count``: 4 * B * H * Lq * Lk * D).
      Both sides are counted (the official whole restore, for instance, VAE-encodes its condition twice).
    * the attainable fp32 peak of this machine: the median rate of a large fp32 ``torch.mm`` (MKL / oneDNN
      sgemm, which runs at close to the FMA units' peak) with the benchmark's thread count;
    * per case: achieved GFLOP/s of both sides (FLOPs / the timed run's median seconds), the share of the peak,
      the floor time (our FLOPs / peak) and the best ratio any exact implementation of our FLOPs could reach
      against the official's measured time (floor / official median). A target below that ratio cannot be met
      by faster kernels; only by doing less arithmetic.
Not a mirror of any official code.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["count_flops", "matmul_peak", "roofline_rows"]


def _cpu_sdpa_mapping() -> dict:
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    aten = torch.ops.aten
    op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: cpu_sdpa}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (torch's FlopCounterMode, CPU SDPA included), run under inference mode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping())
    with torch.inference_mode(), counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(n: int = 2048, repeats: int = 7) -> dict:
    """Median fp32 ``torch.mm`` rate of two n x n matrices (2 n^3 FLOPs per call), after one warm-up call."""
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return dict(n=n, repeats=repeats, gflops_median=round(statistics.median(rates), 1), gflops_max=round(max(rates), 1))


def roofline_rows(cases: dict, flops: dict, peak_gflops: float, targets: dict) -> list[dict]:
    """Per case of a timed run (``cases``: name -> record with ``official_s`` / ``ours_s``) and its counts
    (``flops``: name -> {"official": n, "ours": n}): achieved rates, floor time, best reachable ratio."""
    rows = []
    for name, rec in cases.items():
        if name not in flops or not rec.get("official_s"):
            continue
        t_off, t_ours = statistics.median(rec["official_s"]), statistics.median(rec["ours_s"])
        f_off, f_ours = flops[name]["official"], flops[name]["ours"]
        floor = f_ours / (peak_gflops * 1e9)
        rows.append(
            dict(
                case=name,
                official_gflop=round(f_off / 1e9, 1),
                ours_gflop=round(f_ours / 1e9, 1),
                official_gflops=round(f_off / t_off / 1e9, 1),
                ours_gflops=round(f_ours / t_ours / 1e9, 1),
                official_peak_share=round(f_off / t_off / 1e9 / peak_gflops, 3),
                ours_peak_share=round(f_ours / t_ours / 1e9 / peak_gflops, 3),
                floor_s=round(floor, 2),
                best_ratio=round(floor / t_off, 3),
                target=targets.get(name),
            )
        )
    return rows

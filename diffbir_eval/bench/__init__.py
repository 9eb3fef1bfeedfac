"""Benchmark of a 4x restore to 512 / 1024 / 2048 pixels: time and peak memory, optimised vs a plain baseline.

    python -m diffbir_eval.bench                          # sizes 512 1024 2048, 2 steps, budget 9 GB, results/bench
    python -m diffbir_eval.bench --sizes 512 --steps 4 --probe-tiles 0 --baseline-sizes 512 1024

Library of the command (its CLI: ``bench/__main__.py``): `run_parent` runs one child process per output size
(``python -m diffbir_eval.bench --child SIZE``, `run_child`) and writes the tables; what is measured and how is
in `run_parent`'s docstring. Full-size models with RANDOM weights (nothing is downloaded); stage 2 runs through
`diffbir_core.stage2.run`, timed by its stage and step callbacks. No official counterpart (paper arXiv 2308.15070,
"Known
weaknesses": memory and minutes per image). A benchmark, not a test: tens of minutes on a 2-core CPU.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from diffbir_core.atomic import atomic_path, write_text

__all__ = ["MemoryMonitor", "PROMPT", "Probe", "run_child", "run_parent"]

PROMPT = "a photo of a cat"


# ----------------------------------------------------------------------------------------------------------
# measurement helpers
# ----------------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _trim() -> None:
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class MemoryMonitor:
    """Peak memory per labelled stage: CPU RSS sampled every ``interval`` s by a thread (and the exact process
    peak from VmHWM, reset with /proc/self/clear_refs when allowed); CUDA: max_memory_allocated per stage."""

    def __init__(self, device: str = "cpu", interval: float = 0.02) -> None:
        import torch

        self.cuda = torch.device(device).type == "cuda"
        self.interval = interval
        self.label = "idle"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = None if self.cuda else threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _status_kb("VmRSS") / 2**20
            self.peaks[self.label] = max(self.peaks.get(self.label, 0.0), rss)
            time.sleep(self.interval)

    def start(self) -> MemoryMonitor:
        try:
            with open("/proc/self/clear_refs", "w") as f:  # a kernel control file, not an output
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        if self._thread is not None:
            self._thread.start()
        return self

    def stage(self, label: str) -> None:
        if self.cuda:
            import torch

            self.peaks[self.label] = max(self.peaks.get(self.label, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            torch.cuda.reset_peak_memory_stats()
        self.label = label

    def stop(self) -> dict[str, float]:
        self.stage("idle")
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return {k: round(v, 3) for k, v in self.peaks.items() if k != "idle"}

    def process_peak_gb(self) -> float:

        if self.cuda:
            return round(max(self.peaks.values(), default=0.0), 3)
        return round(_status_kb("VmHWM") / 2**20, 3)


class Probe:
    """Progress callback timing tiled rounds (`tiling.TileEvent`). With ``k`` it stops every round after ``k``
    tiles (`tiling.StopTiles`) and extrapolates the round to all its tiles."""

    def __init__(self, k: int | None = None) -> None:
        self.k = k if k else None
        self.rounds: list[dict] = []

    def __call__(self, ev) -> None:
        from diffbir_core.tiling.windows import StopTiles

        now = time.perf_counter()
        if ev.index == -1:
            self.rounds.append(dict(stage=ev.stage, total=ev.total, t0=now, t_last=now, done=0, stopped=False))
            return
        r = self.rounds[-1]
        r["done"], r["t_last"] = ev.index + 1, now
        if self.k and r["done"] >= self.k and ev.total > r["done"]:
            r["stopped"] = True
            raise StopTiles

    def take(self, stage_prefix: str) -> tuple[float, float, int, bool]:
        """(measured seconds inside rounds, extrapolated seconds, rounds, any stopped) of rounds so far whose
        stage starts with ``stage_prefix``; they are removed."""
        mine = [r for r in self.rounds if r["stage"].startswith(stage_prefix)]
        self.rounds = [r for r in self.rounds if not r["stage"].startswith(stage_prefix)]
        meas = sum(r["t_last"] - r["t0"] for r in mine)
        est = sum((r["t_last"] - r["t0"]) * (r["total"] / r["done"] if r["done"] else 1.0) for r in mine)
        return meas, est, len(mine), any(r["stopped"] for r in mine)


# ----------------------------------------------------------------------------------------------------------
# child: one output size, one process
# ----------------------------------------------------------------------------------------------------------
def _lq_image(side: int):
    """A smooth colour pattern plus noise, ``side`` x ``side``, [1,3,h,w] in [0,1] (seeded)."""
    import torch

    g = torch.Generator().manual_seed(7)
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    img = torch.stack(
        [0.5 + 0.4 * torch.sin(6 * x + 2 * y), 0.5 + 0.4 * torch.cos(5 * y - x), 0.5 + 0.3 * torch.sin(9 * x * y)]
    )[None]
    return (img + 0.05 * torch.randn(img.shape, generator=g)).clamp(0, 1)


def _reset_models(ldm) -> None:
    import torch

    for part in ("unet", "controlnet", "vae"):
        getattr(ldm, part).to(memory_format=torch.contiguous_format)


def _run_config(name: str, size: int, ldm, cleaner_base, args, weights_bytes: int) -> dict:
    import torch

    from diffbir_core import stage2
    from diffbir_core.allocator import tune_malloc
    from diffbir_core.config import OFFICIAL_NEGATIVE_PROMPT, RestoreParams, TileOptions
    from diffbir_core.models.text import TextEmbeddingCache
    from diffbir_core.speed import SpeedOptions, apply_process_options, apply_speed_options
    from diffbir_core.tiling.cleaner import TiledCleaner
    from diffbir_core.tiling.plan import TilingPlan, auto_tiling

    device = args.device
    params = RestoreParams.from_preset(
        "v2",
        cleaner="swinir_general",
        upscale=4.0,
        steps=args.steps,
        sampler="spaced",
        cfg_scale=4.0,
        pos_prompt=PROMPT,
        neg_prompt=OFFICIAL_NEGATIVE_PROMPT,
        device=device,
        tiles=TileOptions(
            max_memory_gb=args.max_memory, latent_tile=args.latent_tile, latent_stride=args.latent_stride
        ),
    ).validate()
    _reset_models(ldm)
    if name == "baseline":
        speed = SpeedOptions(attention="math", channels_last=False, batched_cfg=False)
        plan = TilingPlan()
    else:
        speed = SpeedOptions()
        budget = int(args.max_memory * 2**30) if args.max_memory else None
        plan = auto_tiling(params, (size, size), device, weights_bytes=weights_bytes, budget_bytes=budget)
    notes = apply_speed_options(ldm, speed, device)
    if name == "baseline":
        notes.append(tune_malloc(False))  # glibc's own behaviour
    else:
        notes += apply_process_options(speed, device)  # what DiffBIRPipeline applies (allocator tuning on CPU)
    probe = Probe(args.probe_tiles if plan.any else None)
    cleaner = (
        TiledCleaner(cleaner_base, plan.cleaner_tile, plan.cleaner_overlap, progress=probe)
        if plan.cleaner
        else cleaner_base
    )
    times: dict[str, float] = {}
    est: dict[str, float] = {}
    probed: list[str] = []
    mon = MemoryMonitor(device).start()
    lq = _lq_image(size // 4).to(device)

    def record(stage: str, wall: float, prefix: str | None = None) -> None:
        times[stage] = times.get(stage, 0.0) + wall
        e = wall
        if prefix is not None:
            meas, extr, _, stopped = probe.take(prefix)
            e = wall - meas + extr
            if stopped:
                probed.append(stage)
        est[stage] = est.get(stage, 0.0) + e

    t_all = time.perf_counter()
    # 1. stage 1 (x4: the cleaner resizes the LQ to the output size, then restores)
    mon.stage("cleaner")
    t0 = time.perf_counter()
    with torch.inference_mode():
        clean = cleaner(lq, out_size=(size, size), clamp=False)
    clean = clean.clone()
    record("cleaner", time.perf_counter() - t0, "cleaner")
    # 2. stage 2 as the pipeline runs it (`stage2.run`), timed through its stage and step callbacks
    step_marks: list[float] = []
    sampling_start = [0.0]
    tiled_prefix = {"vae_encode": "vae_encoder", "vae_decode": "vae_decoder"}

    def on_stage(stage: str, seconds: float | None) -> None:
        if seconds is None:  # a stage starts
            mon.stage(stage)
            if stage == "sampling":
                sampling_start[0] = time.perf_counter()
        elif stage != "sampling":  # steps are timed by on_step
            record(stage, seconds, tiled_prefix.get(stage))

    def on_step(step) -> None:
        step_marks.append(time.perf_counter())

    encode_text = TextEmbeddingCache(ldm.encode_text) if name != "baseline" else ldm.encode_text
    out = stage2.run(
        ldm,
        clean,
        params,
        seed=0,
        callback=on_step,
        on_stage=on_stage,
        plan=plan,
        speed=speed,
        encode_text=encode_text,
        progress=probe,
    )
    step_times = [b - a for a, b in zip(sampling_start + step_marks[:-1], step_marks)]
    meas, extr, nrounds, stopped = probe.take("diffusion")
    step_est = [s - meas / max(1, nrounds) + extr / max(1, nrounds) for s in step_times] if nrounds else step_times
    if stopped:
        probed.append("steps")
    total_wall = time.perf_counter() - t_all
    peaks = mon.stop()
    assert out.shape[-2:] == (size, size)
    mean_step = sum(step_est) / len(step_est)
    fixed = sum(est.get(k, 0.0) for k in ("cleaner", "text", "vae_encode", "vae_decode", "colorfix"))
    return dict(
        config=name,
        size=size,
        pixels=size * size,
        steps_run=len(step_times),
        speed=speed.__dict__,
        speed_notes=notes,
        plan=plan.summary(),
        stage_wall_s={k: round(v, 2) for k, v in times.items()},
        stage_estimated_s={k: round(v, 2) for k, v in est.items()},
        step_wall_s=[round(s, 2) for s in step_times],
        step_estimated_s=[round(s, 2) for s in step_est],
        step_s=round(mean_step, 2),
        total_wall_s=round(total_wall, 2),
        total_50_steps_extrapolated_s=round(fixed + 50 * mean_step, 1),
        probed_stages=probed,
        probe_tiles=args.probe_tiles if probed else 0,
        stage_peak_rss_gb=peaks,
        peak_gb=mon.process_peak_gb(),
        finite=bool(torch.isfinite(out).all()) if not probed else None,
    )


def run_child(args) -> dict:
    """One output size (``args.child``) in this process: build the models, run ``args.configs``; -> the result."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from diffbir_core.cleaners import CLEANERS, Cleaner
    from diffbir_core.models.ldm import STAGE2_CONFIGS, build_control_ldm
    from diffbir_core.models.swinir import SWINIR_CONFIGS, SwinIR
    from diffbir_core.tiling.plan import model_bytes

    t0 = time.perf_counter()
    with torch.no_grad():
        if args.tiny_dir:  # smoke test: the fixture's tiny configs
            import yaml

            from diffbir_core.models.ldm import Stage2Config
            from diffbir_core.models.swinir import SwinIRConfig

            d = Path(args.tiny_dir) / "configs"
            ldm = build_control_ldm(Stage2Config.from_official(yaml.safe_load((d / "cldm_tiny.yaml").read_text())))
            swinir = SwinIR(SwinIRConfig.from_official(yaml.safe_load((d / "swinir_tiny.yaml").read_text())))
        elif args.sd:  # official-layout files through the product's loader (converted once, then the cache)
            from diffbir_core.models.ldm import load_pretrained_control_ldm

            ldm = load_pretrained_control_ldm(args.sd, args.control)
            swinir = SwinIR(SWINIR_CONFIGS["general_v1"])
        else:
            ldm = build_control_ldm(STAGE2_CONFIGS["sd21_base"])
            swinir = SwinIR(SWINIR_CONFIGS["general_v1"])
        ldm = ldm.eval().to(args.device)
        swinir = swinir.eval().requires_grad_(False)
    cleaner = Cleaner(CLEANERS["swinir_general"], swinir, args.device)
    build_s = time.perf_counter() - t0
    _trim()
    weights = model_bytes(ldm, swinir)
    res = dict(
        size=args.child,
        build_s=round(build_s, 1),
        weights_gb=round(weights / 2**30, 3),
        rss_after_build_gb=round(_status_kb("VmRSS") / 2**20, 3),
        build_peak_rss_gb=round(_status_kb("VmHWM") / 2**20, 3),  # the load's peak (stages reset VmHWM)
        loaded_from=[args.sd, args.control] if args.sd else None,
        runs=[],
    )
    for name in args.configs:
        print(f"[bench {args.child}] {name} ...", flush=True)
        r = _run_config(name, args.child, ldm, cleaner, args, weights)
        print(
            f"[bench {args.child}] {name}: step {r['step_s']} s, peak {r['peak_gb']} GB, "
            f"50-step total (extrapolated) {r['total_50_steps_extrapolated_s']} s",
            flush=True,
        )
        res["runs"].append(r)
        _trim()
    return res


# ----------------------------------------------------------------------------------------------------------
# parent: children, estimates, fits, table, plot
# ----------------------------------------------------------------------------------------------------------
def _baseline_estimate_gb(size: int, weights_gb: float) -> dict:
    """Memory-model peak of the untiled baseline (explicit attention stores heads x N x N scores)."""
    from diffbir_core.tiling.plan import RUNTIME_BYTES_CPU, estimate_stage_bytes

    gib = 2**30
    px, lat = size * size, (size // 8) ** 2
    stages = {
        "cleaner": estimate_stage_bytes("cleaner", px) / gib,
        "vae_encode": (estimate_stage_bytes("vae_encoder", px) + 2 * lat * lat * 4) / gib,
        "diffusion": (estimate_stage_bytes("diffusion", lat) / 2 + 2 * 5 * lat * lat * 4) / gib,  # batch 1, 5 heads
        "vae_decode": (estimate_stage_bytes("vae_decoder", px) + 2 * lat * lat * 4) / gib,
    }
    return dict(
        peak_gb=round(weights_gb + RUNTIME_BYTES_CPU / gib + max(stages.values()), 2),
        stages_gb={k: round(v, 2) for k, v in stages.items()},
    )


def _fit(xs: list[float], ys: list[float]) -> dict:
    """Least squares y = a + b x with R^2 and relative residuals."""
    n = len(xs)
    if n < 2:
        return {}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return dict(
        intercept=a,
        slope_per_pixel=b,
        slope_per_megapixel=b * 1e6,
        r2=1 - ss_res / ss_tot if ss_tot else 1.0,
        rel_residuals=[round((y - a - b * x) / y, 4) for x, y in zip(xs, ys)],
    )


def _machine(device: str, threads: int) -> dict:
    import torch

    info = dict(
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        cpu_count=os.cpu_count(),
        threads=threads,
        device=device,
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except (OSError, ImportError):
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        info["gpu"] = "none (this benchmark session had no GPU)"
    return info


def _write_report(out: Path, summary: dict) -> None:
    rows = []
    hdr = (
        "| size | config | tiling | cleaner s | VAE enc s | step s | VAE dec s | 50-step total s (extrap.) "
        "| peak RSS GB | notes |"
    )
    rows.append(hdr)
    rows.append("|" + "---|" * 10)
    for r in summary["rows"]:
        if r.get("not_run"):
            rows.append(
                f"| {r['size']} | {r['config']} | none | - | - | - | - | not run | "
                f"~{r['peak_gb']} (estimate) | {r['why']} |"
            )
            continue
        st = r["stage_estimated_s"]
        plan = r["plan"]
        tiles = [
            k
            for k, v in (
                ("cleaner", plan["cleaner"]),
                ("enc:" + plan["vae_encoder"]["mode"], plan["vae_encoder"]["mode"] != "none"),
                ("dec:" + plan["vae_decoder"]["mode"], plan["vae_decoder"]["mode"] != "none"),
                (f"diffusion {plan['latent_tile']}/{plan['latent_stride']}", plan["diffusion"]),
            )
            if v
        ]
        note = (
            f"probe {r['probe_tiles']} tile(s)/round: {', '.join(r['probed_stages'])}"
            if r["probed_stages"]
            else f"{r['steps_run']} steps measured"
        )
        if r.get("loaded_from"):
            note += f"; stage 2 loaded from official-layout files, load peak {r['build_peak_rss_gb']:.2f} GB"
        rows.append(
            f"| {r['size']} | {r['config']} | {', '.join(tiles) or 'none'} | {st.get('cleaner', 0):.1f} | "
            f"{st.get('vae_encode', 0):.1f} | {r['step_s']:.1f} | {st.get('vae_decode', 0):.1f} | "
            f"{r['total_50_steps_extrapolated_s']:.0f} | {r['peak_gb']:.2f} | {note} |"
        )
    m = summary["machine"]
    fits = summary["fits"]
    text = [
        "# Benchmark: restore time and peak memory vs output size",
        "",
        f"Command: `{summary['command']}`  ",
        f"Machine: {m.get('cpu')} ({m['cpu_count']} cores, {m.get('ram_gb')} GB RAM), {m['threads']} torch threads, "
        f"device {m['device']}, GPU: {m['gpu']}; torch {m['torch']}; load average at start {m.get('load_average')}.",
        "",
        "Full-size models with random weights; x4 super-resolution (preset v2: spaced sampler, CFG 4 + negative "
        "prompt). Times in seconds. The 50-step total is EXTRAPOLATED from the measured steps "
        f"({summary['args']['steps']} per run); in probed stages the time is K tiles per round x tiles / K "
        "(see diffbir_eval/bench). Peak RSS = whole process, weights included.",
        "",
        *rows,
        "",
        "Per-step speed-up at 512 (optimised / baseline): "
        + (f"{summary['step_ratio_512']:.3f}" if summary.get("step_ratio_512") else "n/a"),
        "",
        "Linear fit of the optimised 50-step time against pixel count: "
        + (
            f"{fits['total_50']['slope_per_megapixel']:.1f} s per megapixel + {fits['total_50']['intercept']:.1f} s, "
            f"R^2 = {fits['total_50']['r2']:.4f}, relative residuals {fits['total_50']['rel_residuals']}"
            if fits.get("total_50")
            else "n/a"
        ),
        "",
        "Per-step time fit: "
        + (
            f"{fits['step']['slope_per_megapixel']:.1f} s per megapixel + "
            f"{fits['step']['intercept']:.1f} s, R^2 = {fits['step']['r2']:.4f}"
            if fits.get("step")
            else "n/a"
        ),
        "",
        "![time and memory](bench.png)",
        "",
    ]
    write_text(out / "README.md", "\n".join(text))


def _plot(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for cfg, color in (("optimized", "tab:blue"), ("baseline", "tab:red")):
        run = [r for r in summary["rows"] if r["config"] == cfg and not r.get("not_run")]
        est = [r for r in summary["rows"] if r["config"] == cfg and r.get("not_run")]
        if run:
            mp = [r["pixels"] / 1e6 for r in run]
            ax1.plot(
                mp,
                [r["total_50_steps_extrapolated_s"] / 60 for r in run],
                "o-",
                color=color,
                label=f"{cfg} (50 steps, extrapolated)",
            )
            ax2.plot(mp, [r["peak_gb"] for r in run], "o-", color=color, label=f"{cfg} (measured)")
        if est:
            ax2.plot(
                [r["pixels"] / 1e6 for r in est],
                [r["peak_gb"] for r in est],
                "o--",
                mfc="none",
                color=color,
                label=f"{cfg} (memory model, not run)",
            )
    f = summary["fits"].get("total_50")
    if f:
        xs = [0, max(r["pixels"] for r in summary["rows"]) / 1e6]
        ax1.plot(
            xs,
            [(f["intercept"] + f["slope_per_megapixel"] * x) / 60 for x in xs],
            ":",
            color="gray",
            label=f"linear fit (R^2 {f['r2']:.3f})",
        )
    ax1.set_xlabel("output megapixels")
    ax1.set_ylabel("minutes per image")
    ax1.set_title("time")
    ax2.axhline(9, color="gray", ls=":", label="9 GB target")
    ax2.set_xlabel("output megapixels")
    ax2.set_ylabel("peak memory (GB)")
    ax2.set_yscale("log")
    ax2.set_title("peak RSS (CPU) incl. weights")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "bench.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def run_parent(args) -> dict:
    """Every size of ``args.sizes`` in its own child process, then ``summary.json``, ``README.md``, ``bench.png``.

    What it measures (paper arXiv 2308.15070, "Known weaknesses": memory and minutes per image)
        The full-size models with RANDOM weights (SD 2.1-base UNet 866M + control branch 363M + VAE 84M +
        OpenCLIP-H text 354M, DiffBIR SwinIR cleaner; nothing is downloaded), preset "v2" settings (x4 SR,
        spaced sampler, CFG 4 with the official negative prompt), one child process per output size so every
        peak RSS is that of a fresh process (weights included):

        * optimised: `SpeedOptions()` (SDPA attention, batched CFG, channels_last where measured faster, text
          embeddings cached) and the tiling chosen by `tiling.auto_tiling` for ``--max-memory``;
        * baseline: untiled, unbatched CFG (two forwards), explicit softmax(QK^T)V attention, no caching.

        Per stage: wall time (cleaner, text, VAE encode, each sampler step, VAE decode, colour fix) and peak RSS
        (a 20 ms sampler thread per stage; the process maximum from VmHWM). On CUDA: max allocated memory.
        The 50-step time is EXTRAPOLATED: fixed stages + 50 x the mean measured step (labelled as such).

        Timing probes (``--probe-tiles K``, default 1; 0 runs everything): a tiled stage runs the first K tiles of
        every round, then skips the rest (`tiling.StopTiles`); its time is the measured set-up plus each round's
        K-tile time x tiles / K. All full-image buffers are still allocated and written, so peak memory is
        representative; the NUMBERS produced are not valid (timing only). Untiled stages always run fully.
        The baseline runs at ``--baseline-sizes`` (default 512); elsewhere its peak is an estimate of the memory
        model (explicit attention is quadratic in memory) and it is marked "not run".

    Outputs in ``--out``: ``bench_<size>.json`` per child, ``summary.json`` (everything + linear fits of time
    against pixel count), ``README.md`` (Markdown table, machine) and ``bench.png`` (time and memory vs pixels).
    A benchmark, not a test: it takes tens of minutes on a 2-core CPU.
    """
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = _machine(args.device, args.threads)
    children = []
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        MALLOC_MMAP_THRESHOLD_="65536",
        PYTHONPATH=str(Path(__file__).resolve().parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    t_start = time.perf_counter()
    for size in args.sizes:
        if size % 64:
            raise SystemExit(f"sizes must be multiples of 64 (got {size})")
        configs = ["optimized"] + (["baseline"] if size in args.baseline_sizes else [])
        path = out / f"bench_{size}.json"
        cmd = [
            sys.executable,
            "-m",
            "diffbir_eval.bench",
            "--child",
            str(size),
            "--configs",
            *configs,
            "--json",
            str(path),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
            "--probe-tiles",
            str(args.probe_tiles),
            "--device",
            args.device,
            "--latent-tile",
            str(args.latent_tile),
            "--latent-stride",
            str(args.latent_stride),
        ]
        if args.tiny_dir:
            cmd += ["--tiny-dir", args.tiny_dir]
        if args.sd:
            cmd += ["--sd", args.sd, "--control", args.control]
        if args.max_memory:
            cmd += ["--max-memory", str(args.max_memory)]
        print(f"[bench] size {size}: {' '.join(configs)} (elapsed {time.perf_counter() - t_start:.0f} s)", flush=True)
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            print(f"[bench] size {size} failed with exit code {rc}", flush=True)
            continue
        children.append(json.loads(path.read_text()))
    rows = []
    for ch in children:
        for r in ch["runs"]:
            rows.append(
                dict(
                    r,
                    weights_gb=ch["weights_gb"],
                    build_s=ch["build_s"],
                    loaded_from=ch.get("loaded_from"),
                    build_peak_rss_gb=ch.get("build_peak_rss_gb"),
                )
            )
        if not any(r["config"] == "baseline" for r in ch["runs"]):
            e = _baseline_estimate_gb(ch["size"], ch["weights_gb"])
            rows.append(
                dict(
                    config="baseline",
                    size=ch["size"],
                    pixels=ch["size"] ** 2,
                    not_run=True,
                    peak_gb=e["peak_gb"],
                    estimate=e,
                    why="untiled baseline too slow/large here; peak from the memory model",
                )
            )
    rows.sort(key=lambda r: (r["size"], r["config"] != "optimized"))
    opt = [r for r in rows if r["config"] == "optimized" and not r.get("not_run")]
    fits = {}
    if len(opt) >= 2:
        fits["total_50"] = _fit([r["pixels"] for r in opt], [r["total_50_steps_extrapolated_s"] for r in opt])
        fits["step"] = _fit([r["pixels"] for r in opt], [r["step_s"] for r in opt])
    ratio = None
    b512 = [r for r in rows if r["size"] == 512 and r["config"] == "baseline" and not r.get("not_run")]
    o512 = [r for r in opt if r["size"] == 512]
    if b512 and o512:
        ratio = o512[0]["step_s"] / b512[0]["step_s"]
    summary = dict(
        command="python -m diffbir_eval.bench " + " ".join(sys.argv[1:]),
        args=vars(args),
        machine=machine,
        rows=rows,
        fits=fits,
        step_ratio_512=ratio,
        elapsed_s=round(time.perf_counter() - t_start, 1),
    )
    write_text(out / "summary.json", json.dumps(summary, indent=1))
    _write_report(out, summary)
    _plot(out, summary)
    print(f"[bench] wrote {out}/summary.json, README.md, bench.png in {summary['elapsed_s']} s", flush=True)
    return summary

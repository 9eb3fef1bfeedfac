"""Side-by-side benchmark: the official DiffBIR code vs ours, same weights, one process, interleaved calls (issue 17).

    python -m diffbir_eval.bench --against-official PATH/TO/DiffBIR (an official checkout)
    python -m diffbir_eval.bench --against-official DIR --cases plain_step vae_decode_512 --rounds 3
    python -m diffbir_eval.bench --against-official --candidates            # our own speed candidates, with/without,
    interleaved

What it does
    * builds the official ``ControlLDM`` from ITS config (``DIR/configs/inference/cldm.yaml`` through
      ``diffbir.utils.common.instantiate_from_config``; full size, random weights; parameters the official
      init leaves at zero - zero convs, output convs - get small seeded random values so the control branch
      matters) and ours (`diffbir_core.models.ldm`) from the same config numbers, loading the official random
      state dict through our LDM / control loaders (`load_sd_ldm` / `load_control` via `build_control_ldm`):
      identical weights, so the outputs are compared too;
    * times, per round and with the order alternating every round: plain step (UNet + control, batch 1),
      CFG step (official: two forwards as in HEAD ``sampler/edm_sampler.py:127-134``; ours: `CFGDenoiser` with
      the product's `SpeedOptions`), VAE encode 512, VAE decode 512 and a whole v2.1-preset restore at 512
      (official ``diffbir/pipeline.py`` ``SwinIRPipeline.run`` vs our ``DiffBIRPipeline.restore`` with injected
      models; 128x128 LQ, x4, 10 steps edm_dpm++_3m_sde, CFG 6);
    * reports medians of per-round ratios (ours / official), the machine, torch threads, load average before /
      after, and the max deviation between the two outputs. Ours runs with the product's speed settings plus
      `diffbir_core.allocator.keep_freed_memory` (glibc keeps freed memory; the official side runs with glibc's
      settled defaults, see that module).
The official code is imported BY PATH inside this benchmark only (shims: ``omegaconf``/``ftfy``/``regex`` from a
side folder, ``torch.Tuple = typing.Tuple``, ``ATTN_MODE=sdp``, ``torch.cuda.synchronize`` a no-op without
CUDA, as HEAD's ``VRAMPeakMonitor`` (utils/common.py:271) calls it unconditionally). Nothing is copied from it.
Outputs: ``--out`` (default results/bench/official): ``<name>.json`` (written after every measurement),
``README.md``, ``bench_official.png``. A benchmark, not a test.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from diffbir_core.atomic import atomic_path, write_text
from diffbir_core.diffusion.cfg import CFGDenoiser
from diffbir_core.speed import SpeedOptions, apply_speed_options

__all__ = [
    "import_official",
    "build_official",
    "official_state_dicts",
    "build_ours_from_official",
    "build_official_diffusion",
    "build_cleaners",
    "make_cases",
    "run_interleaved",
    "machine_info",
    "write_report",
    "plot",
    "build_side_by_side",
    "run_roofline",
    "main",
    "CASES",
    "REQUIRED_FIELDS",
]

CASES = ("plain_step", "vae_decode_512", "vae_encode_512", "cfg_step", "restore_v21_512")
REQUIRED_FIELDS = (
    "kind",
    "command",
    "machine",
    "threads",
    "load_before",
    "load_after",
    "rounds",
    "cases",
    "official_dir",
    "ours_speed_notes",
    "elapsed_s",
)
DEFAULT_DEPS = "/work/official-deps"
POS_PROMPT = "a high quality photo"
DEFAULT_T = 500


# ----------------------------------------------------------------------------------------------------------
# the official code, imported by path (benchmark only)
# ----------------------------------------------------------------------------------------------------------
def import_official(official_dir: str | os.PathLike, deps_dir: str | os.PathLike | None = DEFAULT_DEPS) -> dict:
    """Put the official checkout (and the side folder with omegaconf/ftfy/regex) on sys.path, apply the shims,
    import what the benchmark needs. Returns a namespace dict (``instantiate_from_config``, ``OmegaConf``,
    ``SwinIRPipeline``, ``dir``, ``shims``)."""
    import torch

    root = Path(official_dir).resolve()
    if not (root / "diffbir" / "utils" / "common.py").is_file():
        raise SystemExit(f"{root} is not an official DiffBIR checkout (HEAD layout: diffbir/utils/common.py)")
    shims = []
    if deps_dir and Path(deps_dir).is_dir() and str(deps_dir) not in sys.path:
        sys.path.insert(0, str(deps_dir))
        shims.append(f"sys.path += {deps_dir} (omegaconf, ftfy, regex)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if os.environ.get("ATTN_MODE") is None:
        os.environ["ATTN_MODE"] = "sdp"
    shims.append(f"ATTN_MODE={os.environ['ATTN_MODE']}")
    if not hasattr(torch, "Tuple"):
        torch.Tuple = tuple
        shims.append("torch.Tuple = tuple (removed from torch; HEAD edm_sampler.py annotates with it)")
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.max_memory_allocated = lambda *a, **k: 0
        shims.append("torch.cuda.synchronize / max_memory_allocated = no-ops (no CUDA)")
    try:
        from diffbir.pipeline import SwinIRPipeline
        from diffbir.utils.common import instantiate_from_config
        from omegaconf import OmegaConf
    except ImportError as e:
        raise SystemExit(
            f"cannot import the official code from {root}: {e}\n  install its extra dependencies "
            f"with: pip install --target {deps_dir or DEFAULT_DEPS} omegaconf ftfy regex"
        ) from e
    return dict(
        instantiate_from_config=instantiate_from_config,
        OmegaConf=OmegaConf,
        SwinIRPipeline=SwinIRPipeline,
        dir=root,
        shims=shims,
    )


def _fill_zero_params(module, seed: int, std: float = 0.02) -> int:
    """Seeded small random values for parameters that are exactly zero (the official zero_module init), so
    the control residuals and output convs are not trivially zero. Returns how many tensors were filled."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


def build_official(off: dict, config: str | os.PathLike | None = None, *, seed: int = 0, text: bool = True):
    """The official ``ControlLDM`` from its config (default ``DIR/configs/inference/cldm.yaml``), random
    weights (seeded), zero-initialised parameters filled (see `_fill_zero_params`), eval mode. ``text=False``
    drops the OpenCLIP text tower after building (1.4 GB; only the whole restore encodes prompts)."""
    import torch

    cfg = Path(config) if config else off["dir"] / "configs" / "inference" / "cldm.yaml"
    torch.manual_seed(seed)
    model = off["instantiate_from_config"](off["OmegaConf"].load(str(cfg)))
    if not text:
        model.clip = torch.nn.Identity()
    _fill_zero_params(model, seed + 1)
    model.control_scales = [1.0] * 13
    return model.eval().requires_grad_(False)


def official_state_dicts(official_cldm) -> tuple[dict, dict]:
    """(LDM-layout SD dict as ``load_pretrained_sd`` reads it, control-branch dict as
    ``load_controlnet_from_ckpt`` reads it) of an official ControlLDM (tensors shared, not copied)."""
    sd = {}
    for prefix, part in (
        ("model.diffusion_model.", official_cldm.unet),
        ("first_stage_model.", official_cldm.vae),
        ("cond_stage_model.", official_cldm.clip),
    ):
        if prefix == "cond_stage_model." and not any(True for _ in part.parameters()):
            continue  # text tower dropped (build_official text=False)
        sd.update({prefix + k: v for k, v in part.state_dict().items()})
    return sd, dict(official_cldm.controlnet.state_dict())


def build_ours_from_official(official_cldm, config: str | os.PathLike, off: dict | None = None):
    """Our ControlLDM built from the same config numbers (`Stage2Config.from_official`), loaded with the
    official model's weights through our loaders (strict, every key accounted for)."""
    import yaml

    from diffbir_core.models.ldm import Stage2Config, build_control_ldm

    cfg = Stage2Config.from_official(yaml.safe_load(Path(config).read_text()))
    sd, control = official_state_dicts(official_cldm)
    if any(k.startswith("cond_stage_model.") for k in sd):
        return build_control_ldm(cfg, sd=sd, control=control).eval()
    # no text tower: the same key maps and strict loads as load_sd_ldm, for the UNet and the VAE only
    import torch

    from diffbir_core.models.convert import SD_PREFIXES, keymap_for, pull_official
    from diffbir_core.models.ldm import ControlLDM, build_empty, build_unet, build_vae, load_control
    from diffbir_core.weights import load_into

    parts = {}
    for name, build in (("unet", build_unet), ("vae", build_vae)):
        module = build_empty(build, cfg)
        mapped, _ = pull_official(module, sd, keymap_for(module, SD_PREFIXES[name]), what=f"official -> {name}")
        load_into(module, mapped, what=f"official -> {name}", strict=True)
        parts[name] = module.eval().requires_grad_(False)
    controlnet = load_control(control, cfg)
    return ControlLDM(parts["unet"], controlnet, parts["vae"], torch.nn.Identity(), cfg.latent_scale_factor, cfg).eval()


def build_official_diffusion(off: dict, config: str | os.PathLike | None = None):
    cfg = Path(config) if config else off["dir"] / "configs" / "inference" / "diffusion_v2.1.yaml"
    return off["instantiate_from_config"](off["OmegaConf"].load(str(cfg)))


def build_cleaners(off: dict, config: str | os.PathLike | None = None, *, seed: int = 0, tmp_dir: Path):
    """(official SwinIR, our `Cleaner` "swinir_realesrgan") with the same random weights (ours built from the
    same config numbers, `SwinIRConfig.from_official`, and loaded strictly from the official state dict saved
    to ``tmp_dir``)."""
    import torch
    import yaml

    from diffbir_core.cleaners import CLEANERS, Cleaner
    from diffbir_core.models.swinir import SwinIRConfig, load_swinir

    cfg = Path(config) if config else off["dir"] / "configs" / "inference" / "swinir.yaml"
    torch.manual_seed(seed + 2)
    net = off["instantiate_from_config"](off["OmegaConf"].load(str(cfg))).eval().requires_grad_(False)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    path = tmp_dir / "bench_swinir_random.pt"
    with atomic_path(path) as tmp:
        torch.save(net.state_dict(), tmp)
    ours = load_swinir(path, SwinIRConfig.from_official(yaml.safe_load(cfg.read_text())), what="bench SwinIR")
    return net, Cleaner(CLEANERS["swinir_realesrgan"], ours.requires_grad_(False), "cpu")


# ----------------------------------------------------------------------------------------------------------
# cases: name -> (official callable, ours callable); each returns a tensor in a comparable convention
# ----------------------------------------------------------------------------------------------------------
def _speed_api():
    return SpeedOptions, apply_speed_options


def _cfg_denoiser():
    return CFGDenoiser


def _lq_uint8(side: int, seed: int = 7):
    """A smooth colour pattern with noise, side x side x 3 uint8 (seeded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing="ij")
    img = np.stack(
        [0.5 + 0.4 * np.sin(6 * x + 2 * y), 0.5 + 0.4 * np.cos(5 * y - x), 0.5 + 0.3 * np.sin(9 * x * y)], -1
    )
    img = img + 0.05 * rng.standard_normal(img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def make_cases(
    off: dict,
    official_cldm,
    ours_ldm,
    *,
    names=CASES,
    latent: int = 64,
    cfg_scale: float = 6.0,
    seed: int = 0,
    diffusion=None,
    cleaners=None,
    steps: int = 10,
    neg_prompt: str | None = None,
    ours_speed=None,
) -> dict[str, tuple[Callable, Callable]]:
    """The benchmark cases. Inputs are seeded and shared by both sides. ``latent``: latent side (64 = 512 px)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ctx_dim = ours_ldm.cfg.unet.context_dim if ours_ldm.cfg is not None else 1024
    x = torch.randn(1, 4, latent, latent, generator=g)
    t = torch.tensor([DEFAULT_T])
    cond = dict(c_txt=torch.randn(1, 77, ctx_dim, generator=g), c_img=torch.randn(1, 4, latent, latent, generator=g))
    uncond = dict(c_txt=torch.randn(1, 77, ctx_dim, generator=g), c_img=cond["c_img"].clone())
    img = torch.rand(1, 3, latent * 8, latent * 8, generator=g) * 2 - 1
    z = torch.randn(1, 4, latent, latent, generator=g)
    CFGDenoiser = _cfg_denoiser()
    SpeedOptions, _ = _speed_api()
    speed = ours_speed or SpeedOptions()
    cases: dict[str, tuple[Callable, Callable]] = {}

    def official_cfg():
        c = official_cldm(x, t, cond)
        u = official_cldm(x, t, uncond)
        return u + cfg_scale * (c - u)

    ours_cfg = CFGDenoiser(ours_ldm, cond, uncond, cfg_scale, batched=speed.batched_cfg)
    table = {
        "plain_step": (lambda: official_cldm(x, t, cond), lambda: ours_ldm(x, t, cond)),
        "cfg_step": (official_cfg, lambda: ours_cfg(x, t)),
        "vae_encode_512": (lambda: official_cldm.vae_encode(img, sample=False), lambda: ours_ldm.vae_encode(img)),
        "vae_decode_512": (lambda: official_cldm.vae_decode(z), lambda: ours_ldm.vae_decode(z)),
    }
    for n in names:
        if n in table:
            cases[n] = table[n]
    if "restore_v21_512" in names:
        cases["restore_v21_512"] = _restore_case(
            off,
            official_cldm,
            ours_ldm,
            diffusion,
            cleaners,
            latent * 2,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed,
            neg_prompt=neg_prompt,
            speed=speed,
        )
    return cases


def _restore_case(
    off, official_cldm, ours_ldm, diffusion, cleaners, lq_side: int, *, steps, cfg_scale, seed, neg_prompt, speed
):
    """Whole v2.1 restore of a ``lq_side`` LQ, x4. The v2.1 loop's PIL bicubic upscale (``inference/bsr_loop.py:
    55-59``) is done once outside the timing; then official ``SwinIRPipeline.run`` with HEAD inference.py's
    defaults vs our ``DiffBIRPipeline.restore`` (preset "v2.1", upscale 1 on the upscaled image, same prompts,
    same seed: `TorchNoise` reproduces ``torch.manual_seed`` draws, ``sde_noise="brownian"`` the official tree).
    Both return uint8 values / 255, H x W x 3."""
    import numpy as np
    import torch
    from PIL import Image

    from diffbir_core.config import OFFICIAL_NEGATIVE_PROMPT, RestoreParams
    from diffbir_core.pipeline import DiffBIRPipeline

    neg = OFFICIAL_NEGATIVE_PROMPT if neg_prompt is None else neg_prompt
    off_cleaner, our_cleaner = cleaners
    lq = _lq_uint8(lq_side)
    # the v2.1 loop's upscale (PIL bicubic on uint8), done once and given to BOTH sides (ours with upscale 1):
    # a float resize differs by up to 0.02, which random weights amplify into unrelated outputs
    up = np.asarray(Image.fromarray(lq).resize((lq_side * 4, lq_side * 4), Image.BICUBIC))
    pipe_off = off["SwinIRPipeline"](off_cleaner, official_cldm, diffusion, None, "cpu")
    pipe_ours = DiffBIRPipeline(device="cpu", cleaners={"swinir_realesrgan": our_cleaner}, ldm=ours_ldm, speed=speed)
    # the official noise for the SDE sampler (torchsde Brownian tree seeded from the RNG, k_diffusion.py:76-77) and
    # HEAD's EDM sigma_max: our defaults differ on purpose (README "Official behaviour we deliberately do not copy")
    # and would give a different (equally valid) sample, so the outputs could not be compared
    params = RestoreParams.from_preset(
        "v2.1",
        upscale=1.0,
        steps=steps,
        cfg_scale=cfg_scale,
        seed=seed,
        pos_prompt=POS_PROMPT,
        neg_prompt=neg,
        sde_noise="brownian",
        edm_sigma_max="official",
    )

    def official():
        torch.manual_seed(seed)
        out = pipe_off.run(
            up[None],
            steps=steps,
            strength=1.0,
            cleaner_tiled=False,
            cleaner_tile_size=512,
            cleaner_tile_stride=256,
            vae_encoder_tiled=False,
            vae_encoder_tile_size=256,
            vae_decoder_tiled=False,
            vae_decoder_tile_size=256,
            cldm_tiled=False,
            cldm_tile_size=512,
            cldm_tile_stride=256,
            pos_prompt=POS_PROMPT,
            neg_prompt=neg,
            cfg_scale=cfg_scale,
            start_point_type="noise",
            sampler_type="edm_dpm++_3m_sde",
            noise_aug=0,
            rescale_cfg=False,
            s_churn=0.0,
            s_tmin=0.0,
            s_tmax=300.0,
            s_noise=1.0,
            eta=1.0,
            order=1,
        )
        return torch.from_numpy(out[0].astype(np.float32) / 255.0)

    def ours():
        res = pipe_ours.restore(up.astype(np.float32) / 255.0, params)
        return torch.from_numpy((np.clip(res.image, 0, 1) * 255).astype(np.uint8).astype(np.float32) / 255.0)

    return official, ours


# ----------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------
def _max_dev(a, b) -> float | None:
    import torch

    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
        return None
    return float((a.double() - b.double()).abs().max())


def _mean_dev(a, b) -> float | None:
    import torch

    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
        return None
    return float((a.double() - b.double()).abs().mean())


def _ref_scale(a) -> float:
    return float(a.double().abs().max()) if a is not None else 0.0


def run_interleaved(
    cases: Mapping[str, tuple[Callable, Callable]],
    rounds: int | Mapping[str, int],
    *,
    labels: tuple[str, str] = ("official", "ours"),
    wrap_b: Callable | None = None,
    on_result: Callable[[str, dict], None] | None = None,
    warmup: bool = False,
) -> dict[str, dict]:
    """Per case: ``rounds`` rounds of (a, b) calls in alternating order (round 0: a first), rounds outermost;
    wall seconds per call, per-round ratio b / a, the median ratio, max |a - b| of the first round's outputs.
    ``wrap_b`` is a
    context factory entered around every b call (the allocator tuning). ``on_result(name, record)`` is called
    after every round (incremental JSON)."""
    import contextlib

    import torch

    la, lb = labels
    out: dict[str, dict] = {}
    plan = {name: (rounds if isinstance(rounds, int) else int(rounds.get(name, 1))) for name in cases}

    def call(f, is_b):
        ctx = wrap_b() if (is_b and wrap_b is not None) else contextlib.nullcontext()
        with ctx, torch.inference_mode():
            t0 = time.perf_counter()
            y = f()
            dt = time.perf_counter() - t0
        if hasattr(y, "seconds"):  # a call that timed itself (work before the timing)
            dt, y = y.seconds, y.y
        return dt, y

    for name in cases:
        out[name] = {la + "_s": [], lb + "_s": [], "ratio": [], "rounds_planned": plan[name]}
        if warmup:
            call(cases[name][0], False)
            call(cases[name][1], True)
    # round-major: round r of every case before round r + 1 of any, so a cut-short run still covers every case
    for r in range(max(plan.values(), default=0)):
        for name, (fa, fb) in cases.items():
            if r >= plan[name]:
                continue
            rec = out[name]
            order = (0, 1) if r % 2 == 0 else (1, 0)
            times, ys = [0.0, 0.0], [None, None]
            for side in order:
                times[side], ys[side] = call(fa if side == 0 else fb, side == 1)
                if r > 0:
                    ys[side] = None  # outputs compared in round 0 only
            rec[la + "_s"].append(round(times[0], 3))
            rec[lb + "_s"].append(round(times[1], 3))
            rec["ratio"].append(round(times[1] / times[0], 4))
            rec["median_ratio"] = round(statistics.median(rec["ratio"]), 4)
            rec["rounds"] = len(rec["ratio"])
            if r == 0:
                rec["max_abs_dev"] = _max_dev(ys[0], ys[1])
                rec["mean_abs_dev"] = _mean_dev(ys[0], ys[1])
                rec["ref_max_abs"] = _ref_scale(ys[0]) if torch.is_tensor(ys[0]) else None
            del ys
            rec["load_average"] = list(os.getloadavg())
            if on_result is not None:
                on_result(name, rec)
    return out


def machine_info(threads: int) -> dict:
    import torch

    info = dict(
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        requested_threads=threads,
        interop_threads=torch.get_num_interop_threads(),
        mkldnn=torch.backends.mkldnn.is_available(),
    )
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            info["ram_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------
TARGETS = {"cfg_step": 0.5, "plain_step": 0.7, "vae_decode_512": 0.7, "restore_v21_512": 0.5}


def write_report(out: Path, res: dict) -> Path:
    la, lb = res.get("labels", ["official", "ours"])
    rows = [
        f"| case | rounds | {la} s (median) | {lb} s (median) | median ratio {lb}/{la} | target | "
        "max abs dev | output max abs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["cases"].items():
        if not r.get(la + "_s"):
            continue
        tgt = TARGETS.get(name) if res["kind"] == "official" else None
        met = "" if tgt is None else (f"<= {tgt} " + ("met" if r["median_ratio"] <= tgt else "NOT met"))
        dev = "n/a" if r.get("max_abs_dev") is None else f"{r['max_abs_dev']:.3g}"
        ref = "n/a" if r.get("ref_max_abs") is None else f"{r['ref_max_abs']:.3g}"
        rows.append(
            f"| {name} | {r['rounds']} | {statistics.median(r[la + '_s']):.2f} | "
            f"{statistics.median(r[lb + '_s']):.2f} | **{r['median_ratio']:.3f}** | {met} | {dev} | {ref} |"
        )
    m = res["machine"]
    text = [
        f"# {res.get('title', 'Benchmark')}",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {m.get('cpu')} ({m.get('cpu_count')} cores, {m.get('ram_gb')} GB RAM); torch {m.get('torch')}, "
        f"{res['threads']} torch threads; load average before {res['load_before']}, after {res['load_after']}; "
        f"elapsed {res['elapsed_s']} s.",
        "",
        "Ratios are medians of per-round ratios (each round calls both sides back to back, order alternating), "
        "so machine load (shared, see load average) cancels to first order. fp32, CPU.",
        "",
        *rows,
        "",
    ]
    roof = res.get("roofline")
    if roof and roof.get("rows"):
        pk = roof["matmul_peak"]
        text += [
            "## Roofline: how fast could any exact implementation be here?",
            "",
            f"FLOPs counted by torch's FlopCounterMode (matmul, conv, attention; lower bounds), attainable fp32 peak "
            f"= median {pk['n']}x{pk['n']} fp32 matmul rate with {roof['threads']} threads: "
            f"**{pk['gflops_median']} GFLOP/s** (max {pk['gflops_max']}). Floor = our FLOPs / peak; best ratio = "
            "floor / official median time: the lowest ratio any fp32 implementation of the same arithmetic could "
            "reach on this machine.",
            "",
            "| case | GFLOP official | GFLOP ours | official GFLOP/s (share of peak) | ours GFLOP/s (share) | "
            "floor s | best reachable ratio | target |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in roof["rows"]:
            tgt = (
                ""
                if r["target"] is None
                else f"<= {r['target']}" + (" (below the floor)" if r["target"] < r["best_ratio"] else "")
            )
            text.append(
                f"| {r['case']} | {r['official_gflop']} | {r['ours_gflop']} | {r['official_gflops']} "
                f"({r['official_peak_share']:.0%}) | {r['ours_gflops']} ({r['ours_peak_share']:.0%}) | "
                f"{r['floor_s']} | **{r['best_ratio']}** | {tgt} |"
            )
        text.append("")
    for k in ("notes", "ours_speed_notes", "shims"):
        if res.get(k):
            text += [f"{k}: " + "; ".join(res[k]), ""]
    text += ["![ratios](bench_official.png)" if res["kind"] == "official" else f"![ratios]({res['name']}.png)", ""]
    path = out / ("README.md" if res["kind"] == "official" else f"{res['name']}.md")
    write_text(path, "\n".join(text))
    return path


def plot(out: Path, res: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n, r in res["cases"].items() if r.get("ratio")]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.8))
    med = [res["cases"][n]["median_ratio"] for n in names]
    ax.bar(range(len(names)), med, color="tab:blue")
    for i, n in enumerate(names):
        ax.plot([i] * len(res["cases"][n]["ratio"]), res["cases"][n]["ratio"], "k.", ms=4)
        if res["kind"] == "official" and n in TARGETS:
            ax.plot([i - 0.4, i + 0.4], [TARGETS[n]] * 2, "r--", lw=1)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    la, lb = res.get("labels", ["official", "ours"])
    ax.set_ylabel(f"time {lb} / {la} (median of rounds)")
    ax.set_title(res.get("title", ""), fontsize=9)
    fig.tight_layout()
    p = out / ("bench_official.png" if res["kind"] == "official" else f"{res['name']}.png")
    with atomic_path(p) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return p


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------
def build_side_by_side(args) -> tuple[dict, dict, dict[str, tuple[Callable, Callable]]]:
    """Both models (official from its config, ours from its weights), the product's speed options on ours, and
    the cases named by ``args.cases``. Returns (official namespace, build info, cases)."""
    off = import_official(args.against_official, args.deps)
    cfg_path = Path(args.cldm_config) if args.cldm_config else off["dir"] / "configs" / "inference" / "cldm.yaml"
    print(f"[bench_official] building the official ControlLDM from {cfg_path} ...", flush=True)
    t0 = time.perf_counter()
    official = build_official(off, cfg_path, seed=args.seed, text="restore_v21_512" in args.cases)
    t_off = time.perf_counter() - t0
    print(f"[bench_official] ... {t_off:.0f} s; building ours from its weights ...", flush=True)
    t0 = time.perf_counter()
    ours = build_ours_from_official(official, cfg_path, off)
    SpeedOptions, apply_speed_options = _speed_api()
    speed = SpeedOptions()
    info = dict(
        speed_notes=apply_speed_options(ours, speed, "cpu"),
        build_note=(
            f"build: official {t_off:.0f} s, ours {time.perf_counter() - t0:.0f} s (ours loaded from the official "
            "random state dict through load_sd_ldm / load_control; zero-init official params filled with "
            "seeded N(0, 0.02) first)"
        ),
    )
    names = [n for n in args.cases if n in CASES]
    diffusion = cleaners = None
    if "restore_v21_512" in names:
        diffusion = build_official_diffusion(off, args.diffusion_config)
        cleaners = build_cleaners(off, args.swinir_config, seed=args.seed, tmp_dir=Path(args.tmp))
    cases = make_cases(
        off,
        official,
        ours,
        names=names,
        latent=args.size // 8,
        seed=args.seed,
        diffusion=diffusion,
        cleaners=cleaners,
        steps=args.steps,
        ours_speed=speed,
    )
    return off, info, cases


def run_against_official(args) -> dict:
    from diffbir_core.allocator import keep_freed_memory

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    off, info, cases = build_side_by_side(args)
    res = dict(
        kind="official",
        name="official",
        title="Official DiffBIR (HEAD) vs ours: same weights, one process",
        command="python -m diffbir_eval.bench --against-official " + " ".join(sys.argv[1:]),
        machine=machine_info(args.threads),
        threads=args.threads,
        load_before=list(os.getloadavg()),
        load_after=None,
        rounds=args.rounds,
        official_dir=str(off["dir"]),
        shims=off["shims"],
        cases={},
        notes=[info["build_note"]],
        labels=["official", "ours"],
        elapsed_s=None,
        ours_speed_notes=info["speed_notes"]
        + (["allocator: keep_freed_memory() around every call of ours"] if args.allocator else []),
    )
    path = out / "official.json"

    def flush_json():
        res["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        res["load_after"] = list(os.getloadavg())
        write_text(path, json.dumps(res, indent=1))

    names = list(cases)
    rounds = {n: (args.restore_rounds if n == "restore_v21_512" else args.rounds) for n in names}
    if args.restore_rounds < args.rounds and "restore_v21_512" in names:
        res["notes"].append(f"whole restore: {args.restore_rounds} round(s) only (time on a shared 2-core machine)")
    flush_json()

    def on_result(name, rec):
        res["cases"][name] = rec
        flush_json()
        print(
            f"[bench_official] {name}: round {rec['rounds']}: official {rec['official_s'][-1]:.2f} s, ours "
            f"{rec['ours_s'][-1]:.2f} s, ratio {rec['ratio'][-1]:.3f} (max dev {rec.get('max_abs_dev')}), "
            f"load {rec['load_average'][0]:.1f}",
            flush=True,
        )

    run_interleaved(cases, rounds, wrap_b=(keep_freed_memory if args.allocator else None), on_result=on_result)
    flush_json()
    write_report(out, res)
    plot(out, res)
    print(f"[bench_official] wrote {path}, README.md, bench_official.png in {res['elapsed_s']} s", flush=True)
    return res


def run_roofline(args) -> dict:
    """FLOPs of every case on both sides (one uncounted-for-time call each), the machine's fp32 matmul peak,
    and, where ``--out/official.json`` holds a timed run, the floor time and best reachable ratio per case
    (`roofline`). Writes ``roofline.json`` and rewrites the README with the roofline table."""
    from .roofline import count_flops, matmul_peak, roofline_rows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, _, cases = build_side_by_side(args)
    flops = {}
    for name, (fa, fb) in cases.items():
        flops[name] = {"official": count_flops(fa), "ours": count_flops(fb)}
        print(
            f"[bench_official] {name}: GFLOP official {flops[name]['official'] / 1e9:.1f}, ours "
            f"{flops[name]['ours'] / 1e9:.1f}",
            flush=True,
        )
    peak = matmul_peak()
    print(f"[bench_official] fp32 matmul peak {peak}", flush=True)
    res = dict(
        kind="roofline",
        threads=args.threads,
        machine=machine_info(args.threads),
        matmul_peak=peak,
        load_average=list(os.getloadavg()),
        flops=flops,
        rows=[],
    )
    timed_path = out / "official.json"
    if timed_path.is_file():
        timed = json.loads(timed_path.read_text())
        res["rows"] = roofline_rows(timed["cases"], flops, peak["gflops_median"], TARGETS)
        timed["roofline"] = res
        write_text(timed_path, json.dumps(timed, indent=1))
        write_report(out, timed)
    write_text(out / "roofline.json", json.dumps(res, indent=1))
    return res

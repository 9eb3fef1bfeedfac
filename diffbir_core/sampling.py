"""Stage-2 glue: `RestoreParams` -> conditions, CFG denoiser, schedule, guidance, x_T -> sampler -> decode.

This is the official v2.0.0 ``Pipeline.run_stage2`` in our terms (fixture ``pipeline_swinir``):

    1. cond = {c_txt(pos prompt), c_img = E(clean * 2 - 1)}; uncond = {c_txt(neg prompt), same c_img}.
    2. Control strength s: every control residual is multiplied by s (official ``control_scales = [s] * 13``).
    3. CFG (``samplers.CFGDenoiser``): eps = eps_u + w (eps_c - eps_u); w == 1 evaluates only eps_c.
    4. x_T ~ N(0, I) from the run's noise source (first draw), or the v2.0.0 "better start"
       (low-frequency image encoded with a posterior sample, diffused to t = T-1).
    5. Latent image guidance (eq. 5-6) wraps the sampler's x0 prediction (``guidance.LatentImageGuidance``),
       target = clean * 2 - 1; works with every sampler.
    6. Sampler by name (``samplers.run_sampler``), then the VAE decoder -> image in [-1, 1].

The noise source is injectable (``noise=``) so recorded official draws can be replayed; otherwise a
`TorchNoise(seed)` stream reproduces ``torch.manual_seed(seed)`` runs of the official code on CPU.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .config import RestoreParams

__all__ = ["make_conditions", "make_guidance", "sample_latent", "run_sampler", "load_pretrained_control_ldm",
           "training_schedule_for"]


def training_schedule_for(params: RestoreParams):
    from .schedule import make_training_schedule

    s2 = params.stage2
    if s2 is None:
        raise ValueError(f"preset {params.preset!r} has no diffusion stage")
    name = "v2.1" if s2.zero_snr else "v2"
    sched = make_training_schedule(name)
    if sched.parameterization != s2.parameterization:
        raise ValueError(f"diffusion preset {name!r} is {sched.parameterization}-prediction but the weights "
                         f"{s2.sd!r} need {s2.parameterization}-prediction")
    return sched


def make_conditions(ldm, clean: torch.Tensor, params: RestoreParams) -> tuple[dict, dict | None]:
    """Step 1: (cond, uncond). uncond is None when CFG is off (scale 1), as the official sampler skips it."""
    cond = ldm.prepare_condition(clean, [params.pos_prompt] * clean.shape[0])
    if params.cfg_scale == 1.0:
        return cond, None
    uncond = {"c_txt": ldm.encode_text([params.neg_prompt] * clean.shape[0]), "c_img": cond["c_img"]}
    return cond, uncond


def make_guidance(ldm, clean: torch.Tensor, params: RestoreParams):
    """Step 5: the latent image guidance callable, or None when the scale is 0."""
    g = params.guidance
    if not g.enabled:
        return None
    from .guidance import LatentImageGuidance

    return LatentImageGuidance(
        clean * 2 - 1, g.scale, t_start=g.t_start, t_stop=g.t_stop, space=g.space, repeat=g.repeat,
        weighted=g.loss == "wmse", rule=g.rule,
        encode=lambda x, eps: ldm.vae_encode(x, sample=eps is not None, noise=eps),
        decode=ldm.vae_decode)


def sample_latent(ldm, clean: torch.Tensor, params: RestoreParams, *, seed: int | None = None,
                  noise: Callable | None = None, callback: Callable | None = None,
                  batched_cfg: bool = True) -> torch.Tensor:
    """Steps 1-5 + sampler: the final latent ``[B,4,H/8,W/8]`` for a padded clean image ``[B,3,H,W]``."""
    from .samplers import CFGDenoiser, TorchNoise, better_start_x_T
    from .samplers import run_sampler as _run

    if clean.shape[-1] % 8 or clean.shape[-2] % 8:
        raise ValueError(f"clean image {tuple(clean.shape[-2:])} must be padded to a multiple of 8 (64 advised)")
    noise = noise if noise is not None else TorchNoise(seed)
    training = training_schedule_for(params)
    with torch.no_grad():
        cond, uncond = make_conditions(ldm, clean, params)
        strength = params.strength

        def model(x, t, c):
            return ldm(x, t, c, control_scales=strength)

        denoiser = CFGDenoiser(model, cond, uncond, params.cfg_scale, rescale=params.rescale_cfg,
                               batched=batched_cfg and uncond is not None,
                               num_timesteps=training.num_timesteps)
        b, _, h, w = clean.shape
        lat_c = cond["c_img"].shape[1]
        if params.better_start:
            x_T = better_start_x_T(clean, lambda x, eps: ldm.vae_encode(x, sample=True, noise=eps), training,
                                   noise, latent_channels=lat_c)
        else:
            x_T = noise((b, lat_c, h // 8, w // 8), cond["c_img"])  # [B,4,h,w]
        guidance = make_guidance(ldm, clean, params)
        return _run(params.sampler, denoiser, x_T, training, params.steps, guidance=guidance, noise=noise,
                    callback=callback)


def run_sampler(ldm, clean: torch.Tensor, params: RestoreParams, *, seed: int | None = None,
                noise: Callable | None = None, callback: Callable | None = None) -> torch.Tensor:
    """Sample and decode: image ``[B,3,H,W]`` in the [-1, 1] convention (not clamped)."""
    z = sample_latent(ldm, clean, params, seed=seed, noise=noise, callback=callback)
    with torch.no_grad():
        return ldm.vae_decode(z)


def load_pretrained_control_ldm(sd: str, control: str, *, weights_dir: str | os.PathLike | None = None,
                                device: str | torch.device = "cpu"):
    """The full-size ControlLDM from official files: ``sd`` / ``control`` are names in ``weights.WEIGHTS``
    (or paths; ``sd`` may be a diffusers folder). Both files are resolved before anything loads, so a
    missing one fails fast with the message from `weights.resolve`."""
    from .models.ldm import STAGE2_CONFIGS, build_control_ldm
    from .weights import WEIGHTS, resolve

    def find(name: str) -> Path:
        if name in WEIGHTS:
            return resolve(name, weights_dir=weights_dir)
        p = Path(name).expanduser()
        if p.exists():
            return p
        return resolve(name, weights_dir=weights_dir)  # raises the "unknown weight name" error

    sd_path, control_path = find(sd), find(control)
    model = build_control_ldm(STAGE2_CONFIGS["sd21_base"], sd=sd_path, control=control_path)
    return model.to(device).eval()

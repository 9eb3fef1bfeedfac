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

Large images (``diffbir_core.tiling``): with a ``plan`` whose diffusion is tiled, the CFG denoiser becomes a
`tiling.TiledDenoiser` (CFG inside each latent tile, Gaussian fusion, official ``predict_noise_tiled``); a
``vae`` runner (`tiling.VAERunner`) encodes c_img / the guidance target and decodes for rgb guidance tile by
tile. Guidance always sees the whole fused latent, so it works while tiled. The latent guidance target's
posterior is computed once (`tiling.PosteriorCache`; the official code re-encodes it every repeat of every
step with the same deterministic encoder).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .config import RestoreParams

__all__ = ["make_conditions", "make_guidance", "sample_latent", "load_pretrained_control_ldm",
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


def make_conditions(ldm, clean: torch.Tensor, params: RestoreParams, *, encode_image: Callable | None = None,
                    encode_text: Callable | None = None) -> tuple[dict, dict | None]:
    """Step 1: (cond, uncond). uncond is None when CFG is off (scale 1), as the official sampler skips it.

    ``encode_image(x_m11) -> c_img`` / ``encode_text(prompts) -> c_txt`` replace the model's own (tiled VAE,
    cached text embeddings); by default ``ldm.prepare_condition`` / ``ldm.encode_text``."""
    b = clean.shape[0]
    if encode_image is None and encode_text is None:
        cond = ldm.prepare_condition(clean, [params.pos_prompt] * b)
    else:
        text = encode_text or ldm.encode_text
        c_img = encode_image(clean * 2 - 1) if encode_image is not None else ldm.vae_encode(clean * 2 - 1)
        cond = {"c_txt": text([params.pos_prompt] * b), "c_img": c_img}
    if params.cfg_scale == 1.0:
        return cond, None
    uncond = {"c_txt": (encode_text or ldm.encode_text)([params.neg_prompt] * b), "c_img": cond["c_img"]}
    return cond, uncond


def make_guidance(ldm, clean: torch.Tensor, params: RestoreParams, *, vae=None):
    """Step 5: the latent image guidance callable, or None when the scale is 0. ``vae``: a `tiling.VAERunner`
    (tiled posterior of the target, tile-by-tile decoder VJP for rgb space)."""
    g = params.guidance
    if not g.enabled:
        return None
    from .guidance import LatentImageGuidance
    from .tiling import PosteriorCache

    return LatentImageGuidance(
        clean * 2 - 1, g.scale, t_start=g.t_start, t_stop=g.t_stop, space=g.space, repeat=g.repeat,
        weighted=g.loss == "wmse", rule=g.rule,
        encode=PosteriorCache(vae.posterior if vae is not None else ldm.vae_posterior, ldm.scale_factor),
        decode=vae.decode_grad if vae is not None else ldm.vae_decode)


def sample_latent(ldm, clean: torch.Tensor, params: RestoreParams, *, seed: int | None = None,
                  noise: Callable | None = None, callback: Callable | None = None,
                  batched_cfg: bool = True, plan=None, vae=None, encode_text: Callable | None = None,
                  amp: Callable | None = None, tile_batch: int = 1, progress: Callable | None = None,
                  keep: dict | None = None) -> torch.Tensor:
    """Steps 1-5 + sampler: the final latent ``[B,4,H/8,W/8]`` for a padded clean image ``[B,3,H,W]``.

    Tiling / speed (see ``diffbir_core.tiling``): ``plan`` (`TilingPlan`; tiled diffusion when ``plan.diffusion``
    and the latent is larger than a tile), ``vae`` (`VAERunner` for c_img, better start and guidance),
    ``encode_text`` (e.g. a `TextEmbeddingCache`), ``amp`` (autocast context factory around model calls),
    ``tile_batch`` (latent tiles per forward), ``progress`` (per-tile `TileEvent` callback)."""
    from .samplers import CFGDenoiser, TorchNoise, better_start_x_T
    from .samplers import run_sampler as _run
    from .tiling import TiledDenoiser

    if clean.shape[-1] % 8 or clean.shape[-2] % 8:
        raise ValueError(f"clean image {tuple(clean.shape[-2:])} must be padded to a multiple of 8 (64 advised)")
    noise = noise if noise is not None else TorchNoise(seed)
    training = training_schedule_for(params)
    with torch.no_grad():
        cond, uncond = make_conditions(ldm, clean, params, encode_image=vae.encode if vae is not None else None,
                                       encode_text=encode_text)
        strength = params.strength

        def model(x, t, c):
            if amp is None:
                return ldm(x, t, c, control_scales=strength)
            with amp():
                return ldm(x, t, c, control_scales=strength).float()

        b, _, h, w = clean.shape
        if plan is not None and plan.diffusion and max(h // 8, w // 8) > plan.latent_tile:
            denoiser = TiledDenoiser(model, cond, uncond, params.cfg_scale, tile=plan.latent_tile,
                                     stride=plan.latent_stride, rescale=params.rescale_cfg, batched=batched_cfg,
                                     num_timesteps=training.num_timesteps, tile_batch=tile_batch, progress=progress)
        else:
            denoiser = CFGDenoiser(model, cond, uncond, params.cfg_scale, rescale=params.rescale_cfg,
                                   batched=batched_cfg and uncond is not None,
                                   num_timesteps=training.num_timesteps)
        lat_c = cond["c_img"].shape[1]
        T = training.num_timesteps
        if params.better_start:
            enc = vae.encode if vae is not None else ldm.vae_encode
            x_T = better_start_x_T(clean, lambda x, eps: enc(x, sample=True, noise=eps), training,
                                   noise, latent_channels=lat_c)
        elif params.start_point == "cond":  # HEAD pipeline.py:146-157: q_sample(c_img, T-1, eps)
            c_img = cond["c_img"]
            x_T = training.q_sample(c_img, T - 1, noise(tuple(c_img.shape), c_img))
        else:
            x_T = noise((b, lat_c, h // 8, w // 8), cond["c_img"])  # [B,4,h,w]
        if params.noise_aug > 0:  # HEAD pipeline.py:160-167: both branches share the noised c_img
            c_img = cond["c_img"]
            cond["c_img"] = training.q_sample(c_img, int(params.noise_aug), noise(tuple(c_img.shape), c_img))
            if uncond is not None:
                uncond["c_img"] = cond["c_img"]
        if keep is not None:
            keep["x_T"] = x_T
        guidance = make_guidance(ldm, clean, params, vae=vae)
        return _run(params.sampler, denoiser, x_T, training, params.steps, guidance=guidance, noise=noise,
                    callback=callback, edm_official_sigma_max=params.edm_sigma_max == "official")


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

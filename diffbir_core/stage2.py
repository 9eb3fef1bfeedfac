"""Stage 2, the one procedure: clean image -> conditions -> x_T -> CFG + guidance + sampler -> VAE decode -> crop.

`run` (called by `DiffBIRPipeline.run_stage2`, hence the face layer; by diffbir_eval/bench; previews via `Stage2Step`):
    1. pad I_reg ([1,3,H,W] in [0,1]) to x64 (`Stage2Geometry`); cond = {c_txt(pos), c_img = E(I_reg * 2 - 1)},
       uncond = {c_txt(neg), same c_img} (none when CFG is 1); every control residual x strength.
    2. x_T ~ N(0, I) from the noise source (first draw), or the v2.0.0 "better start" (`better_start_x_T`).
    3. CFG (`diffusion.cfg.CFGDenoiser`, around `tiling.denoiser.TiledModel` when the plan tiles the latent), latent
    image
       guidance (eq. 5-6) on z0_hat, the sampler by name (`diffusion.registry.run_sampler`).
    4. VAE decode (`models.vae_runner.VAERunner`, tiled per the plan), crop, (x + 1) / 2, colour fix with I_reg.
``callback`` gets a `Stage2Step` (a `StepInfo` + geometry) per step; ``on_stage(name, seconds)`` gets None when
text / vae_encode / sampling / vae_decode / colorfix starts and its wall time when it ends.

Mirrors: v2.0.0 utils/helpers.py:66-127 Pipeline.run_stage2 and :152-155 (colour fix) of Pipeline.run; HEAD
diffbir/pipeline.py:71 Pipeline.apply_cldm (v-prediction, rescaled CFG, EDM samplers).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch

from .allocator import defaults_while, release_freed_memory
from .approx import DeepCacheModel
from .colorfix import color_fix, wavelet_decomposition
from .config import RestoreParams
from .diffusion.cfg import CFGDenoiser
from .diffusion.guidance import LatentImageGuidance
from .diffusion.noise import NoiseFn, TorchNoise
from .diffusion.registry import run_sampler
from .diffusion.samplers import StepInfo
from .diffusion.schedule import TrainingSchedule, make_training_schedule
from .imageio import pad_to_multiple
from .models.vae_runner import PosteriorCache, VAERunner
from .speed import SpeedOptions, autocast_for
from .tiling.denoiser import TiledModel
from .tiling.plan import TilingPlan

Tensor = torch.Tensor
StageCallback = Callable[[str, "float | None"], None]  # (stage name, None at the start | seconds at the end)

__all__ = [
    "run",
    "sample_latent",
    "make_conditions",
    "make_guidance",
    "better_start_x_T",
    "training_schedule_for",
    "Stage2Geometry",
    "Stage2Step",
    "StageCallback",
]

PAD_MULTIPLE = 64  # official pad_to_multiples_of(clean, multiple=64); 8 when the VAE encoder or diffusion is tiled


def pad_multiple(plan: TilingPlan, params: RestoreParams) -> int:
    """HEAD pipeline.py:99-104: zeros to x64, or to x8 when the VAE encoder or the diffusion is tiled (asked for
    with ``params.tiles.diffusion`` / ``params.tiles.vae_encoder``, or chosen by the plan)."""
    t = params.tiles
    asked = bool(getattr(t, "diffusion", None)) or bool(getattr(t, "vae_encoder", None))
    return 8 if (asked or plan.diffusion or plan.vae_encoder.mode != "none") else PAD_MULTIPLE


@dataclass(frozen=True)
class Stage2Geometry:
    """Where stage 2 works: the clean image's (H, W) and the x64 padded (H64, W64) the latent comes from."""

    work_hw: tuple[int, int]
    padded_hw: tuple[int, int]

    @classmethod
    def for_size(cls, work_hw: tuple[int, int], multiple: int = PAD_MULTIPLE) -> Stage2Geometry:
        h, w = int(work_hw[0]), int(work_hw[1])
        return cls((h, w), (-(-h // multiple) * multiple, -(-w // multiple) * multiple))

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.padded_hw[0] // 8, self.padded_hw[1] // 8

    def crop(self, x: Tensor) -> Tensor:
        """Drop the padding of a decoded ``[B,3,H64,W64]`` image (or any tensor at the padded size)."""
        if tuple(x.shape[-2:]) != self.padded_hw:
            raise ValueError(f"expected a tensor of the padded size {self.padded_hw}, got {tuple(x.shape[-2:])}")
        return x[..., : self.work_hw[0], : self.work_hw[1]]


@dataclass
class Stage2Step(StepInfo):
    """A sampler `StepInfo` plus the stage-2 geometry (for previews: ``step.preview(ldm.vae_decode)``)."""

    geometry: Stage2Geometry | None = None

    @classmethod
    def wrap(cls, info: StepInfo, geometry: Stage2Geometry) -> Stage2Step:
        return cls(**{f.name: getattr(info, f.name) for f in fields(StepInfo)}, geometry=geometry)

    def preview(self, decode: Callable[[Tensor], Tensor]) -> Tensor:
        """decode(z0_hat) cropped to the working size: ``[B,3,H,W]`` in [-1, 1]."""
        with torch.no_grad():
            return self.geometry.crop(decode(self.pred_x0))


@contextlib.contextmanager
def _stage(on_stage: StageCallback | None, name: str) -> Iterator[None]:
    if on_stage is None:
        yield
        return
    on_stage(name, None)
    t0 = time.perf_counter()
    yield
    on_stage(name, time.perf_counter() - t0)


def _timed(fn: Callable, on_stage: StageCallback | None, name: str) -> Callable:
    if on_stage is None:
        return fn

    def call(*args, **kw):
        with _stage(on_stage, name):
            return fn(*args, **kw)

    return call


def training_schedule_for(params: RestoreParams) -> TrainingSchedule:
    """The training schedule of the preset's stage-2 weights (eps or v; zero-terminal SNR for v2.1)."""
    s2 = params.stage2
    if s2 is None:
        raise ValueError(f"preset {params.preset!r} has no diffusion stage")
    name = "v2.1" if s2.zero_snr else "v2"
    sched = make_training_schedule(name)
    if sched.parameterization != s2.parameterization:
        raise ValueError(
            f"diffusion preset {name!r} is {sched.parameterization}-prediction but the weights "
            f"{s2.sd!r} need {s2.parameterization}-prediction"
        )
    return sched


def make_conditions(
    ldm,
    clean: Tensor,
    params: RestoreParams,
    *,
    encode_image: Callable | None = None,
    encode_text: Callable | None = None,
) -> tuple[dict, dict | None]:
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


def make_guidance(ldm, clean: Tensor, params: RestoreParams, *, vae: VAERunner | None = None):
    """Step 3: the latent image guidance callable, or None when the scale is 0. ``vae``: a `tiling.VAERunner`
    (tiled posterior of the target, tile-by-tile decoder VJP for rgb space)."""
    g = params.guidance
    if not g.enabled:
        return None
    return LatentImageGuidance(
        clean * 2 - 1,
        g.scale,
        t_start=g.t_start,
        t_stop=g.t_stop,
        space=g.space,
        repeat=g.repeat,
        weighted=g.loss == "wmse",
        rule=g.rule,
        encode=PosteriorCache(vae.posterior if vae is not None else ldm.vae_posterior, ldm.scale_factor),
        decode=vae.decode_grad if vae is not None else ldm.vae_decode,
    )


def better_start_x_T(
    clean01: Tensor,
    encode: Callable[[Tensor, Tensor | None], Tensor],
    training: TrainingSchedule,
    noise: NoiseFn,
    *,
    latent_channels: int = 4,
    downscale: int = 8,
    official_range: bool = True,
) -> Tensor:
    """Step 2, v2.0.0 "better start" (utils/helpers.py:95-105): x_T from the low frequencies of I_reg.

    (high, low) = wavelet_decomposition(clean01); z_0 = encode(low, eps_1) with a posterior sample
    (draw 1; the official code encodes the [0,1] image directly, ``official_range=False`` encodes low*2-1);
    x_T = sqrt(abar_{T-1}) z_0 + sqrt(1 - abar_{T-1}) eps_2 (draw 2) with the float32 training buffers.
    ``encode(x, eps) -> scaled latent`` as in `diffusion.guidance`.
    """
    if clean01.ndim != 4:
        raise ValueError(f"clean image must be NCHW, got {tuple(clean01.shape)}")
    b, _, h, w = clean01.shape
    if h % downscale or w % downscale:
        raise ValueError(f"image size {h}x{w} must be a multiple of {downscale}; pad it first")
    _, low = wavelet_decomposition(clean01)
    x_in = low if official_range else low * 2 - 1
    eps1 = noise((b, latent_channels, h // downscale, w // downscale), clean01)
    z0 = encode(x_in, eps1)
    eps2 = noise(tuple(z0.shape), z0)
    return training.q_sample(z0, training.num_timesteps - 1, eps2)


def sample_latent(
    ldm,
    clean: Tensor,
    params: RestoreParams,
    *,
    seed: int | None = None,
    noise: NoiseFn | None = None,
    callback: Callable | None = None,
    batched_cfg: bool = True,
    plan: TilingPlan | None = None,
    vae: VAERunner | None = None,
    encode_text: Callable | None = None,
    amp: Callable | None = None,
    tile_batch: int = 1,
    progress: Callable | None = None,
    on_stage: StageCallback | None = None,
    keep: dict | None = None,
    deepcache: int = 0,
) -> Tensor:
    """Steps 1-3: the final latent ``[B,4,H/8,W/8]`` for an already padded clean image ``[B,3,H,W]`` in [0,1].

    ``plan`` (tiled diffusion when ``plan.diffusion`` and the latent is larger than a tile), ``vae`` (a
    `VAERunner` for c_img, better start and guidance), ``encode_text`` (e.g. a `TextEmbeddingCache`), ``amp``
    (autocast context factory around model calls), ``tile_batch`` (latent tiles per forward), ``progress``
    (per-tile `TileEvent` callback), ``on_stage`` (see the module docstring), ``keep`` (receives ``x_T``),
    ``deepcache`` (> 1: APPROXIMATE `approx.DeepCacheModel` with that interval; refused with tiled diffusion)."""
    if clean.shape[-1] % 8 or clean.shape[-2] % 8:
        raise ValueError(f"clean image {tuple(clean.shape[-2:])} must be padded to a multiple of 8 (64 advised)")
    noise = noise if noise is not None else TorchNoise(seed)
    training = training_schedule_for(params)
    encode_image = vae.encode if vae is not None else None
    if on_stage is not None:  # time the encoders: use them explicitly (same calls as ldm.prepare_condition)
        encode_image = _timed(encode_image or (lambda x: ldm.vae_encode(x)), on_stage, "vae_encode")
        encode_text = _timed(encode_text or ldm.encode_text, on_stage, "text")
    with torch.no_grad():
        cond, uncond = make_conditions(ldm, clean, params, encode_image=encode_image, encode_text=encode_text)
        release_freed_memory()  # stage boundary: what the encoders kept is not the sampler's shapes
        strength = params.strength
        b, _, h, w = clean.shape
        tiled = plan is not None and plan.diffusion and max(h // 8, w // 8) > plan.latent_tile
        if not tiled and (h % 64 or w % 64):  # HEAD pipeline.py:131-134: untiled, c_img is zero-padded to x8
            c_img, _ = pad_to_multiple(cond["c_img"], 8, mode="constant")
            cond["c_img"] = c_img
            if uncond is not None:
                uncond["c_img"] = c_img
            h, w = c_img.shape[-2] * 8, c_img.shape[-1] * 8

        if deepcache > 1 and tiled:
            raise ValueError(
                "DeepCache (approximate) cannot run with tiled diffusion: it caches one feature map per condition; "
                "turn it off or give more memory (--max-memory) so the diffusion runs untiled"
            )
        if deepcache > 1:  # APPROXIMATE: deep features reused between full steps
            forward = DeepCacheModel(ldm, deepcache, control_scales=strength)
        else:

            def forward(x, t, c):
                return ldm(x, t, c, control_scales=strength)

        def model(x, t, c):
            if amp is None:
                return forward(x, t, c)
            with amp():
                return forward(x, t, c).float()

        with _stage(on_stage, "sampling"):
            net = (
                TiledModel(
                    model, tile=plan.latent_tile, stride=plan.latent_stride, tile_batch=tile_batch, progress=progress
                )
                if tiled
                else model
            )
            denoiser = CFGDenoiser(
                net,
                cond,
                uncond,
                params.cfg_scale,
                rescale=params.rescale_cfg,
                batched=batched_cfg and uncond is not None,
                num_timesteps=training.num_timesteps,
            )
            lat_c = cond["c_img"].shape[1]
            T = training.num_timesteps
            if params.better_start:
                enc = vae.encode if vae is not None else ldm.vae_encode
                x_T = better_start_x_T(
                    clean, lambda x, eps: enc(x, sample=True, noise=eps), training, noise, latent_channels=lat_c
                )
            elif params.start_point == "cond":  # HEAD pipeline.py:146-157: x_T = q_sample(c_img, T-1, eps)
                c_img = cond["c_img"]
                x_T = training.q_sample(c_img, T - 1, noise(tuple(c_img.shape), c_img))
            else:
                x_T = noise((b, lat_c, h // 8, w // 8), cond["c_img"])  # [B,4,h,w]
            if params.noise_aug > 0:  # HEAD pipeline.py:160-167: c_img = q_sample(c_img, noise_aug, eps), shared
                c_img = cond["c_img"]
                cond["c_img"] = training.q_sample(c_img, int(params.noise_aug), noise(tuple(c_img.shape), c_img))
                if uncond is not None:
                    uncond["c_img"] = cond["c_img"]
            if keep is not None:
                keep["x_T"] = x_T
            guidance = make_guidance(ldm, clean, params, vae=vae)
            return run_sampler(
                params.sampler,
                denoiser,
                x_T,
                training,
                params.steps,
                guidance=guidance,
                noise=noise,
                callback=callback,
                **sampler_options(params),
            )


def sampler_options(params: RestoreParams) -> dict:
    """The sampler knobs of ``params`` for `run_sampler` (official HEAD inference.py:205-240 names)."""
    return {
        "edm_official_sigma_max": params.edm_sigma_max == "official",
        "sde_noise": params.sde_noise,
        "s_churn": params.s_churn,
        "s_tmin": params.s_tmin,
        "s_tmax": params.s_tmax,
        "s_noise": params.s_noise,
        "eta": params.eta,
        "order": params.order,
    }


def run(
    ldm,
    clean: Tensor,
    params: RestoreParams,
    *,
    seed: int | None = None,
    noise: NoiseFn | None = None,
    callback: Callable[[Stage2Step], None] | None = None,
    on_stage: StageCallback | None = None,
    plan: TilingPlan | None = None,
    speed: SpeedOptions | None = None,
    encode_text: Callable | None = None,
    progress: Callable | None = None,
    keep: dict | None = None,
) -> Tensor:
    """Stage 2 on the clean image ``clean`` ([1,3,H,W] in [0,1], not clamped); returns the colour-fixed sample
    ``[1,3,H,W]`` (about [0,1]). ``plan``: tiling (default untiled); ``speed``: batched CFG, tile batch and the
    autocast dtype (default `SpeedOptions()`); ``encode_text``: e.g. a `TextEmbeddingCache`; ``keep``, if a
    dict, receives ``x_T``, ``z_final``, ``clean``, ``decoded`` (the padded VAE output in [-1, 1]),
    ``decoded_cropped`` and ``colorfix_out``."""
    speed = speed if speed is not None else SpeedOptions()
    plan = plan if plan is not None else TilingPlan()
    release_freed_memory()  # stage boundary: what the cleaner kept (allocator tuning) goes back to the OS
    with defaults_while(plan.any):  # a tiled run is memory-bound: glibc's own trimming inside (allocator.py)
        amp = autocast_for(clean.device, speed.torch_dtype)
        runner = VAERunner(ldm, plan.vae_encoder, plan.vae_decoder, amp=amp, progress=progress)
        padded, hw = pad_to_multiple(clean, pad_multiple(plan, params), mode="constant")  # [1,3,H64,W64] (or x8)
        ph, pw = padded.shape[-2:]
        lh, lw = ph // 8, pw // 8
        if not (plan.diffusion and max(lh, lw) > plan.latent_tile):  # the latent is zero-padded to x8 (sample_latent)
            ph, pw = -(-lh // 8) * 64, -(-lw // 8) * 64
        geometry = Stage2Geometry(hw, (ph, pw))
        step_cb = None if callback is None else (lambda info: callback(Stage2Step.wrap(info, geometry)))
        z = sample_latent(
            ldm,
            padded,
            params,
            seed=seed,
            noise=noise,
            callback=step_cb,
            batched_cfg=speed.batched_cfg,
            plan=plan,
            vae=runner,
            encode_text=encode_text,
            amp=amp if speed.dtype != "float32" else None,
            tile_batch=speed.tile_batch,
            progress=progress,
            on_stage=on_stage,
            keep=keep,
            deepcache=speed.deepcache,
        )  # [1,4,H64/8,W64/8]
        release_freed_memory()  # stage boundary (allocator tuning): the sampler's kept blocks go back
        with torch.no_grad(), _stage(on_stage, "vae_decode"):
            decoded = runner.decode(z)  # [1,3,H64,W64] in [-1,1]
        cropped = geometry.crop(decoded)  # [1,3,H,W]
        with _stage(on_stage, "colorfix"):
            fixed = color_fix((cropped + 1) / 2, clean, params.color_fix)
        if keep is not None:
            keep.update(z_final=z, clean=clean, decoded=decoded, decoded_cropped=cropped, colorfix_out=fixed)
        return fixed

"""DiffBIRPipeline: cleaner -> condition -> sampler (+ guidance) -> decode -> colour fix.

Mirrors the official v2.0.0 `Pipeline.run` / `run_stage2` (and the fixture `pipeline_swinir` run):

    1. lq in [0, 1]; target size = round(lq size x upscale).
    2. Stage 1 (paper eq. 1, ``I_reg = RM(I_LQ)``): the task's cleaner produces the clean image at the
       working size (target size, or short edge 512 when diffusion runs on a smaller image).
    3. Stage 2: pad to x64, condition ``c = E(I_reg)`` (VAE posterior mode x 0.18215) + text, x_T ~ N(0, I)
       (or the "better start" of v2.0.0), sampler with CFG / control strength / latent image guidance
       (eq. 5-6), VAE decode, crop, ``(x + 1) / 2``.
    4. Colour fix (wavelet: low frequencies from I_reg, high from the diffusion output; or AdaIN).
    5. Resize to the target size.

Models are loaded lazily on first use and cached per pipeline instance (cleaners by name, the
ControlLDM by (sd, control) pair); tests, the demo and notebooks may inject models instead.

Large images and speed (``diffbir_core.tiling``): before stage 1, `tiling.auto_tiling` decides per stage from
``params.tiles`` and the memory budget (weights of the loaded models + bytes-per-pixel estimates) whether to
tile the cleaner (`TiledCleaner`), the VAE encoder/decoder (seam-free "sync" mode: exact whole-image
GroupNorm statistics) and the diffusion (`TiledDenoiser`: CFG inside each latent tile, Gaussian fusion every
step; guidance acts on the fused latent). The plan is reported in ``RestoreResult.extra["tiling"]``.
`SpeedOptions` (SDPA attention, channels_last, GPU half precision, torch.compile, offload, batched CFG) are
applied to the models this pipeline loads (to injected ones only when ``speed=`` is given); text embeddings
are computed once per prompt (`TextEmbeddingCache`).
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import RestoreParams
from .imageio import LoadedImage, pad_to_multiple, resize, to_numpy, to_tensor

log = logging.getLogger(__name__)

__all__ = ["DiffBIRPipeline", "RestoreResult"]


@dataclass
class RestoreResult:
    """What a restore call returns (images are HxWx3 float32 in [0, 1])."""

    image: np.ndarray
    stage1: np.ndarray
    alpha: np.ndarray | None = None
    seed: int | None = None
    params: RestoreParams | None = None
    notices: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def working_size(out_hw: tuple[int, int], min_side: int) -> tuple[int, int]:
    """Scale (H, W) up so the short edge is ``min_side`` when it is smaller (official ``resize_short_edge_to``,
    HEAD ``diffbir/pipeline.py:25-34``: the long side is ``int()``-truncated, 240x180 -> 682x512)."""
    h, w = out_hw
    if min(h, w) >= min_side:
        return h, w
    if h == w:
        return min_side, min_side
    if h < w:
        return min_side, int(w * (min_side / h))
    return int(h * (min_side / w)), min_side


def pil_resize_uint8(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """HEAD ``bsr_loop.py:55-59`` / ``bid_loop.py:48-52`` / ``bfr_loop.py:30-34``: PIL bicubic resize of the
    8-bit LQ to (H, W) (an exact copy when the size is unchanged), returned as float in [0, 1]."""
    from PIL import Image

    if tuple(rgb.shape[:2]) == tuple(hw):
        return rgb
    u8 = (np.clip(rgb, 0, 1) * 255.0).round().astype(np.uint8)
    out = Image.fromarray(u8, "RGB").resize((int(hw[1]), int(hw[0])), Image.BICUBIC)
    return np.asarray(out, dtype=np.float32) / 255.0


class DiffBIRPipeline:
    """Restores images according to a `RestoreParams`. One instance caches the models it loaded."""

    def __init__(self, *, weights_dir: str | Path | None = None, device: str | torch.device = "cpu",
                 cleaners: dict[str, Callable] | None = None, ldm: Any = None, speed: Any = None):
        from .tiling import SpeedOptions

        self.weights_dir = weights_dir
        self.device = torch.device(device)
        self._cleaners: dict[str, Callable] = dict(cleaners or {})
        self._ldms: dict[tuple[str, str], Any] = {}
        self._injected_ldm = ldm
        self._speed_explicit = speed is not None
        self.speed = (speed or SpeedOptions()).validate(self.device)
        self.speed_notes: list[str] = []
        self._prepared: set[int] = set()
        self._text_caches: dict[int, Any] = {}

    # ---------------------------------------------------------------- model access
    def cleaner(self, name: str) -> Callable:
        if name not in self._cleaners:
            from .cleaners import load_cleaner

            self._cleaners[name] = load_cleaner(name, weights_dir=self.weights_dir, device=self.device)
        return self._cleaners[name]

    def ldm(self, params: RestoreParams):
        if self._injected_ldm is not None:
            return self._prepare(self._injected_ldm, injected=True)
        s2 = params.stage2
        key = (s2.sd, s2.control)
        if key not in self._ldms:
            from .sampling import load_pretrained_control_ldm

            self._ldms[key] = load_pretrained_control_ldm(s2.sd, s2.control, weights_dir=self.weights_dir,
                                                          device=self.device)
        return self._prepare(self._ldms[key], injected=False)

    def _prepare(self, ldm, *, injected: bool):
        """Apply the speed options once per model (injected models only when ``speed=`` was given)."""
        if id(ldm) not in self._prepared and (self._speed_explicit or not injected):
            from .tiling import apply_speed_options

            self.speed_notes = apply_speed_options(ldm, self.speed, self.device)
        self._prepared.add(id(ldm))
        return ldm

    def plan_tiling(self, params: RestoreParams, work_hw: tuple[int, int], cleaner: Any = None):
        """`tiling.auto_tiling` with the weights actually resident (stage-2 models of ``params`` and ``cleaner``)."""
        from .tiling import auto_tiling, model_bytes

        weights = model_bytes(getattr(cleaner, "net", None))
        if params.uses_diffusion:
            weights += model_bytes(self.ldm(params))
        dtype_bytes = 4 if self.speed.dtype == "float32" else 2
        return auto_tiling(params, work_hw, self.device, weights_bytes=weights, dtype_bytes=dtype_bytes)

    def _tiled_cleaner(self, cleaner: Callable, plan) -> Callable:
        from .cleaners import Cleaner
        from .tiling import TiledCleaner

        if plan is None or not plan.cleaner or not isinstance(cleaner, Cleaner) or cleaner.net is None:
            return cleaner
        return TiledCleaner(cleaner, plan.cleaner_tile, plan.cleaner_overlap)

    # ---------------------------------------------------------------- restore
    def restore(self, image: LoadedImage | np.ndarray, params: RestoreParams,
                callback: Callable | None = None, noise=None, keep: dict | None = None, plan=None) -> RestoreResult:
        """Restore one image. ``image``: a `LoadedImage` or an HxWx3 float array in [0, 1].

        ``callback`` receives each sampler step (`samplers.StepInfo`); ``noise`` replaces the seeded noise
        source (e.g. `samplers.ReplayNoise`); ``keep``, if a dict, receives intermediates (``z_final``,
        ``clean`` = stage-1 output at the working size, ``decoded``) for notebooks and tests. ``plan`` (a
        `tiling.TilingPlan`) overrides the automatic tiling decision.
        """
        params = params.validate()
        loaded = image if isinstance(image, LoadedImage) else LoadedImage(rgb=np.asarray(image, np.float32))
        if params.task == "face":
            from .face.restore import restore_face_task

            return restore_face_task(self, loaded, params, callback=callback, noise=noise, keep=keep)
        return self.restore_general(loaded, params, callback=callback, noise=noise, keep=keep, plan=plan)

    def restore_general(self, loaded: LoadedImage, params: RestoreParams, callback: Callable | None = None,
                        noise=None, keep: dict | None = None, plan=None) -> RestoreResult:
        """The general path (no face handling) for a validated ``params``; the face layer calls it for aligned
        faces (official geometry, HEAD bfr_loop.py:17-34)."""
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        timings: dict[str, float] = {}
        h, w = loaded.rgb.shape[:2]
        # official output size: int() truncation (HEAD bsr_loop.py:55-59, pipeline.py:340)
        out_hw = (max(1, int(h * params.upscale)), max(1, int(w * params.upscale)))

        t0 = time.perf_counter()
        cleaner = self.cleaner(params.cleaner_for_task())
        rgb = loaded.rgb
        if params.pre_resize == "pil" and getattr(cleaner, "scale", 1) == 1:
            rgb = pil_resize_uint8(rgb, out_hw)  # x1 cleaners: HEAD loops upscale the uint8 LQ with PIL first
        lq = to_tensor(rgb, self.device)  # [1,3,h,w]
        work_hw = working_size(out_hw, 512) if params.uses_diffusion else out_hw
        plan = plan if plan is not None else self.plan_tiling(params, work_hw, cleaner)
        cleaner = self._tiled_cleaner(cleaner, plan)
        extra = {"tiling": plan.summary()}
        if not params.uses_diffusion:
            with torch.inference_mode():
                clean = cleaner(lq, out_size=out_hw)
            timings["stage1"] = time.perf_counter() - t0
            img = to_numpy(clean)
            return RestoreResult(image=img, stage1=img, alpha=loaded.alpha, seed=seed, params=params,
                                 timings=timings, notices=list(plan.notes), extra=extra)

        with torch.inference_mode():
            # not clamped: the official pipeline conditions on the raw stage-1 output
            clean = cleaner(lq, out_size=work_hw, clamp=False)  # [1,3,H,W]
        timings["stage1"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        sample = self.run_stage2(clean, params, seed=seed, callback=callback, noise=noise, keep=keep,
                                 plan=plan)  # [1,3,H,W]
        timings["stage2"] = time.perf_counter() - t1
        out = resize(sample, out_hw).clamp(0, 1)
        return RestoreResult(image=to_numpy(out), stage1=to_numpy(resize(clean, out_hw).clamp(0, 1)), alpha=loaded.alpha,
                             seed=seed, params=params, timings=timings, notices=list(plan.notes), extra=extra)

    def run_stage2(self, clean: torch.Tensor, params: RestoreParams, *, seed: int, callback=None,
                   noise=None, keep: dict | None = None, plan=None, progress: Callable | None = None) -> torch.Tensor:
        """Stage 2 on the clean image ``clean`` ([1,3,H,W] in [0,1]); returns the colour-fixed sample.
        ``plan``: a `tiling.TilingPlan` (default: `plan_tiling` for this size); ``progress``: per-tile events."""
        from .colorfix import color_fix
        from .sampling import sample_latent
        from .tiling import TextEmbeddingCache, VAERunner, autocast_for

        ldm = self.ldm(params)
        plan = plan if plan is not None else self.plan_tiling(params, tuple(clean.shape[-2:]))
        amp = autocast_for(self.device, self.speed.torch_dtype)
        runner = VAERunner(ldm, plan.vae_encoder, plan.vae_decoder, amp=amp, progress=progress)
        if id(ldm) not in self._text_caches:
            self._text_caches[id(ldm)] = TextEmbeddingCache(ldm.encode_text)
        # zeros to x64, or x8 when the VAE encoder or the diffusion is tiled (HEAD pipeline.py:37-42,99-104)
        lat_big = max(clean.shape[-2], clean.shape[-1]) > 8 * plan.latent_tile
        multiple = 8 if (plan.diffusion and lat_big) or plan.vae_encoder.mode != "none" else 64
        padded, hw = pad_to_multiple(clean, multiple, mode="constant")  # [1,3,H',W']
        z = sample_latent(ldm, padded, params, seed=seed, callback=callback, noise=noise,
                          batched_cfg=self.speed.batched_cfg, plan=plan, vae=runner,
                          encode_text=self._text_caches[id(ldm)],
                          amp=amp if self.speed.dtype != "float32" else None,
                          tile_batch=self.speed.tile_batch, progress=progress, keep=keep)  # [1,4,H64/8,W64/8]
        with torch.no_grad():
            sample = runner.decode(z)  # [1,3,H64,W64] in [-1,1]
        sample_full = sample
        sample = sample[..., : hw[0], : hw[1]]
        fixed = color_fix((sample + 1) / 2, clean, params.color_fix)
        if keep is not None:
            keep.update(z_final=z, clean=clean, decoded=sample_full, decoded_cropped=sample, colorfix_out=fixed)
        return fixed

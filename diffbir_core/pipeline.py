"""DiffBIRPipeline, the general path: stage 1 (cleaner) -> stage 2 (`stage2.run`) -> resize. Knows nothing of faces.

    1. lq in [0, 1]; target size = int(lq size x upscale) (official truncation); x1 cleaners get the 8-bit LQ
       PIL-bicubic resized to the target first (HEAD bsr/bid/bfr loops, ``params.pre_resize``).
    2. Stage 1 (paper eq. 1, ``I_reg = RM(I_LQ)``): the task's cleaner at the working size (`types.working_size`:
       the target, or short edge 512 when diffusion runs on a smaller image), tiled when the plan says so.
    3. Stage 2 (`stage2.run`: conditions, sampler + CFG + guidance, VAE decode, crop, colour fix).
    4. Resize to the target size.  Face mode is the layer above (`face.pipeline.FacePipeline`; `api.restore`).
Models load lazily and are cached per instance (cleaners by name, the ControlLDM by (sd, control)); tests, the
demo and notebooks may inject them. Before stage 1, `tiling.auto_tiling` plans per stage from ``params.tiles``
and the resident weights (reported in ``RestoreResult.extra["tiling"]``); `SpeedOptions` are applied to the
models it loads (to injected ones only when ``speed=`` is given); text embeddings are cached per model.

Mirrors: v2.0.0 utils/helpers.py:129-161 Pipeline.run (+ :163-220 run_stage1 of BSRNet / SwinIR / SCUNet);
HEAD diffbir/pipeline.py:236 Pipeline.run.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import stage2
from .cleaners import Cleaner, load_cleaner
from .config import PRESETS, RestoreParams
from .imageio import LoadedImage, as_loaded_image, pil_resize_uint8, resize, to_numpy, to_pil, to_tensor
from .models.ldm import load_pretrained_control_ldm
from .models.text import TextEmbeddingCache
from .preset_weights import check_weights
from .speed import SpeedOptions, apply_process_options, apply_speed_options, auto_device
from .tiling.cleaner import TiledCleaner
from .tiling.plan import TilingPlan, auto_tiling, model_bytes
from .types import RestoreResult, working_size

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

__all__ = ["DiffBIRPipeline"]


class DiffBIRPipeline:
    """Restores images according to a `RestoreParams` (tasks sr / denoise). One instance caches its models."""

    def __init__(
        self,
        *,
        weights_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        cleaners: dict[str, Callable] | None = None,
        ldm: Any = None,
        speed: SpeedOptions | None = None,
    ):
        self.weights_dir = weights_dir
        self.device = torch.device(device)
        self._cleaners: dict[str, Callable] = dict(cleaners or {})
        self._ldms: dict[tuple[str, str], Any] = {}
        self._injected_ldm = ldm
        self._speed_explicit = speed is not None
        self.speed = (speed or SpeedOptions()).validate(self.device)
        self.speed_notes: list[str] = apply_process_options(self.speed, self.device)  # allocator (CPU)
        self._prepared: set[int] = set()
        self._text_caches: dict[int, TextEmbeddingCache] = {}

    # ---------------------------------------------------------------- model access
    def cleaner(self, name: str, path: str | None = None) -> Callable:
        """The cleaner ``name`` (cached); ``path``: an explicit weight file for that architecture (custom weights)."""
        key = name if path is None else f"{name}@{path}"
        if key not in self._cleaners:
            self._cleaners[key] = load_cleaner(name, weights_dir=self.weights_dir, path=path, device=self.device)
        return self._cleaners[key]

    def ldm(self, params: RestoreParams):
        if self._injected_ldm is not None:
            return self._prepare(self._injected_ldm, injected=True)
        s2 = params.stage2
        key = (s2.sd, s2.control)
        if key not in self._ldms:
            self._ldms[key] = load_pretrained_control_ldm(
                s2.sd, s2.control, weights_dir=self.weights_dir, device=self.device
            )
        return self._prepare(self._ldms[key], injected=False)

    def _prepare(self, ldm, *, injected: bool):
        """Apply the speed options once per model (injected models only when ``speed=`` was given)."""
        if id(ldm) not in self._prepared and (self._speed_explicit or not injected):
            self.speed_notes = apply_speed_options(ldm, self.speed, self.device)
        self._prepared.add(id(ldm))
        return ldm

    def plan_tiling(self, params: RestoreParams, work_hw: tuple[int, int], cleaner: Any = None) -> TilingPlan:
        """`tiling.auto_tiling` with the weights actually resident (stage-2 models of ``params`` and ``cleaner``)."""
        weights = model_bytes(getattr(cleaner, "net", None))
        if params.uses_diffusion:
            weights += model_bytes(self.ldm(params))
        dtype_bytes = 4 if self.speed.dtype == "float32" else 2
        return auto_tiling(params, work_hw, self.device, weights_bytes=weights, dtype_bytes=dtype_bytes)

    def _tiled_cleaner(self, cleaner: Callable, plan: TilingPlan | None) -> Callable:
        if plan is None or not plan.cleaner or not isinstance(cleaner, Cleaner) or cleaner.net is None:
            return cleaner
        return TiledCleaner(cleaner, plan.cleaner_tile, plan.cleaner_overlap)

    # ---------------------------------------------------------------- one-line use
    @classmethod
    def from_pretrained(
        cls,
        preset: str = "v2.1",
        *,
        device: str | torch.device = "auto",
        weights_dir: str | Path | None = None,
        check: bool = True,
        **kw,
    ) -> DiffBIRPipeline:
        """A pipeline for ``preset`` (a key of `config.PRESETS`): ``pipe(image, **overrides) -> PIL.Image``.

        ``device="auto"`` picks cuda, mps or cpu. With ``check`` every weight file of the preset's task is resolved
        first (`preset_weights.check_weights`: ONE `WeightsError` lists all missing files). General tasks only;
        for faces use ``diffbir_core.from_pretrained`` (the `api.Restorer`, same call)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        if check:
            check_weights(preset, weights_dir=weights_dir)
        pipe = cls(weights_dir=weights_dir, device=auto_device(device), **kw)
        pipe.preset = preset
        return pipe

    def __call__(self, image, **overrides) -> Image.Image:
        """Restore ``image`` (anything `imageio.as_loaded_image` takes) with this pipeline's preset (``"offline"``
        unless built by `from_pretrained`) plus ``overrides`` (flat names: ``steps=20, cfg_scale=4, seed=1``)."""
        params = RestoreParams.from_flat(
            {"preset": getattr(self, "preset", "offline"), "device": str(self.device), **overrides}
        )
        res = self.restore(image, params)
        return to_pil(res.image, res.alpha)

    # ---------------------------------------------------------------- restore
    def restore(
        self,
        image: LoadedImage | np.ndarray,
        params: RestoreParams,
        callback: Callable | None = None,
        noise=None,
        keep: dict | None = None,
        plan: TilingPlan | None = None,
    ) -> RestoreResult:
        """Restore one image. ``image``: a path, PIL image, numpy / torch array or `LoadedImage` (`as_loaded_image`).

        ``callback`` receives each sampler step (`stage2.Stage2Step`, a `StepInfo` with the geometry); ``noise``
        replaces the seeded noise source (e.g. `diffusion.noise.ReplayNoise`); ``keep``, if a dict, receives
        intermediates (``z_final``, ``clean`` = stage-1 output at the working size, ``decoded``) for notebooks and
        tests. ``plan`` (a `tiling.TilingPlan`) overrides the automatic tiling decision.
        """
        params = params.validate()
        if params.task == "face":
            raise ValueError(
                "task 'face' is restored by diffbir_core.face.pipeline.FacePipeline (or "
                "diffbir_core.api.restore, which picks it); DiffBIRPipeline.restore handles the general "
                "tasks sr and denoise"
            )
        loaded = as_loaded_image(image)  # path, PIL, numpy (uint8/uint16/float), torch: see imageio
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        timings: dict[str, float] = {}
        h, w = loaded.rgb.shape[:2]
        # official output size: int() truncation (HEAD bsr_loop.py:55-59, pipeline.py:340)
        out_hw = (max(1, int(h * params.upscale)), max(1, int(w * params.upscale)))

        t0 = time.perf_counter()
        cleaner = self.cleaner(params.cleaner_for_task(), params.cleaner_path)
        rgb = loaded.rgb
        if params.pre_resize == "pil" and isinstance(cleaner, Cleaner) and cleaner.scale == 1:
            rgb = pil_resize_uint8(rgb, out_hw)  # x1 cleaners: HEAD loops upscale the 8-bit LQ with PIL first
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
            return RestoreResult(
                image=img,
                stage1=img,
                alpha=loaded.alpha,
                seed=seed,
                params=params,
                timings=timings,
                notices=list(plan.notes),
                extra=extra,
            )

        with torch.inference_mode():
            # not clamped: the official pipeline conditions on the raw stage-1 output
            clean = cleaner(lq, out_size=work_hw, clamp=False)  # [1,3,H,W]
        timings["stage1"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        sample = self.run_stage2(
            clean, params, seed=seed, callback=callback, noise=noise, keep=keep, plan=plan
        )  # [1,3,H,W]
        timings["stage2"] = time.perf_counter() - t1
        out = resize(sample, out_hw).clamp(0, 1)
        return RestoreResult(
            image=to_numpy(out),
            stage1=to_numpy(resize(clean, out_hw).clamp(0, 1)),
            alpha=loaded.alpha,
            seed=seed,
            params=params,
            timings=timings,
            notices=list(plan.notes),
            extra=extra,
        )

    def run_stage2(
        self,
        clean: torch.Tensor,
        params: RestoreParams,
        *,
        seed: int,
        callback=None,
        noise=None,
        keep: dict | None = None,
        plan: TilingPlan | None = None,
        progress: Callable | None = None,
        on_stage: stage2.StageCallback | None = None,
    ) -> torch.Tensor:
        """`stage2.run` with this pipeline's ControlLDM, speed options and text cache on the clean image
        ``clean`` ([1,3,H,W] in [0,1]); returns the colour-fixed sample. ``plan``: a `tiling.TilingPlan`
        (default: `plan_tiling` for this size); ``progress``: per-tile events; ``on_stage``: stage timings."""
        ldm = self.ldm(params)
        plan = plan if plan is not None else self.plan_tiling(params, tuple(clean.shape[-2:]))
        if id(ldm) not in self._text_caches:
            self._text_caches[id(ldm)] = TextEmbeddingCache(ldm.encode_text)
        return stage2.run(
            ldm,
            clean,
            params,
            seed=seed,
            noise=noise,
            callback=callback,
            on_stage=on_stage,
            plan=plan,
            speed=self.speed,
            encode_text=self._text_caches[id(ldm)],
            progress=progress,
            keep=keep,
        )

"""FacePipeline: face mode as a layer above the general `DiffBIRPipeline` (which knows nothing of faces).

    face_fn       the task's face cleaner at 512 (`pipe.cleaner`) + stage 2 (`pipe.run_stage2`) when the
                  preset uses diffusion (else the cleaner alone, `cleaner_face_fn`);
    background_fn per ``params.face.background``: "general" = ``pipe.restore(img, params with task sr)``,
                  "offline" = the offline cleaner, "bicubic".
The `FaceRestorer` work is `face.restorer`; this class owns the detector / parser cache (`FaceModels` per
backend and device) and turns the `FaceResult` into a `RestoreResult`. It calls only public pipeline methods.

Mirrors: official HEAD diffbir/inference/bfr_loop.py (aligned faces: cleaner + diffusion at 512) and
unaligned_bfr_loop.py (whole photos: faces via the face pipeline, background via the general BSR pipeline).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch

from ..config import RestoreParams
from ..imageio import LoadedImage, as_loaded_image, to_numpy, to_tensor
from ..pipeline import DiffBIRPipeline
from ..types import RestoreResult
from . import align
from .restorer import (
    BackgroundFn,
    FaceFn,
    FaceInfo,
    FaceModels,
    FaceRestorer,
    bicubic_background,
    cleaner_background_fn,
    cleaner_face_fn,
)

__all__ = ["FacePipeline"]


class FacePipeline:
    """Restores ``task == "face"`` requests with a general pipeline ``pipe`` (shared, not modified)."""

    def __init__(self, pipe: DiffBIRPipeline, *, model_dir=None) -> None:
        self.pipe = pipe
        self.model_dir = model_dir
        self._models: dict[tuple[str, str], FaceModels] = {}

    def models(self, backend: str) -> FaceModels:
        """The cached detector / parser for ``backend`` on the pipeline's device."""
        key = (backend, str(self.pipe.device))
        if key not in self._models:
            self._models[key] = FaceModels(backend, device=self.pipe.device, model_dir=self.model_dir)
        return self._models[key]

    def _face_fn(self, params: RestoreParams, seed: int, callback: Callable | None) -> FaceFn:
        cleaner = self.pipe.cleaner(params.cleaner_for_task(), params.cleaner_path)
        if not params.uses_diffusion:
            return cleaner_face_fn(cleaner)
        s = align.FACE_SIZE
        device = self.pipe.device

        def face_fn(face: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                clean = cleaner(to_tensor(face, device), out_size=(s, s), clamp=False)  # [1,3,512,512]
            return to_numpy(self.pipe.run_stage2(clean, params, seed=seed, callback=callback))

        return face_fn

    def _background_fn(self, params: RestoreParams, callback: Callable | None) -> BackgroundFn:
        kind = params.face.background
        if kind == "bicubic":
            return bicubic_background
        if kind == "offline":
            return cleaner_background_fn(self.pipe.cleaner("offline"))
        general = params.replace(task="sr")

        def background_fn(img: np.ndarray, out_size: tuple[int, int]) -> np.ndarray:
            return bicubic_background(self.pipe.restore(img, general, callback=callback).image, out_size)

        return background_fn

    def restore_aligned(
        self,
        loaded: LoadedImage,
        params: RestoreParams,
        callback: Callable | None = None,
        noise=None,
        keep: dict | None = None,
        plan=None,
    ) -> RestoreResult:
        """An aligned face (``params.face.aligned is True``) as HEAD bfr_loop.py:17-34: the general pipeline with
        the face cleaner on the input x upscale (PIL bicubic), restored at that size (short side >= 512)."""
        general = params.replace(task="sr", cleaner=params.cleaner_for_task())
        res = self.pipe.restore(loaded, general, callback=callback, noise=noise, keep=keep, plan=plan)
        oh, ow = res.image.shape[:2]
        s = align.FACE_SIZE
        info = FaceInfo(
            index=0,
            box=(0.0, 0.0, ow - 1.0, oh - 1.0),
            score=1.0,
            landmarks=align.template_for("retinaface5") * np.array([ow / s, oh / s]),
            kind="retinaface5",
            affine=np.array([[s / ow, 0, 0], [0, s / oh, 0]]),
            align_error_px=0.0,
            seconds=float(sum(res.timings.values())),
        )
        res.params = params
        res.extra.update(face_mode="aligned", faces=[info], face_backend=None)
        return res

    def restore(
        self,
        image: LoadedImage | np.ndarray,
        params: RestoreParams,
        callback: Callable | None = None,
        noise=None,
        keep: dict | None = None,
        plan=None,
    ) -> RestoreResult:
        """Restore a face crop or a whole photo (``params.face``); ``callback`` gets every stage-2 step.
        ``noise`` / ``keep`` / ``plan`` (one stage-2 run) only for an aligned face (``face.aligned`` True)."""
        params = params.validate()
        if params.task != "face":
            raise ValueError(f"FacePipeline restores task 'face', got {params.task!r} (use DiffBIRPipeline)")
        loaded = as_loaded_image(image)  # path, PIL, numpy (uint8/uint16/float), torch: see imageio
        if params.face.aligned is True:
            return self.restore_aligned(loaded, params, callback=callback, noise=noise, keep=keep, plan=plan)
        given = [n for n, v in (("noise", noise), ("keep", keep), ("plan", plan)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to one stage-2 run; whole-photo face mode runs several")
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        restorer = FaceRestorer(params.face, upscale=params.upscale, models=self.models(params.face.backend))
        res = restorer(loaded.rgb, self._face_fn(params, seed, callback), self._background_fn(params, callback))
        alpha = loaded.alpha
        if alpha is not None and alpha.shape[:2] != res.image.shape[:2]:
            alpha = bicubic_background(np.repeat(alpha[..., None], 3, axis=2), res.image.shape[:2])[..., 0]
        return RestoreResult(
            image=res.image,
            stage1=res.background if res.background is not None else res.image,
            alpha=alpha,
            seed=seed,
            params=params,
            notices=res.notices,
            timings=res.timings,
            extra={"face_mode": res.mode, "faces": res.faces, "face_backend": res.backend},
        )

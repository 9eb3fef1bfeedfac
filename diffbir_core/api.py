"""The one dispatcher: ``restore(image, params, *, pipe) -> RestoreResult`` for every front end.

The CLI, the demo, eval and notebooks call this; it picks the layer by ``params.task``: "face" goes to
`face.pipeline.FacePipeline` (above the general pipeline), "sr" / "denoise" to `pipeline.DiffBIRPipeline`.
Build the pipelines once with `make_pipeline` (a `FacePipeline` wrapping a `DiffBIRPipeline`) and pass it as
``pipe`` so models and the face detector stay cached; a bare `DiffBIRPipeline` works too (face requests then
build a `FacePipeline` per call, reloading the detector).

Mirrors: the task dispatch of official HEAD inference.py (``--task sr | face | denoise`` -> the matching
diffbir/inference/*_loop.py).
One-line use: ``restorer = from_pretrained("v2.1"); out = restorer(image, steps=20)`` (a `Restorer`: the preset, a
`FacePipeline`, weights checked up front; returns a PIL image). Every input kind of `imageio.as_loaded_image` works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .config import RestoreParams
from .face.pipeline import FacePipeline
from .imageio import LoadedImage, as_loaded_image, to_pil
from .pipeline import DiffBIRPipeline
from .preset_weights import check_weights
from .prompts import assemble_prompt
from .speed import auto_device
from .tiling.plan import TilingPlan
from .types import RestoreResult

__all__ = ["restore", "make_pipeline", "Restorer", "from_pretrained"]


def make_pipeline(**kw: Any) -> FacePipeline:
    """A `FacePipeline` around ``DiffBIRPipeline(**kw)`` (weights_dir, device, cleaners, ldm, speed)."""
    return FacePipeline(DiffBIRPipeline(**kw))


def restore(
    image: LoadedImage | np.ndarray | Any,
    params: RestoreParams,
    *,
    pipe: DiffBIRPipeline | FacePipeline,
    callback: Callable | None = None,
    noise=None,
    keep: dict | None = None,
    plan: TilingPlan | None = None,
    captioner: Callable[[np.ndarray], str] | None = None,
) -> RestoreResult:
    """Restore one image with the layer ``params.task`` needs. ``callback`` gets every stage-2 step
    (`stage2.Stage2Step`); ``noise`` / ``keep`` / ``plan`` are the general path's (`DiffBIRPipeline.restore`)
    and are refused for whole-photo face mode, which runs stage 2 once per face and once for the background.
    ``captioner`` (`captioner.make_captioner`): its caption of the raw input is put before the positive prompt
    (`prompts.assemble_prompt`, HEAD loop.py:165-169); ``extra["caption"]`` / ``extra["pos_prompt"]`` report it."""
    caption = None
    if captioner is not None:  # HEAD loop.py:165-169: caption the raw LQ image, then "caption, pos_prompt"
        rgb = image.rgb if isinstance(image, LoadedImage) else np.asarray(image, np.float32)
        caption = captioner(rgb)
        if caption:
            params = params.replace(pos_prompt=assemble_prompt(caption, params.pos_prompt))
    res = _dispatch(image, params, pipe, callback, noise, keep, plan)
    if captioner is not None:
        res.extra.update(caption=caption, pos_prompt=params.pos_prompt)
    return res


def _dispatch(image, params: RestoreParams, pipe, callback, noise, keep, plan) -> RestoreResult:
    face = pipe if isinstance(pipe, FacePipeline) else None
    general = face.pipe if face is not None else pipe
    if not isinstance(general, DiffBIRPipeline):
        raise TypeError(f"pipe must be a DiffBIRPipeline or a FacePipeline, got {type(pipe).__name__}")
    image = as_loaded_image(image)  # path, PIL, numpy uint8/uint16/float, torch -> RGB float [0, 1]
    if params.task == "face":  # noise / keep / plan: aligned faces only (one stage-2 run), FacePipeline checks
        return (face or FacePipeline(general)).restore(
            image, params, callback=callback, noise=noise, keep=keep, plan=plan
        )
    return general.restore(image, params, callback=callback, noise=noise, keep=keep, plan=plan)


class Restorer:
    """A preset bound to cached models: ``restorer(image, **overrides) -> PIL.Image`` (RGBA when the input had alpha).

    ``overrides`` are the flat names of `config.FLAT_NAMES` (the CLI flags with underscores: ``steps``, ``cfg_scale``,
    ``task``, ``seed``, ``aligned`` ...) applied on top of the preset by `RestoreParams.from_flat`; every call goes
    through `restore`, so ``task="face"`` works. `restore_result` returns the full `RestoreResult` instead."""

    def __init__(
        self, preset: str = "v2.1", *, device: str = "auto", weights_dir=None, check: bool = True, **pipeline_kw: Any
    ) -> None:
        self.preset = preset
        self.device = auto_device(device)
        self.params = RestoreParams.from_flat({"preset": preset, "device": self.device})
        if check:
            check_weights(self.params, weights_dir=weights_dir)  # ONE error naming every missing file
        self.pipe = make_pipeline(weights_dir=weights_dir, device=self.device, **pipeline_kw)

    def with_overrides(self, **overrides: Any) -> RestoreParams:
        return RestoreParams.from_flat({"preset": self.preset, "device": self.device, **overrides})

    def restore_result(self, image: Any, *, callback: Callable | None = None, **overrides: Any) -> RestoreResult:
        return restore(image, self.with_overrides(**overrides), pipe=self.pipe, callback=callback)

    def __call__(self, image: Any, **overrides: Any):
        res = self.restore_result(image, **overrides)
        return to_pil(res.image, res.alpha)

    def __repr__(self) -> str:
        return f"Restorer(preset={self.preset!r}, device={self.device!r})"


def from_pretrained(preset: str = "v2.1", *, device: str = "auto", weights_dir=None, **kw: Any) -> Restorer:
    """``diffbir_core.from_pretrained("v2.1")(image)`` -> restored PIL image; see `Restorer`."""
    return Restorer(preset, device=device, weights_dir=weights_dir, **kw)

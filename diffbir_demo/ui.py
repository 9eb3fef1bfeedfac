"""The Gradio layout of the demo: General and Face tabs, built by `build_blocks(backend)`; `launch_demo` serves it.

The controls are those of the official demos (XPixelGroup/DiffBIR ``gradio_diffbir.py`` for v1,
``run_gradio.py`` for v2.1: upscale, steps, sampler, CFG + prompts, control strength, seed, tiled stages),
with the guidance window of v1/v2 and the face modes of ``inference_face.py`` (aligned crops or whole
photos). Everything else - parameters, weights status, checks, the run - is `diffbir_demo.backend`; this module
only turns its `DemoError` / `SKIP` / notices into ``gr.Error`` / ``gr.skip()`` / ``gr.Info`` (messages as
HTML), shows or hides the panes that apply to the chosen preset, turns Restore off when its weights are
missing, and puts the handlers under ``@spaces.GPU`` when the ``spaces`` package is installed (`zerogpu`).
"""

from __future__ import annotations

import html
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from diffbir_core.cleaners import CLEANERS
from diffbir_core.config import COLOR_FIXES, PRESETS, SAMPLERS

from .backend import BACKGROUNDS, DEFAULT_CLEANER, FACE_BACKENDS, FACE_MODES, SKIP, TILING, DemoBackend, DemoError, mpx

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


def message_html(text: str) -> str:
    """A message (Markdown-ish: ``**bold**``, backticks, blank lines) as the HTML gradio's toasts render."""
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return out.replace("\n", "<br>")


def _notify(level: str, text: str) -> None:
    (gr.Warning if level == "warning" else gr.Info)(message_html(text))


def _stream(updates: Iterator[tuple]) -> Iterator[tuple]:
    """`DemoBackend.run` -> gradio: `SKIP` -> ``gr.skip()``, `DemoError` -> ``gr.Error`` (a message, no traceback)."""
    try:
        for out in updates:
            yield tuple(gr.skip() if o is SKIP else o for o in out)
    except DemoError as e:
        raise gr.Error(message_html(str(e)), duration=None if e.sticky else 10, print_exception=False) from None


def zerogpu(fn: Callable, duration: Callable) -> Callable:
    """``fn`` under ``@spaces.GPU(duration=duration)`` when the ``spaces`` package is installed (Hugging Face
    ZeroGPU: a GPU is attached for the call only, for at most ``duration(*args)`` seconds; outside ZeroGPU the
    decorator returns ``fn`` itself), else ``fn`` unchanged."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)


def _tab(backend: DemoBackend, tab: str, default_preset: str, cache_examples: bool = False) -> None:
    """Controls, outputs and events of one tab ("general" or "face")."""
    presets = GENERAL_PRESETS if tab == "general" else FACE_PRESETS
    preset0 = default_preset if default_preset in presets else "offline"
    d = backend.preset_defaults(tab, preset0)
    ok0, status0 = backend.availability(tab, preset0)
    diffusion0 = PRESETS[preset0].uses_diffusion
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(
                label="Low-quality input" if tab == "general" else "Face image",
                type="filepath",
                sources=["upload", "clipboard"],
                height=320,
                elem_id=f"{tab}-input",
            )
            c["preset"] = gr.Dropdown(
                [(PRESET_LABELS[p], p) for p in presets], value=preset0, label="Preset / model", elem_id=f"{tab}-preset"
            )
            if tab == "general":
                c["task"] = gr.Radio(
                    [("Super-resolution / general", "sr"), ("Denoise", "denoise")], value="sr", label="Task"
                )
            else:
                c["face_mode"] = gr.Radio(list(FACE_MODES), value="auto", label="Input kind")
            c["upscale"] = gr.Slider(
                1,
                8 if tab == "general" else 4,
                value=d["upscale"],
                step=0.5,
                label="Upscale",
                info="output size = input size x upscale",
            )
            with gr.Row():
                run = gr.Button("Restore", variant="primary", elem_id=f"{tab}-run", interactive=ok0)
                stop = gr.Button("Stop", variant="stop")
            status = gr.Markdown(status0, elem_id=f"{tab}-status")
            with gr.Accordion("Diffusion (stage 2)", open=False, visible=diffusion0) as diffusion_box:
                c["steps"] = gr.Slider(1, 100, value=d["steps"], step=1, label="Steps")
                c["sampler"] = gr.Dropdown(list(SAMPLERS), value=d["sampler"], label="Sampler")
                c["cfg_scale"] = gr.Slider(
                    0,
                    15,
                    value=d["cfg_scale"],
                    step=0.5,
                    label="CFG scale",
                    info="classifier-free guidance; 1 = off (one model call per step)",
                )
                c["pos_prompt"] = gr.Textbox(value=d["pos_prompt"], label="Positive prompt", lines=1)
                c["neg_prompt"] = gr.Textbox(value=d["neg_prompt"], label="Negative prompt", lines=2)
                c["strength"] = gr.Slider(0, 2, value=d["strength"], step=0.05, label="Control strength")
                c["guidance_scale"] = gr.Slider(
                    0,
                    d["guidance_max"],
                    value=d["guidance_scale"],
                    step=d["guidance_step"],
                    label="Latent image guidance scale s",
                    info="0 = off; higher = closer to the stage-1 image (fidelity)",
                )
                with gr.Row():
                    c["guidance_start"] = gr.Slider(
                        0,
                        1001,
                        value=d["guidance_start"],
                        step=1,
                        label="Guidance window: start t",
                        info="guidance runs while stop < t+1 < start",
                    )
                    c["guidance_stop"] = gr.Slider(
                        -1, 1000, value=d["guidance_stop"], step=1, label="Guidance window: stop t"
                    )
                c["color_fix"] = gr.Radio(list(COLOR_FIXES), value=d["color_fix"], label="Colour fix")
            with gr.Accordion("Seed, cleaner, tiling, previews", open=False):
                with gr.Row():
                    c["seed"] = gr.Number(value=231, precision=0, label="Seed")
                    c["random_seed"] = gr.Checkbox(value=False, label="Random seed")
                c["cleaner"] = gr.Dropdown([DEFAULT_CLEANER, *CLEANERS], value=DEFAULT_CLEANER, label="Stage-1 cleaner")
                c["tiling"] = gr.Radio(
                    list(TILING),
                    value="auto",
                    label="Tiling",
                    info="auto: tile when the image does not fit the memory budget",
                )
                c["tile_size"] = gr.Slider(128, 1024, value=512, step=64, label="Cleaner tile size (pixels)")
                c["previews"] = gr.Checkbox(
                    value=True,
                    label="Live previews",
                    visible=diffusion0,
                    info=f"decode the predicted clean image every "
                    f"{backend.limits.preview_every} steps (costs a VAE decode)",
                )
            if tab == "face":
                with gr.Accordion("Face options", open=False):
                    c["only_center_face"] = gr.Checkbox(value=False, label="Only the centre face")
                    c["max_faces"] = gr.Slider(1, 50, value=20, step=1, label="Max faces")
                    c["face_backend"] = gr.Radio(list(FACE_BACKENDS), value="auto", label="Face detector")
                    c["background"] = gr.Radio(
                        list(BACKGROUNDS),
                        value="general",
                        label="Background of whole photos",
                        info="general = the preset's general path",
                    )
        with gr.Column(scale=1):
            preview = gr.Image(
                label="Live preview (predicted clean image)", interactive=False, height=220, visible=diffusion0
            )
            compare = gr.ImageSlider(label="Before / after", type="filepath", format="png", interactive=False)
            with gr.Row():
                result = gr.Image(label="Restored (PNG)", type="filepath", format="png", interactive=False)
                stage1 = gr.Image(
                    label="Stage 1 (cleaner)" if tab == "general" else "Stage 1 / background",
                    type="filepath",
                    format="png",
                    interactive=False,
                    visible=diffusion0,
                )
            download = gr.File(label="Download PNG", interactive=False)
            info = gr.Markdown(label="Run info")
    if tab == "general":
        ex = [[str(SAMPLES_DIR / f)] for f in GENERAL_EXAMPLES if (SAMPLES_DIR / f).is_file()]
        ex_inputs = [image]
    else:
        ex = [[str(SAMPLES_DIR / f), m] for f, m in FACE_EXAMPLES if (SAMPLES_DIR / f).is_file()]
        ex_inputs = [image, c["face_mode"]]
    names = list(c)
    inputs = [image] + [c[n] for n in names]
    outputs = [preview, result, stage1, compare, download, info]
    fn = _make_handler(backend, tab, names)
    if ex and cache_examples:  # results of the opening preset, computed on first click and kept (GPU hosts)
        gr.Examples(
            ex,
            inputs=ex_inputs,
            outputs=outputs,
            fn=_example_fn(backend, tab, preset0),
            cache_examples=True,
            cache_mode="lazy",
            label="Examples (click one: result of the preset above)",
        )
    elif ex:
        gr.Examples(ex, inputs=ex_inputs, label="Examples (click one, then Restore)")
    # preprocess=False: the handler gets the raw values (the upload as {"path", "orig_name", ...}) and checks
    # every one itself; gr.Image would otherwise open the upload with PIL first and fail on a corrupt
    # file with gradio's generic message instead of ours.
    ev = run.click(
        fn,
        inputs=inputs,
        outputs=outputs,
        api_name=f"restore_{tab}",
        concurrency_id="restore",
        concurrency_limit=backend.limits.concurrency,
        preprocess=False,
        show_progress_on=[result],
    )
    stop.click(None, cancels=[ev], api_visibility="private")

    # preset -> its defaults; preset / task / cleaner -> the weights status
    dkeys = (
        "upscale",
        "steps",
        "sampler",
        "cfg_scale",
        "pos_prompt",
        "neg_prompt",
        "strength",
        "guidance_scale",
        "guidance_start",
        "guidance_stop",
        "color_fix",
    )

    def on_status(preset, task_or_mode, cleaner):
        """Status text, Restore on/off (missing weights) and the panes that apply to the preset."""
        if tab == "general":
            ok, text = backend.availability(tab, preset, task_or_mode, cleaner)
        else:
            ok, text = backend.availability(tab, preset, "sr", cleaner, face_mode=task_or_mode)
        diffusion = preset in PRESETS and PRESETS[preset].uses_diffusion
        return [text, gr.update(interactive=ok), *(gr.update(visible=diffusion) for _ in panes)]

    def on_preset(preset, task_or_mode, cleaner):
        dd = backend.preset_defaults(tab, preset)
        ups = [gr.update(value=dd[k]) for k in dkeys]
        ups[dkeys.index("guidance_scale")] = gr.update(
            value=dd["guidance_scale"], maximum=dd["guidance_max"], step=dd["guidance_step"]
        )
        return [*ups, *on_status(preset, task_or_mode, cleaner)]

    panes = [diffusion_box, c["previews"], preview, stage1]  # shown only for presets with a diffusion stage
    kind = c["task"] if tab == "general" else c["face_mode"]
    status_outs = [status, run, *panes]
    c["preset"].change(
        on_preset,
        [c["preset"], kind, c["cleaner"]],
        [c[k] for k in dkeys] + status_outs,
        queue=False,
        show_progress="hidden",
        api_visibility="private",
    )
    for comp in (kind, c["cleaner"]):
        comp.change(
            on_status,
            [c["preset"], kind, c["cleaner"]],
            status_outs,
            queue=False,
            show_progress="hidden",
            api_visibility="private",
        )


def _make_handler(backend: DemoBackend, tab: str, names: list[str]):
    """A generator function with named parameters (they name the API: /restore_general, /restore_face)."""
    if tab == "general":

        def restore_general(
            image,
            preset,
            task,
            upscale,
            steps,
            sampler,
            cfg_scale,
            pos_prompt,
            neg_prompt,
            strength,
            guidance_scale,
            guidance_start,
            guidance_stop,
            color_fix,
            seed,
            random_seed,
            cleaner,
            tiling,
            tile_size,
            previews,
            progress=gr.Progress(),
        ):
            values = dict(
                preset=preset,
                task=task,
                upscale=upscale,
                steps=steps,
                sampler=sampler,
                cfg_scale=cfg_scale,
                pos_prompt=pos_prompt,
                neg_prompt=neg_prompt,
                strength=strength,
                guidance_scale=guidance_scale,
                guidance_start=guidance_start,
                guidance_stop=guidance_stop,
                color_fix=color_fix,
                seed=seed,
                random_seed=random_seed,
                cleaner=cleaner,
                tiling=tiling,
                tile_size=tile_size,
                previews=previews,
            )
            yield from _stream(backend.run("general", image, values, progress, _notify))

        fn = restore_general
    else:

        def restore_face(
            image,
            preset,
            face_mode,
            upscale,
            steps,
            sampler,
            cfg_scale,
            pos_prompt,
            neg_prompt,
            strength,
            guidance_scale,
            guidance_start,
            guidance_stop,
            color_fix,
            seed,
            random_seed,
            cleaner,
            tiling,
            tile_size,
            previews,
            only_center_face,
            max_faces,
            face_backend,
            background,
            progress=gr.Progress(),
        ):
            values = dict(
                preset=preset,
                face_mode=face_mode,
                upscale=upscale,
                steps=steps,
                sampler=sampler,
                cfg_scale=cfg_scale,
                pos_prompt=pos_prompt,
                neg_prompt=neg_prompt,
                strength=strength,
                guidance_scale=guidance_scale,
                guidance_start=guidance_start,
                guidance_stop=guidance_stop,
                color_fix=color_fix,
                seed=seed,
                random_seed=random_seed,
                cleaner=cleaner,
                tiling=tiling,
                tile_size=tile_size,
                previews=previews,
                only_center_face=only_center_face,
                max_faces=max_faces,
                face_backend=face_backend,
                background=background,
            )
            yield from _stream(backend.run("face", image, values, progress, _notify))

        fn = restore_face
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters if p not in ("image", "progress")]
    if params != names:  # the components and the signature must agree, in order
        raise RuntimeError(f"demo handler for {tab!r} takes {params} but the tab has controls {names}")

    def duration(*args, **kwargs) -> int:
        """The GPU seconds of this request (same arguments as the handler; see `DemoBackend.gpu_seconds`)."""
        bound = sig.bind_partial(*args, **kwargs).arguments
        return backend.gpu_seconds(tab, bound.get("image"), {k: bound.get(k) for k in names})

    # the whole run (stage 1, sampling, decoding) happens inside the decorated call
    return zerogpu(fn, duration)


def _example_fn(backend: DemoBackend, tab: str, preset: str):
    """What a cached example runs: the example's inputs with the opening preset's defaults; returns the final
    outputs (previews are not cached)."""
    d = backend.preset_defaults(tab, preset)
    base = dict(
        preset=preset,
        task="sr",
        upscale=d["upscale"],
        steps=d["steps"],
        sampler=d["sampler"],
        cfg_scale=d["cfg_scale"],
        pos_prompt=d["pos_prompt"],
        neg_prompt=d["neg_prompt"],
        strength=d["strength"],
        guidance_scale=d["guidance_scale"],
        guidance_start=d["guidance_start"],
        guidance_stop=d["guidance_stop"],
        color_fix=d["color_fix"],
        seed=231,
        random_seed=False,
        cleaner=DEFAULT_CLEANER,
        tiling="auto",
        tile_size=512,
        previews=False,
    )

    def run_example(image, face_mode="auto"):
        values = dict(base, face_mode=face_mode) if tab == "face" else base
        last: tuple = ()
        try:
            for out in backend.run(tab, image, values):
                last = out
        except DemoError as e:
            raise gr.Error(message_html(str(e)), print_exception=False) from None
        return tuple(None if o is SKIP else o for o in last)

    def duration(image, face_mode="auto") -> int:
        return backend.gpu_seconds(tab, image, dict(base, face_mode=face_mode) if tab == "face" else base)

    return zerogpu(run_example, duration)


def build_blocks(backend: DemoBackend, *, default_preset: str = "offline", cache_examples: bool = False) -> gr.Blocks:
    """The queued Gradio app (not launched) of both tabs, served by ``backend``; ``cache_examples``: run an
    example with the opening preset on its first click and keep the result (gradio's lazy caching)."""
    with gr.Blocks(title="DiffBIR demo", analytics_enabled=False) as demo:
        gr.Markdown(_HEADER)
        with gr.Tabs():
            with gr.Tab("General", id="general"):
                _tab(backend, "general", default_preset, cache_examples)
            with gr.Tab("Face", id="face"):
                _tab(backend, "face", default_preset, cache_examples)
        gr.Markdown(
            f"Limits on this host (`{backend.device}`): input up to {mpx(backend.limits.max_input_pixels)}, "
            f"output up to {mpx(backend.limits.max_output_pixels)}, uploads up to "
            f"{backend.limits.max_file_mb:g} MB; {backend.limits.concurrency} restore(s) at a time, "
            "others wait in the queue."
        )
    demo.queue(max_size=backend.limits.queue_size, default_concurrency_limit=backend.limits.concurrency)
    demo.diffbir_backend = backend  # for launch_demo (upload size limit) and tests
    return demo


def launch_demo(
    demo,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
):
    """Serve ``demo`` with the upload size limit of its `DemoLimits` and error messages (never tracebacks)."""
    backend: DemoBackend = demo.diffbir_backend
    return demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        show_error=True,
        ssr_mode=False,
        max_file_size=int(backend.limits.max_file_mb * 1024 * 1024),
        allowed_paths=[str(SAMPLES_DIR)],
    )

"""The Gradio demo (`diffbir_demo/app.py`) driven over HTTP with `gradio_client`, as a user's browser would.

Known answers: the image a request returns equals `DiffBIRPipeline.restore` on the same input and
settings (offline preset with the real offline cleaner; tiny random ControlLDM / SwinIR injected through
`build_demo`), as a PNG of the requested size; previews are streamed during sampling; bad uploads
(corrupt, empty, huge, 1x1, too large an output, missing weights) come back as messages and the app
keeps serving; RGBA keeps its alpha. Servers listen on 127.0.0.1 on a free port and are always closed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffbir_core.config import OFFICIAL_NEGATIVE_PROMPT, RestoreParams
from diffbir_core.imageio import read_image
from diffbir_core.pipeline import DiffBIRPipeline
from diffbir_demo.app import build_demo
from diffbir_demo.backend import OUTPUTS, DemoBackend, DemoError, DemoLimits, params_from_ui
from diffbir_demo.ui import launch_demo

ROOT = Path(__file__).resolve().parents[1]

LIMITS = DemoLimits(max_input_pixels=128 * 128, max_output_pixels=512 * 512, min_side=8, preview_every=2, max_file_mb=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(**kw):
    from gradio_client import Client

    demo = build_demo(device="cpu", **kw)
    port = _free_port()
    launch_demo(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def _png(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def _smooth_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A small natural-ish test image (smooth colour ramps + a little noise), uint8 HxWx3."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.5 + 0.4 * np.sin(6 * x), 0.5 + 0.4 * np.cos(5 * y), 0.5 + 0.3 * np.sin(4 * (x + y))], -1)
    return (np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1) * 255).round().astype(np.uint8)


def _u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255.0).round().astype(np.uint8)


def _outputs(result) -> dict:
    assert len(result) == len(OUTPUTS)
    return dict(zip(OUTPUTS, result, strict=True))


def _assert_png(path, size_wh: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG", f"{path} is {im.format}, expected a lossless PNG"
        assert im.size == size_wh
        return np.asarray(im)


@pytest.fixture(scope="module")
def offline_cleaner():
    from diffbir_core.cleaners import load_cleaner

    torch.set_num_threads(2)
    return load_cleaner("offline")


@pytest.fixture(scope="module")
def tiny_models():
    """A random tiny ControlLDM (eps, SD-2.1 layout) and a random tiny SwinIR face cleaner."""
    from diffbir_core.cleaners import CLEANERS, Cleaner
    from diffbir_core.models.ldm import Stage2Config, TextConfig, UNetConfig, VAEConfig, build_control_ldm
    from diffbir_core.models.swinir import SwinIR, SwinIRConfig

    torch.manual_seed(0)
    cfg = Stage2Config(
        unet=UNetConfig(
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(1,),
            num_head_channels=16,
            context_dim=32,
        ),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
        text=TextConfig(width=32, heads=2, layers=2, vocab_size=49408, layer="penultimate"),
    )
    ldm = build_control_ldm(cfg)
    scfg = SwinIRConfig(
        img_size=64,
        patch_size=1,
        in_chans=3,
        embed_dim=24,
        depths=(2, 2),
        num_heads=(2, 2),
        window_size=8,
        mlp_ratio=2,
        sf=8,
        img_range=1.0,
        upsampler="nearest+conv",
        resi_connection="1conv",
        unshuffle=True,
        unshuffle_scale=8,
    )
    face = Cleaner(CLEANERS["swinir_face"], SwinIR(scfg).eval().requires_grad_(False))
    return ldm, face


@pytest.fixture(scope="module")
def offline_app(offline_cleaner):
    with serve(cleaners={"offline": offline_cleaner}, limits=LIMITS) as (demo, client):
        yield demo, client


# ---------------------------------------------------------------------------------------------------
# no server


def test_import_does_nothing():
    code = "import sys, diffbir_demo.app; assert not {'gradio', 'torch'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
    code = (
        "import sys, diffbir_demo.backend; assert 'gradio' not in sys.modules, 'diffbir_demo.backend imported gradio'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_params_from_ui_maps_every_control():
    common = dict(
        upscale=2,
        steps=7,
        sampler="ddim",
        cfg_scale=3.5,
        pos_prompt="a cat",
        neg_prompt="blur",
        strength=0.8,
        guidance_scale=0.25,
        guidance_start=600,
        guidance_stop=100,
        color_fix="adain",
        seed=5,
        random_seed=False,
        cleaner="bicubic",
        tiling="on",
        tile_size=256,
        previews=True,
    )
    p = params_from_ui("general", dict(common, preset="v2", task="denoise"), device="cpu")
    assert (p.preset, p.task, p.upscale, p.steps, p.sampler, p.cfg_scale) == ("v2", "denoise", 2.0, 7, "ddim", 3.5)
    assert (p.pos_prompt, p.neg_prompt, p.strength, p.color_fix, p.seed, p.cleaner) == (
        "a cat",
        "blur",
        0.8,
        "adain",
        5,
        "bicubic",
    )
    assert (p.guidance.scale, p.guidance.t_start, p.guidance.t_stop) == (0.25, 600, 100)
    assert p.guidance.space == "rgb" and p.guidance.loss == "wmse"  # the rest of the v2 preset is kept
    assert (p.tiles.enabled, p.tiles.cleaner_tile) == (True, 256)
    face = params_from_ui(
        "face",
        dict(
            common,
            preset="v2.1",
            face_mode="whole",
            random_seed=True,
            only_center_face=True,
            max_faces=3,
            face_backend="dlib",
            background="bicubic",
            tiling="off",
        ),
        device="cpu",
    )
    assert (face.task, face.seed, face.tiles.enabled) == ("face", None, False)
    assert (
        face.face.aligned,
        face.face.only_center_face,
        face.face.max_faces,
        face.face.backend,
        face.face.background,
    ) == (False, True, 3, "dlib", "bicubic")
    off = params_from_ui("general", dict(common, preset="offline", task="sr"), device="cpu")
    assert off.stage2 is None and off.steps == RestoreParams.from_preset("offline").steps  # stage-2 values unused


def test_params_from_ui_rejects_bad_values():
    good = dict(
        preset="v2",
        task="sr",
        upscale=2,
        steps=4,
        sampler="spaced",
        cfg_scale=4,
        pos_prompt="",
        neg_prompt="",
        strength=1,
        guidance_scale=0,
        guidance_start=1001,
        guidance_stop=-1,
        color_fix="wavelet",
        seed=1,
        random_seed=False,
        cleaner="(preset default)",
        tiling="auto",
        tile_size=512,
        previews=False,
    )
    for bad, words in [
        (dict(sampler="nope"), "unknown sampler 'nope'"),
        (dict(preset="v9"), "Preset"),
        (dict(steps=""), "Steps must be a number"),
        (dict(upscale=40), "Upscale must be in"),
        (dict(cfg_scale="x"), "CFG scale must be a number"),
        (dict(steps=2.5), "whole number"),
    ]:
        with pytest.raises(DemoError, match=words):
            params_from_ui("general", {**good, **bad}, device="cpu")
    # RestoreParams.from_flat semantics: None = the preset's value
    none = params_from_ui("general", {**good, "steps": None}, device="cpu")
    assert none.steps == RestoreParams.from_preset("v2").steps


def test_status_explains_missing_weights(tmp_path, monkeypatch, offline_cleaner):
    monkeypatch.delenv("DIFFBIR_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # no cached weights
    b = DemoBackend(device="cpu", weights_dir=tmp_path, limits=LIMITS)
    text = b.status_markdown("general", "v2")
    assert "Missing weights" in text and "`BSRNet.pth`" in text and "`v2.pth`" in text
    assert "**offline** preset: it works without any download" in text
    assert str(tmp_path) not in text and "--weights-dir" not in text  # written for visitors: no paths, no flags
    ok, _ = b.availability("general", "v2")
    assert not ok and set(b.missing_weights("general", "v2")) == {"bsrnet", "sd_v2.1", "v2"}
    assert b.availability("general", "offline")[0] and b.missing_weights("general", "offline") == []
    assert "Missing" not in b.status_markdown("general", "offline")
    injected = DemoBackend(
        device="cpu", weights_dir=tmp_path, limits=LIMITS, ldm=object(), cleaners={"bsrnet": offline_cleaner}
    )
    assert "Missing" not in injected.status_markdown("general", "v2")
    assert "injected model" in injected.status_markdown("general", "v2")
    # Face tab: an aligned crop needs no background cleaner; a whole photo needs the preset's general one
    face_only = DemoBackend(
        device="cpu", weights_dir=tmp_path, limits=LIMITS, ldm=object(), cleaners={"swinir_face": offline_cleaner}
    )
    assert face_only.availability("face", "v2", face_mode="aligned")[0]
    assert face_only.missing_weights("face", "v2", face_mode="whole") == ["bsrnet"]


# ---------------------------------------------------------------------------------------------------
# over HTTP


def test_offline_general_returns_the_pipeline_result(offline_app, offline_cleaner, tmp_path):
    _, client = offline_app
    from gradio_client import handle_file

    src = _png(tmp_path / "small.png", _smooth_rgb(32, 24))
    out = _outputs(client.predict(handle_file(str(src)), preset="offline", upscale=2, api_name="/restore_general"))
    got = _assert_png(out["result"], (48, 64))
    ref = DiffBIRPipeline(cleaners={"offline": offline_cleaner}).restore(
        read_image(src), RestoreParams.from_preset("offline", upscale=2.0)
    )
    assert np.abs(got.astype(int) - _u8(ref.image).astype(int)).max() <= 1
    assert got.std() > 10  # a real image, not a blank
    np.testing.assert_array_equal(_assert_png(out["download"], (48, 64)), got)
    np.testing.assert_array_equal(_assert_png(out["stage1"], (48, 64)), got)  # no stage 2: stage 1 is the result
    before, after = out["compare"]
    np.testing.assert_array_equal(_assert_png(after, (48, 64)), got)
    _assert_png(before, (48, 64))
    assert "seed 231" in out["info"] and "24x32 -> 48x64" in out["info"]


def test_bad_uploads_give_messages_and_the_app_keeps_serving(offline_app, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, client = offline_app
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not really a png" * 10)
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    huge = _png(tmp_path / "huge.png", np.zeros((600, 500, 3), np.uint8))  # 0.3 Mpx > this app's 128x128 limit
    tiny = _png(tmp_path / "one.png", np.full((1, 1, 3), 200, np.uint8))
    ok = _png(tmp_path / "ok.png", _smooth_rgb(72, 72))
    cases = [
        (corrupt, {}, "Could not read the upload"),
        (text, {}, "Could not read the upload"),
        (huge, {}, "accepts at most"),
        (tiny, {}, "too small"),
        (ok, dict(upscale=8), "lower the upscale to at most"),  # 576x576 output > 512x512 limit
        (ok, dict(upscale=""), "Upscale must be a number"),
    ]
    for path, extra, words in cases:
        with pytest.raises(AppError, match=words) as e:
            client.predict(
                handle_file(str(path)), **{**dict(preset="offline", upscale=2), **extra}, api_name="/restore_general"
            )
        assert "Traceback" not in str(e.value)
    with pytest.raises(AppError, match="Upload an image first"):
        client.predict(None, preset="offline", api_name="/restore_general")
    # RGBA: served, alpha kept; proves the app still works after the errors
    rgba = np.dstack([_smooth_rgb(16, 16, seed=3), np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))])
    src = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(src)
    out = _outputs(client.predict(handle_file(str(src)), preset="offline", upscale=2, api_name="/restore_general"))
    with Image.open(out["result"]) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGBA", (32, 32))
        alpha = np.asarray(im)[..., 3].astype(int)
    assert alpha[:, 0].mean() < 30 and alpha[:, -1].mean() > 225  # the transparency ramp survived


def test_upload_size_limit(offline_app, tmp_path):
    from gradio_client import handle_file

    _, client = offline_app
    big = tmp_path / "big.png"  # 2 MB limit in LIMITS: incompressible noise, 1000x1000 RGB ~ 3 MB
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)).save(big)
    with pytest.raises(Exception, match="(?i)size|large|exceed"):
        client.predict(handle_file(str(big)), preset="offline", api_name="/restore_general")


def test_missing_weights_message(offline_cleaner, tmp_path, monkeypatch):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    monkeypatch.delenv("DIFFBIR_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # no cached weights
    src = _png(tmp_path / "in.png", _smooth_rgb(16, 16))
    with serve(cleaners={"offline": offline_cleaner}, weights_dir=tmp_path, limits=LIMITS) as (_, client):
        words = (
            r"The v2 preset cannot run here: its model files are missing \(BSRNet\.pth, .*v2\.pth\)\. "
            r"Choose the offline preset"
        )
        with pytest.raises(AppError, match=words) as e:
            client.predict(handle_file(str(src)), preset="v2", upscale=1, api_name="/restore_general")
        assert "Traceback" not in str(e.value) and str(tmp_path) not in str(e.value)
        out = _outputs(client.predict(handle_file(str(src)), preset="offline", upscale=1, api_name="/restore_general"))
        _assert_png(out["result"], (16, 16))


@pytest.mark.slow
def test_tiny_diffusion_general_streams_previews(tiny_models, tmp_path):
    """v2 preset with a random tiny ControlLDM injected, CFG 4, 2 DDPM steps, bicubic stage 1."""
    from gradio_client import handle_file

    ldm, _ = tiny_models
    src = _png(tmp_path / "lq.png", _smooth_rgb(24, 32, seed=1))
    with serve(ldm=ldm, limits=LIMITS) as (_, client):
        # an API call sends every control: the stage-2 ones default to the page's initial (offline) values
        job = client.submit(
            handle_file(str(src)),
            preset="v2",
            cleaner="bicubic",
            upscale=2,
            steps=2,
            sampler="spaced",
            cfg_scale=4.0,
            neg_prompt=OFFICIAL_NEGATIVE_PROMPT,
            seed=7,
            previews=True,
            api_name="/restore_general",
        )
        final = _outputs(job.result(timeout=600))
        streamed = [dict(zip(OUTPUTS, o, strict=True)) for o in job.outputs()]
    previews = [o["preview"] for o in streamed if isinstance(o["preview"], str)]
    assert previews, "no live preview was streamed during sampling"
    with Image.open(previews[-1]) as im:
        assert max(im.size) == 512 and abs(im.size[0] / im.size[1] - 64 / 48) < 0.01  # the image, no padding
    got = _assert_png(final["result"], (64, 48))
    params = RestoreParams.from_preset(
        "v2", cleaner="bicubic", upscale=2.0, steps=2, sampler="spaced", cfg_scale=4.0, seed=7
    )
    ref = DiffBIRPipeline(ldm=ldm).restore(read_image(src), params)
    assert np.abs(got.astype(int) - _u8(ref.image).astype(int)).max() <= 1
    stage1 = _assert_png(final["stage1"], (64, 48))
    assert np.abs(stage1.astype(int) - _u8(ref.stage1).astype(int)).max() <= 1
    assert "seed 7" in final["info"]


@pytest.mark.slow
def test_tiny_face_tab_aligned(tiny_models, tmp_path):
    """Face tab, aligned crop: tiny random face SwinIR + tiny ControlLDM injected, v2 preset, 2 steps."""
    from gradio_client import handle_file

    ldm, face = tiny_models
    src = _png(tmp_path / "face.png", _smooth_rgb(64, 64, seed=2))
    with serve(ldm=ldm, cleaners={"swinir_face": face}, limits=LIMITS) as (_, client):
        out = _outputs(
            client.predict(
                handle_file(str(src)),
                preset="v2",
                face_mode="aligned",
                upscale=1,
                steps=2,
                cfg_scale=1.0,
                seed=3,
                previews=False,
                api_name="/restore_face",
            )
        )
    got = _assert_png(out["result"], (64, 64))
    params = RestoreParams.from_preset(
        "v2", task="face", upscale=1.0, steps=2, cfg_scale=1.0, seed=3, face__aligned=True
    )
    from diffbir_core import api

    ref = api.restore(read_image(src), params, pipe=api.make_pipeline(ldm=ldm, cleaners={"swinir_face": face}))
    assert np.abs(got.astype(int) - _u8(ref.image).astype(int)).max() <= 1
    assert "Faces restored: 1 (aligned" in out["info"]


@pytest.mark.slow
def test_face_tab_whole_photo_example(tiny_models):
    """Face tab on the bundled whole photo: dlib finds the faces, the largest is restored (tiny models,
    bicubic cleaner and background) and pasted back; the result has the input's size."""
    from gradio_client import handle_file

    from diffbir_demo.ui import SAMPLES_DIR

    ldm, _ = tiny_models
    src = SAMPLES_DIR / "face_whole_real47_1.jpg"
    with serve(ldm=ldm, limits=DemoLimits(max_input_pixels=512 * 512, max_output_pixels=1024 * 1024)) as (_, client):
        out = _outputs(
            client.predict(
                handle_file(str(src)),
                preset="v2",
                face_mode="whole",
                cleaner="bicubic",
                upscale=1,
                steps=2,
                cfg_scale=1.0,
                seed=3,
                previews=False,
                max_faces=1,
                face_backend="dlib",
                background="bicubic",
                api_name="/restore_face",
            )
        )
    got = _assert_png(out["result"], (276, 182))
    assert "Faces restored: 1 (whole, detector dlib)" in out["info"]
    lq = np.asarray(Image.open(src).convert("RGB")).astype(int)
    changed = np.abs(got.astype(int) - lq).max(axis=2) > 30
    assert 0.005 < changed.mean() < 0.6  # one face region changed by the random model, the rest kept


@pytest.mark.parametrize("script", ["diffbir_demo/app.py", "app.py"])
def test_python_demo_app_py_starts(tmp_path, script):
    """`python diffbir_demo/app.py` and `python app.py` (the Space's command) serve the page; the server is
    stopped afterwards."""
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, script, "--port", str(port), "--device", "cpu"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as r:
                    config = r.read().decode()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"{script} did not start:\n" + (tmp_path / "server.log").read_text()) from None
                time.sleep(1)
        assert "restore_general" in config and "restore_face" in config
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()

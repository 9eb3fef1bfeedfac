"""The Hugging Face Space: the root README front matter, the requirements split, `app.py`, and ZeroGPU.

Known answers: the card's values against independent sources (the installed gradio's version, the
``huggingface_hub.SpaceHardware`` flavour ids, the `weights.WEIGHTS` sources of the default preset's files,
the files on disk); ZeroGPU through a fake ``spaces`` module in ``sys.modules`` whose ``GPU(duration=f)``
records ``f`` and every call (the real package is never needed): the restore must run *inside* the decorated
call, for the duration the closed form of `DemoBackend.gpu_seconds` gives (computed by hand below).
"""

from __future__ import annotations

import functools
import inspect
import socket
import subprocess
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _front_matter() -> dict:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "README.md must open with the Space card (YAML between --- lines)"
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)])


def _requirements(name: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            pkg = line.split("==")[0].split("<")[0].split(">")[0].strip().lower().replace("_", "-")
            out[pkg] = line
    return out


# ---------------------------------------------------------------------------------------------------
# the card and the requirements


def test_front_matter_configures_a_zerogpu_gradio_space():
    import gradio
    from huggingface_hub import SpaceHardware

    card = _front_matter()
    assert card["sdk"] == "gradio" and str(card["sdk_version"]) == gradio.__version__
    assert _requirements("requirements.txt")["gradio"] == f"gradio=={card['sdk_version']}"
    assert (ROOT / card["app_file"]).is_file() and card["app_file"] == "app.py"
    assert card["suggested_hardware"] == SpaceHardware.ZERO_A10G.value  # the ZeroGPU flavour id
    assert card["suggested_hardware"] in {h.value for h in SpaceHardware}
    assert card["license"] == "apache-2.0" and (ROOT / "LICENSE").is_file()
    assert str(card["python_version"]).startswith("3.") and len(card["short_description"]) <= 60


def test_front_matter_preloads_exactly_the_default_presets_files():
    """preload_from_hub = the Hub files of every model the v2.1 preset loads in both tabs (from WEIGHTS)."""
    from diffbir_core.config import PRESETS
    from diffbir_core.weights import WEIGHTS
    from diffbir_demo.backend import DIFFUSION_ORDER, DemoBackend

    card = _front_matter()
    preloaded = set()
    for entry in card["preload_from_hub"]:
        repo, files = entry.split(" ", 1)
        preloaded |= {(repo, f) for f in files.split(",")}
    b = DemoBackend(device="cpu")
    default = DIFFUSION_ORDER[0]
    need = set()
    for tab in ("general", "face"):
        for _, weight, _ in b.needed_weights(PRESETS[default].replace(task="face" if tab == "face" else "sr"), tab):
            spec = WEIGHTS[weight]
            src = next(s for s in spec.sources if s.repo_id)
            need.add((src.repo_id, src.filename or spec.filename))
    assert preloaded == need, (preloaded, need)
    assert set(card["models"]) == {repo for repo, _ in need}


def test_requirements_split():
    run, dev = _requirements("requirements.txt"), _requirements("requirements-dev.txt")
    assert not {"pytest", "pytest-timeout", "nbconvert", "nbclient", "nbformat", "ipykernel", "ruff"} & set(run)
    assert [p for p in run if p.startswith("opencv")] == ["opencv-python-headless"]
    assert run["spaces"] == "spaces==0.51.3" and run["torch"] == "torch==2.14.1"
    assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert {"pytest", "nbconvert", "nbclient", "ipykernel", "ruff"} <= set(dev)
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-r requirements-dev.txt" in setup and "requirements.txt requirements-dev.txt" in setup  # stamp: both


def test_root_app_imports_nothing_heavy():
    code = (
        "import sys, app; assert callable(app.main); "
        "assert not {'gradio', 'torch', 'spaces'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# ---------------------------------------------------------------------------------------------------
# ZeroGPU


class FakeSpaces(types.ModuleType):
    """Stands in for Hugging Face's ``spaces``: ``GPU(duration=f)`` records ``f``; a call of the decorated
    function records the duration ``f(*args, **kwargs)`` (as ``spaces`` computes it) and holds ``inside``."""

    def __init__(self):
        super().__init__("spaces")
        self.durations: list = []
        self.calls: list[int] = []
        self.inside = 0

    def GPU(self, task=None, *, duration=None, size=None):  # noqa: N802 (the real name)
        if task is None:
            return functools.partial(self.GPU, duration=duration, size=size)
        self.durations.append(duration)
        fake = self

        if inspect.isgeneratorfunction(task):

            @functools.wraps(task)
            def wrapper(*args, **kwargs):
                fake.calls.append(duration(*args, **kwargs))
                fake.inside += 1
                try:
                    yield from task(*args, **kwargs)
                finally:
                    fake.inside -= 1
        else:

            @functools.wraps(task)
            def wrapper(*args, **kwargs):
                fake.calls.append(duration(*args, **kwargs))
                fake.inside += 1
                try:
                    return task(*args, **kwargs)
                finally:
                    fake.inside -= 1

        return wrapper


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _served(**kw):
    from gradio_client import Client

    from diffbir_demo.app import build_demo
    from diffbir_demo.ui import launch_demo

    demo = build_demo(device="cpu", **kw)
    port = _free_port()
    launch_demo(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


def _png(path: Path, h: int, w: int) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_without_spaces_the_handlers_are_not_wrapped(monkeypatch):
    from diffbir_demo.backend import DemoBackend
    from diffbir_demo.ui import _make_handler, zerogpu

    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` raises ImportError, installed or not
    fn = lambda: None  # noqa: E731
    assert zerogpu(fn, lambda: 1) is fn
    handler = _make_handler(DemoBackend(device="cpu"), "general", _general_names())
    assert handler.__name__ == "restore_general" and not hasattr(handler, "__wrapped__")


def _general_names() -> list[str]:
    return [
        "preset",
        "task",
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
        "seed",
        "random_seed",
        "cleaner",
        "tiling",
        "tile_size",
        "previews",
    ]


def test_with_spaces_the_restore_runs_inside_the_gpu_call(monkeypatch, tmp_path):
    """A real request over HTTP: the handler is decorated, the duration callable gets the request's own
    arguments, and `api.restore` (all the GPU work) runs while the decorated call is active."""
    import diffbir_demo.backend as backend_mod

    fake = FakeSpaces()
    monkeypatch.setitem(sys.modules, "spaces", fake)
    seen: list[int] = []
    real_restore = backend_mod.api.restore

    def spy(*a, **k):
        seen.append(fake.inside)
        return real_restore(*a, **k)

    monkeypatch.setattr(backend_mod.api, "restore", spy)
    from gradio_client import handle_file

    src = _png(tmp_path / "in.png", 24, 32)
    with _served() as (_, client):
        assert len(fake.durations) == 2  # one decorated handler per tab (no cached examples on this host)
        out = client.predict(
            handle_file(str(src)), preset="offline", cleaner="bicubic", upscale=2, api_name="/restore_general"
        )
    with Image.open(out[1]) as im:
        assert im.size == (64, 48)
    assert seen == [1], "api.restore did not run inside the @spaces.GPU call"
    # offline, 64x48 output: 1 unit, no steps -> 1.5 x (5 + 1 x (1 + 0)) = 9 s, below the 15 s floor
    assert fake.calls == [15]


def test_gpu_duration_closed_form(monkeypatch, tmp_path):
    from diffbir_demo.backend import DemoBackend
    from diffbir_demo.ui import _make_handler

    fake = FakeSpaces()
    monkeypatch.setitem(sys.modules, "spaces", fake)
    b = DemoBackend(device="cpu")
    _make_handler(b, "general", _general_names())
    duration = fake.durations[-1]
    src = str(_png(tmp_path / "in.png", 256, 256))
    v2 = dict(
        preset="v2",
        task="sr",
        upscale=4,
        steps=50,
        sampler="spaced",
        cfg_scale=4.0,
        pos_prompt="",
        neg_prompt="",
        strength=1.0,
        guidance_scale=0.0,
        guidance_start=1001,
        guidance_stop=-1,
        color_fix="wavelet",
        seed=1,
        random_seed=False,
        cleaner="bicubic",
        tiling="auto",
        tile_size=512,
        previews=False,
    )
    args = [{"path": src, "orig_name": "in.png"}] + [v2[n] for n in _general_names()]
    # 1024x1024 out = 4 units; CFG on, guidance off: 0.24 s/step -> 1.5 x (5 + 4 x (1 + 50 x 0.24)) = 85.5 -> 86
    assert duration(*args) == 86
    # latent guidance on doubles the step: 1.5 x (5 + 4 x (1 + 50 x 0.48)) = 157.5 -> 158
    g = dict(v2, guidance_scale=0.5)
    assert duration(*([args[0]] + [g[n] for n in _general_names()])) == 158
    # x8 (2048x2048 = 16 units) is clamped to 180 s; CFG 1 halves the step: 1.5 x (5 + 4 x (1 + 50 x 0.12)) = 49.5
    big = dict(v2, upscale=8)
    assert duration(*([args[0]] + [big[n] for n in _general_names()])) == 180
    nocfg = dict(v2, cfg_scale=1.0)
    assert duration(*([args[0]] + [nocfg[n] for n in _general_names()])) == 50
    assert duration(*([None] + args[1:])) == 15  # no image: the request fails at once
    face = dict(
        v2,
        face_mode="aligned",
        only_center_face=False,
        max_faces=20,
        face_backend="auto",
        background="general",
        upscale=1,
    )
    assert b.gpu_seconds("face", src, face) == int(np.ceil(1.5 * (5 + (1 + 3) * (1 + 50 * 0.24))))


# ---------------------------------------------------------------------------------------------------
# opening preset and start-up loading


def _fake_weights(folder: Path, names) -> None:
    from diffbir_core.weights import WEIGHTS

    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / WEIGHTS[n].filename).write_bytes(b"placeholder")  # these entries carry no size or checksum


def _no_hub(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFBIR_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))


def test_gpu_host_opens_on_the_best_preset_whose_files_are_here(monkeypatch, tmp_path):
    from diffbir_demo.app import build_demo
    from diffbir_demo.backend import DemoBackend

    _no_hub(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "spaces", None)
    wdir = tmp_path / "w"
    assert DemoBackend(device="cuda", weights_dir=wdir).best_preset() == "offline"
    _fake_weights(wdir, ["swinir_realesrgan", "swinir_face", "sd_v2.1_zsnr", "v2.1"])
    b = DemoBackend(device="cuda", weights_dir=wdir)
    assert b.best_preset() == "v2.1" and b.availability("general", "v2.1")[0]
    assert not b.availability("general", "v2")[0]  # BSRNet, SD 2.1, v2.pth are not there
    demo = build_demo(device="cuda", weights_dir=wdir, default_preset="auto")  # no model is loaded here
    comps = {c.get("props", {}).get("elem_id"): c["props"] for c in demo.config["components"]}
    assert comps["general-preset"]["value"] == "v2.1" and comps["face-preset"]["value"] == "v2.1"
    assert comps["general-run"]["interactive"] is not False
    cpu = build_demo(device="cpu", weights_dir=wdir, default_preset="auto")
    assert {c["props"].get("elem_id"): c["props"] for c in cpu.config["components"]}["general-preset"][
        "value"
    ] == "offline"


def test_preload_loads_the_opening_presets_models_at_start_up(monkeypatch, tmp_path):
    import diffbir_core.pipeline as pipeline_mod
    from diffbir_demo.app import build_demo

    _no_hub(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "spaces", None)
    loaded: list = []
    monkeypatch.setattr(pipeline_mod, "load_cleaner", lambda name, **kw: loaded.append(name) or object())
    monkeypatch.setattr(
        pipeline_mod,
        "load_pretrained_control_ldm",
        lambda sd, control, **kw: loaded.append((sd, control)) or types.SimpleNamespace(),
    )
    monkeypatch.setattr(pipeline_mod, "apply_speed_options", lambda *a, **k: [])
    build_demo(device="cpu", default_preset="v2.1", preload=True)
    assert sorted(map(str, loaded)) == sorted(map(str, ["swinir_realesrgan", "swinir_face", ("sd_v2.1_zsnr", "v2.1")]))
    loaded.clear()
    build_demo(device="cpu", default_preset="v2.1")  # without preload: nothing until the first request
    assert loaded == []


def test_examples_cached_lazily_only_when_asked(monkeypatch):
    import gradio as gr

    from diffbir_demo.app import build_demo

    monkeypatch.setitem(sys.modules, "spaces", None)
    made: list[dict] = []
    real = gr.Examples

    def recording(*args, **kwargs):
        made.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(gr, "Examples", recording)
    build_demo(device="cpu")
    assert made and all(not k.get("cache_examples") and k.get("fn") is None for k in made)
    made.clear()
    monkeypatch.setenv("GRADIO_CACHE_EXAMPLES", "false")  # the flag, not the environment, decides
    build_demo(device="cpu", cache_examples=True)
    assert len(made) == 2 and all(
        k["cache_examples"] is True and k["cache_mode"] == "lazy" and callable(k["fn"]) and len(k["outputs"]) == 6
        for k in made
    )


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))

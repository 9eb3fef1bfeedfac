"""The demo page in a real browser: Debian's chromium, headless, against a live `diffbir_demo/app.py` server.

Checks that the rendered DOM holds both tabs and the main controls (input, preset, task, upscale,
Restore, the folded advanced settings, the outputs and the examples), and saves a screenshot as a test
artefact: ``test-artifacts/demo_browser.png`` (git-ignored; ``$DIFFBIR_TEST_ARTIFACTS`` moves it).
Needs ``/usr/bin/chromium``: ``apt-get install -y --no-install-recommends chromium``.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("DIFFBIR_TEST_ARTIFACTS", ROOT / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WINDOW = (1280, 900)


def _chromium(url: str, *mode: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=15000",
             *mode, url], capture_output=True, text=True, timeout=180)


def test_page_renders_tabs_and_controls():
    if not Path(CHROMIUM).is_file():
        pytest.fail("chromium is not installed; the browser check needs it: "
                    "`apt-get install -y --no-install-recommends chromium` (Debian), then rerun.")
    from diffbir_demo.app import build_demo
    from diffbir_demo.ui import launch_demo

    demo = build_demo(device="cpu")  # no model is loaded until a request comes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch_demo(demo, port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        dom = _chromium(url, "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert "<title>DiffBIR demo" in html, html[:1000]
        assert 'data-tab-id="general"' in html and 'data-tab-id="face"' in html
        for text in ("Low-quality input", "Preset / model", "Super-resolution / general", "Upscale", "Restore",
                     "Diffusion (stage 2)", "Seed, cleaner, tiling, previews", "Live preview", "Before / after",
                     "Restored (PNG)", "Stage 1 (cleaner)", "Download PNG", "Examples"):
            assert text in html, f"{text!r} is not on the rendered page"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "demo_browser.png"
        shot.unlink(missing_ok=True)
        res = _chromium(url, f"--screenshot={shot}")
        assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    finally:
        demo.close()
    with Image.open(shot) as im:
        assert im.size == WINDOW
        px = np.asarray(im.convert("RGB")).astype(np.float32)
    assert px.std() > 10, "the screenshot is blank"
    # the primary Restore button (orange) is drawn: some strongly orange pixels exist
    orange = (px[..., 0] > 200) & (px[..., 1] > 80) & (px[..., 1] < 160) & (px[..., 2] < 80)
    assert orange.sum() > 500, "the Restore button is not visible in the screenshot"

"""The demo page in a real browser: Debian's chromium, headless, against a live `diffbir_demo/app.py` server.

Checks that the rendered DOM holds both tabs and the main controls (input, preset, task, upscale,
Restore, the folded advanced settings, the outputs and the examples), that the offline preset shows no
stage-1 pane and no previews, and saves a screenshot as a test artefact: ``test-artifacts/demo_browser.png``
(git-ignored; ``$DIFFBIR_TEST_ARTIFACTS`` moves it). A preset whose weights are missing opens with Restore
disabled and the reason rendered as Markdown (bold text, a list of the files, no literal ``**``, no paths).
Needs ``/usr/bin/chromium``: ``apt-get install -y --no-install-recommends chromium``.
"""

from __future__ import annotations

import os
import re
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
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--window-size={WINDOW[0]},{WINDOW[1]}",
                "--virtual-time-budget=15000",
                *mode,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )


def _need_chromium() -> None:
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            "chromium is not installed; the browser check needs it: "
            "`apt-get install -y --no-install-recommends chromium` (Debian), then rerun."
        )


def _serve(**kw):
    from diffbir_demo.app import build_demo
    from diffbir_demo.ui import launch_demo

    demo = build_demo(device="cpu", **kw)  # no model is loaded until a request comes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch_demo(demo, port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


def _rendered(dom: str) -> str:
    """The page without its scripts (the embedded app config names every component, shown or not)."""
    return re.sub(r"(?s)<script\b.*?</script>", "", dom)


def _button(html: str, elem_id: str) -> str:
    m = re.search(r"<button[^>]*\bid=\"" + re.escape(elem_id) + r"\"[^>]*>", html)
    assert m, f"no button #{elem_id} on the page"
    return m.group(0)


def _section(html: str, elem_id: str) -> str:
    """The HTML of the element with ``elem_id`` (up to the next tab), for text checks."""
    i = html.index(f'id="{elem_id}"')
    return html[i : i + 6000]


def test_page_renders_tabs_and_controls():
    _need_chromium()
    demo, url = _serve()
    try:
        dom = _chromium(url, "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = _rendered(dom.stdout)
        assert "<title>DiffBIR demo" in html, html[:1000]
        assert 'data-tab-id="general"' in html and 'data-tab-id="face"' in html
        for text in (
            "Low-quality input",
            "Preset / model",
            "Super-resolution / general",
            "Upscale",
            "Restore",
            "Seed, cleaner, tiling, previews",
            "Before / after",
            "Restored (PNG)",
            "Download PNG",
            "Examples",
        ):
            assert text in html, f"{text!r} is not on the rendered page"
        # offline preset: no diffusion, so no stage-1 pane (it equals the result), no previews, no stage-2 knobs
        for text in ("Stage 1 (cleaner)", "Live preview", "Diffusion (stage 2)"):
            assert text not in html, f"{text!r} is shown for the offline preset"
        assert "disabled" not in _button(html, "general-run")
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


def test_missing_weights_disable_restore_with_a_readable_reason(tmp_path, monkeypatch):
    _need_chromium()
    monkeypatch.delenv("DIFFBIR_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf"))  # no cached weights
    demo, url = _serve(weights_dir=tmp_path, default_preset="v2")
    try:
        dom = _chromium(url, "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = _rendered(dom.stdout)
    finally:
        demo.close()
    assert "disabled" in _button(html, "general-run")  # the Face tab is rendered when opened
    status = _section(html, "general-status")
    text = re.sub(r"<[^>]+>", "", status)
    assert "Missing weights: Restore is off for this preset." in text
    for name in ("BSRNet.pth", "v2-1_512-ema-pruned.ckpt", "v2.pth"):
        assert re.search(r"<li>\s*<code>" + re.escape(name) + "</code>", status), f"{name} is not listed"
    assert re.search(r"<strong>offline</strong>", status)  # Markdown rendered, not shown as **offline**
    assert "**" not in text and str(tmp_path) not in html and "--weights-dir" not in text
    # the diffusion preset shows its stage-1 pane and previews
    assert "Stage 1 (cleaner)" in html and "Live preview" in html

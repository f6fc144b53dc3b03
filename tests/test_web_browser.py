"""The web page in a real browser: headless Chromium (Debian's package) driven by Playwright.

``staralign serve`` runs as a subprocess, exactly the command users type, on a free
port; the browser uploads a drawn face through the file input, and the test
checks what the page draws (canvas pixels where the JSON says the landmarks are,
ellipses, the plain image when every overlay is off), the JSON it offers for
download, a webcam frame from Chromium's fake camera, a refused file, and that
nothing is fetched from anywhere but the server.  Screenshots go to
``test-artifacts/``.  Skips only where no Chromium is installed.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from staralign.config import ModelConfig
from staralign.data.synth import render_face
from staralign.models import build_model, save_model

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # a real Chromium: ~6 s with its start

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 # A fake camera (a moving test pattern) and no permission prompt, for the webcam path.
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``staralign serve`` on a free port, as a subprocess; yields its base URL."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi", reason="the web extra is not installed (pip install 'staralign[web]')")
    torch.manual_seed(0)
    model = build_model(ModelConfig(nstack=1, channels=32, input_size=64, nlevels=2), "WFLW").eval()
    weights = save_model(model, tmp_path_factory.mktemp("model") / "tiny.safetensors")
    proc = subprocess.Popen(
        [sys.executable, "-m", "staralign", "serve", "--weights", str(weights), "--detector", "none",
         "--device", "cpu", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    output, url, deadline = [], None, time.monotonic() + 60
    try:
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                output.append(lines.get(timeout=0.5))
            except queue.Empty:
                continue
            match = re.search(r"open (http://\S+)", output[-1])
            url = match.group(1) if match else None
        assert url, "staralign serve did not start:\n" + "".join(output)
        while time.monotonic() < deadline:  # the socket is bound before uvicorn listens: wait for it
            try:
                if httpx.get(url + "api/info", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium not found (/usr/bin/chromium or 'chromium' on PATH): apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def canvas_pixels(page) -> np.ndarray:
    """The result canvas as an RGB array, read back from the page."""
    url = page.evaluate("document.getElementById('result').toDataURL('image/png')")
    data = np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1]


def set_overlays(page, **on: bool) -> None:
    for name in ("box", "points", "edges", "ambiguity", "indices"):
        page.set_checked(f"#show-{name}", on.get(name, False))


def test_page_uploads_draws_and_downloads(server, browser, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    image = render_face(np.random.default_rng(11), 256)[0]
    face = tmp_path / "synthetic face.png"
    cv2.imwrite(str(face), image)
    plain_rgb = image[:, :, ::-1].astype(int)

    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    page = context.new_page()
    page_errors: list[str] = []
    console: list[str] = []
    foreign: list[str] = []
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("request", lambda req: None if req.url.startswith((server, "blob:", "data:")) else foreign.append(req.url))
    try:
        page.goto(server)
        page.wait_for_function("() => document.getElementById('model').textContent.includes('98 points')",
                               timeout=10_000)

        # Upload through the file input; the page answers with one face of 98 points.
        page.set_input_files("#file", str(face))
        page.wait_for_selector("body[data-state=done]", timeout=20_000)
        status = page.text_content("#status")
        assert "synthetic face.png: 1 face, 98 points each (WFLW)" in status, status
        assert re.search(r"server \d+ ms \(inference \d+ ms\) · round trip \d+ ms", page.text_content("#timing"))
        shown = json.loads(page.text_content("#json"))
        points = np.asarray(shown["inputs"][0]["faces"][0]["landmarks"])
        assert shown["num_points"] == 98 and points.shape == (98, 2)
        assert len(shown["inputs"][0]["faces"][0]["ambiguity"]["major_std"]) == 98
        page.screenshot(path=str(ARTIFACTS / "web_browser.png"), full_page=True)

        # What is drawn: everything off is the plain photo; points land where the JSON says.
        drawn = canvas_pixels(page)
        scale = int(page.get_attribute("#result", "data-scale"))  # small photos are shown enlarged
        assert scale >= 1 and drawn.shape == (256 * scale, 256 * scale, 3)
        set_overlays(page)
        plain = canvas_pixels(page)
        photo = plain[scale // 2::scale, scale // 2::scale]
        assert np.abs(photo - plain_rgb).mean() < 1.0, "with every overlay off the canvas is the photo"
        changed = np.abs(drawn - plain).sum(-1) > 30
        assert changed.mean() > 0.02, f"only {changed.mean():.2%} of the pixels changed with the overlays on"
        set_overlays(page, points=True)
        dots = canvas_pixels(page)
        xy = np.floor((points + 0.5) * scale).astype(int)  # pixel centres are at integer coordinates
        inside = (xy >= 0).all(1) & (xy < 256 * scale).all(1)
        green = np.abs(dots[xy[inside, 1], xy[inside, 0]] - [0, 255, 0]).max(1) < 40
        assert inside.sum() >= 90 and green.mean() > 0.95, "points are drawn at the JSON's coordinates"
        set_overlays(page, ambiguity=True)
        ellipses = canvas_pixels(page)
        assert (np.abs(ellipses - plain).sum(-1) > 30).sum() > 200, "ambiguity ellipses are drawn"
        set_overlays(page, indices=True)
        assert (np.abs(canvas_pixels(page) - plain).sum(-1) > 30).sum() > 200, "indices are drawn"
        set_overlays(page, box=True, points=True, edges=True, ambiguity=True)

        # The download is the same JSON.
        with page.expect_download() as download_info:
            page.click("#download")
        download = download_info.value
        assert download.suggested_filename == "synthetic face.landmarks.json"
        downloaded = json.loads(Path(download.path()).read_text(encoding="utf-8"))
        assert downloaded == shown

        # The other layout: 68 points, drawn with 300W's edges.
        page.select_option("#format", "68")
        page.wait_for_function("() => document.getElementById('status').textContent.includes('68 points each (300W)')",
                               timeout=20_000)

        # A webcam frame (Chromium's fake camera) goes up as a raw JPEG.
        page.click("#camera-start")
        page.wait_for_selector("#camera-live:not([hidden])", timeout=10_000)
        page.wait_for_function("() => document.getElementById('video').videoWidth > 0", timeout=10_000)
        page.click("#capture")
        page.wait_for_function("() => document.body.dataset.state === 'done' && "
                               "document.getElementById('status').textContent.startsWith('webcam.jpg: 1 face')",
                               timeout=20_000)
        # Live mode: frames go to api/track under the page's stream id and come back with track ids.
        page.select_option("#smooth", "oneeuro")
        page.set_checked("#live", True)
        page.wait_for_function("() => document.getElementById('json').textContent.includes('\"track_id\"')",
                               timeout=30_000)
        live = json.loads(page.text_content("#json"))
        page.set_checked("#live", False)
        assert live["smooth"] == "oneeuro" and live["stream"].startswith("cam")
        assert [type(f["track_id"]) for f in live["inputs"][0]["faces"]] == [int]
        page.click("#camera-stop")

        # A file the server refuses: the page shows its message.
        notes = tmp_path / "notes.txt"
        notes.write_text("not a photo\n" * 10)
        page.set_input_files("#file", str(notes))
        page.wait_for_selector("body[data-state=error]", timeout=20_000)
        assert "is not accepted" in page.text_content("#status") and "415" in page.text_content("#status")
    finally:
        page.screenshot(path=str(ARTIFACTS / "web_browser_last.png"))
        context.close()
    assert page_errors == [], page_errors
    assert not [m for m in console if "Content Security Policy" in m or "Refused to" in m], console
    assert foreign == [], f"the page fetched from elsewhere: {foreign}"

"""The real viewer in headless Chromium (Playwright): `ns-viewer` on a trained checkpoint, the VQ3D
controls in the page, the picture changing with the image index, a PNG upload showing a new scene,
and a bad upload leaving the server up."""

import io
import os
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
from helpers import cli
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytest.skip("no chromium here: `make test` installs it (apt-get install chromium)", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_viewer(args, port, env, cwd=None):
    """Start a viewer command; return its process once the port answers (fail with its output if it dies)."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    deadline = time.time() + 240
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    return proc


@pytest.fixture(scope="module")
def viewer_url(trained_run_module):
    config, env = trained_run_module
    port = free_port()
    proc = start_viewer([cli("ns-viewer"), "--load-config", str(config), "--viewer.websocket-port", str(port)], port, env)
    yield f"http://127.0.0.1:{port}", proc
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def trained_run_module(synth_dir, tmp_path_factory):
    """A 3-step `ns-train vq3d-tiny` run (its own, so this module runs alone too)."""
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("viewer_runs")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONWARNINGS="ignore")
    subprocess.run([cli("ns-train"), "vq3d-tiny", "--data", str(synth_dir), "--output-dir", str(out), "--experiment-name", "v",
                    "--max-num-iterations", "3", "--vis", "tensorboard", "--pipeline.datamanager.num-workers", "0",
                    "--pipeline.datamanager.images-per-batch", "2", "--pipeline.datamanager.rays-per-image", "32",
                    "vq3d-images", "--eval-fraction", "0.3"],
                   env=env, check=True, capture_output=True, timeout=600)
    (config,) = out.glob("v/vq3d-tiny/*/config.yml")
    return config, env


def picture(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator("canvas").first.screenshot())).convert("RGB"), dtype=np.float32)


def wait_for_text(page, text, timeout=60):
    page.get_by_text(text, exact=False).first.wait_for(timeout=timeout * 1000)


def field(page, label):
    """The input in the viser GUI row that this label heads."""
    row = page.locator("label", has_text=label).first.locator("xpath=ancestor::div[contains(@class, 'mantine-Flex-root')][1]")
    return row.locator("input").first


def shown_value(page) -> str:
    return field(page, "Shown").input_value()


def test_viewer_controls_in_the_browser(viewer_url, tmp_path):
    from playwright.sync_api import sync_playwright

    url, proc = viewer_url
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url)
        for label in ("Image split", "Image index", "Random image", "Upload a photo", "Shown"):
            wait_for_text(page, label)
        time.sleep(6)  # first renders arrive
        before = picture(page)
        time.sleep(3)
        noise = np.abs(picture(page) - before).mean()  # the same scene, re-rendered: the noise floor

        index = field(page, "Image index")
        index.fill("1")
        index.press("Enter")
        deadline = time.time() + 60
        while "image 1" not in shown_value(page) and time.time() < deadline:
            time.sleep(0.5)
        assert "held-out image 1" in shown_value(page)
        time.sleep(6)
        after = picture(page)
        change = np.abs(after - before).mean()
        assert change > max(0.2, 3 * noise), f"the picture did not change with the image index ({change} vs noise {noise})"

        photo = tmp_path / "upload.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(photo)
        page.locator("input[type=file]").set_input_files(str(photo))
        deadline = time.time() + 60
        while "uploaded photo upload.png" not in shown_value(page) and time.time() < deadline:
            time.sleep(0.5)
        assert shown_value(page) == "uploaded photo upload.png"

        bad = tmp_path / "bad.png"
        bad.write_bytes(b"this is not a png")
        page.locator("input[type=file]").set_input_files(str(bad))
        deadline = time.time() + 60
        while "refused" not in shown_value(page) and time.time() < deadline:
            time.sleep(0.5)
        assert "upload refused: bad.png" in shown_value(page)
        assert proc.poll() is None, "the viewer server died after a bad upload"
        browser.close()


def test_vq3d_view_opens_the_shipped_model_without_training_data(tmp_path, cli_env):
    """`vq3d view --model vq3d-tiny-synth`: nerfstudio's viewer on a package alone (no run, no
    dataset): the VQ3D controls are there, the panel shows the package's example images, and an
    uploaded photo becomes the shown scene."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = start_viewer([cli("vq3d"), "view", "--model", "vq3d-tiny-synth", "--websocket-port", str(port)], port, cli_env, tmp_path)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"http://127.0.0.1:{port}")
            for label in ("Image index", "Upload a photo", "Shown"):
                wait_for_text(page, label)
            deadline = time.time() + 60
            while "image 0" not in shown_value(page) and time.time() < deadline:
                time.sleep(0.5)
            assert shown_value(page) == "held-out image 0"  # the package's first example
            photo = tmp_path / "mine.png"
            Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(photo)
            page.locator("input[type=file]").set_input_files(str(photo))
            deadline = time.time() + 60
            while "uploaded photo mine.png" not in shown_value(page) and time.time() < deadline:
                time.sleep(0.5)
            assert shown_value(page) == "uploaded photo mine.png"
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

"""The real viewer in headless Chromium (Playwright): `ns-viewer` on a trained checkpoint, the VQ3D
controls in the page, the picture changing with the image index, a PNG upload showing a new scene,
and a bad upload leaving the server up."""

import contextlib
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


def upload(page, photo, shown: str, timeout: float = 60) -> None:
    """Upload a file through the panel's button; wait until "Shown" holds ``shown`` (or time runs out)."""
    page.locator("input[type=file]").set_input_files(str(photo))
    deadline = time.time() + timeout
    while shown not in shown_value(page) and time.time() < deadline:
        time.sleep(0.5)


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
        upload(page, photo, "uploaded photo upload.png")
        assert shown_value(page) == "uploaded photo upload.png"

        bad = tmp_path / "bad.png"
        bad.write_bytes(b"this is not a png")
        upload(page, bad, "refused")
        assert "upload refused: bad.png" in shown_value(page)
        assert proc.poll() is None, "the viewer server died after a bad upload"
        browser.close()


def test_vq3d_view_opens_the_shipped_model_without_training_data(tmp_path, cli_env):
    """`vq3d view --model vq3d-tiny-synth`: nerfstudio's viewer on a package alone (no run, no
    dataset): the VQ3D controls are there, the panel shows the package's example images, and an
    uploaded photo becomes the shown scene."""
    with shipped_model_page(tmp_path, cli_env) as (page, proc):
        for label in ("Image index", "Upload a photo", "Shown"):
            wait_for_text(page, label)
        deadline = time.time() + 60
        while "image 0" not in shown_value(page) and time.time() < deadline:
            time.sleep(0.5)
        assert shown_value(page) == "held-out image 0"  # the package's first example
        photo = tmp_path / "mine.png"
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(photo)
        upload(page, photo, "uploaded photo mine.png")
        assert shown_value(page) == "uploaded photo mine.png"


@contextlib.contextmanager
def shipped_model_page(tmp_path, env):
    """``(page, server process)``: `vq3d view --model vq3d-tiny-synth` open in headless Chromium."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = start_viewer([cli("vq3d"), "view", "--model", "vq3d-tiny-synth", "--websocket-port", str(port)], port, env, tmp_path)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"http://127.0.0.1:{port}")
            yield page, proc
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drag_around(page, seconds: float) -> None:
    """Orbit the camera with the mouse (left drags across the 3D view) for about ``seconds``."""
    box = page.locator("canvas").first.bounding_box()
    x, y = box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.5
    end = time.time() + seconds
    while time.time() < end:
        page.mouse.move(x, y)
        page.mouse.down()
        for step in range(10):
            page.mouse.move(x + 4 * step, y + 2 * step)
            time.sleep(0.02)
        page.mouse.up()
        time.sleep(0.05)


def reference_views(width: int, height: int, fov_deg: float):
    """The shipped model's first example from the canonical camera and from a camera 20 degrees
    round the pivot, rendered here as the viewer renders a frame of that aspect and vertical FOV."""
    from nerfstudio.cameras.cameras import CameraType
    from nerfstudio.viewer.utils import CameraState, get_camera

    from vq3d_nerfstudio.data.dataset import load_image
    from vq3d_nerfstudio.geometry.cameras import canonical_camera_to_world, orbit_camera_to_world
    from vq3d_nerfstudio.model_index import resolve_model
    from vq3d_nerfstudio.stage1.package import load_package

    folder = resolve_model("vq3d-tiny-synth")
    model, _ = load_package(folder)
    model.set_scene_images(load_image(folder / "examples" / "example_00.png", model.config.image_size))
    model.ignore_camera_index(0)  # get_camera names camera 0, as the viewer does before any click
    views = []
    for c2w in (canonical_camera_to_world(model.camera_distance), orbit_camera_to_world(20.0, 0.0, model.camera_distance)):
        state = CameraState(fov=np.radians(fov_deg), aspect=width / height, c2w=c2w, camera_type=CameraType.PERSPECTIVE)
        views.append(model.get_outputs_for_camera(get_camera(state, height, width))["rgb"].numpy() * 255)
    return views


def small(picture: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(picture.astype(np.uint8)).resize((width, height), Image.BILINEAR), dtype=np.float32)


def test_viewer_opens_at_the_input_view_and_draws_splats_in_the_browser(tmp_path, cli_env):
    """`vq3d view --model vq3d-tiny-synth`: the first picture is the canonical camera's (closer to
    the canonical render of the shown scene than to a render 20 degrees round), a still reaches 256 px
    wide, and with "Splats (browser)" on the browser draws a non-blank picture of the scene while the
    server renders nothing (its CPU time stays flat while the camera orbits; off, it renders)."""
    import re

    with shipped_model_page(tmp_path, cli_env) as (page, proc):
        wait_for_text(page, "Splats (browser)")
        width = height = 0
        deadline = time.time() + 90
        while width < 256 and time.time() < deadline:
            found = re.search(r"Resolution: (\d+)x(\d+)px", page.inner_text("body"))
            width, height = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
            time.sleep(0.5)
        assert width >= 256, f"the still view stayed {width} px wide"
        time.sleep(1)
        shot = picture(page)
        h = shot.shape[0]
        w = round(h * width / height)  # the 3D view left of the GUI panel, the frame's aspect
        rw, rh = 64, round(64 * height / width)

        def region(image):  # at the reference's size, without the border
            if image.shape[1] > w:
                image = image[:, :w]
            return small(image, rw, rh)[rh // 8 : -rh // 8, rw // 8 : -rw // 8]

        canonical, moved = (region(view) for view in reference_views(rw, rh, 50.0))
        seen = region(shot)
        if os.environ.get("VQ3D_TEST_SHOTS"):
            Image.fromarray(shot.astype(np.uint8)).save(os.path.join(os.environ["VQ3D_TEST_SHOTS"], "viewer_nerf.png"))
        error = {name: float(np.abs(seen - view).mean()) for name, view in (("canonical", canonical), ("moved", moved))}
        assert error["canonical"] < 0.7 * error["moved"], error

        before = cpu_seconds(proc.pid)
        drag_around(page, 4.0)
        rendering = cpu_seconds(proc.pid) - before
        page.get_by_text("Reset to input view").first.click()

        page.get_by_text("Splats (browser)").first.click()
        deadline = time.time() + 120
        while "splats (" not in field(page, "Status").input_value() and time.time() < deadline:
            time.sleep(0.5)
        assert re.match(r"\d+ splats \(", field(page, "Status").input_value())
        time.sleep(3)
        whole = picture(page)
        splat_shot = region(whole)
        if os.environ.get("VQ3D_TEST_SHOTS"):
            Image.fromarray(whole.astype(np.uint8)).save(os.path.join(os.environ["VQ3D_TEST_SHOTS"], "viewer_splats.png"))
        assert (splat_shot.max(axis=-1) > 30).mean() > 0.3, "the splat view is blank"
        assert float(np.abs(splat_shot - canonical).mean()) < error["moved"], "the splats do not show the scene"
        before = cpu_seconds(proc.pid)
        drag_around(page, 4.0)
        idle = cpu_seconds(proc.pid) - before
        assert idle < 0.5 * rendering, f"the server kept rendering under the splats ({idle:.2f} s CPU vs {rendering:.2f} s)"

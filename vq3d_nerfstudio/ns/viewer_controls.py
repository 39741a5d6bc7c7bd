"""VQ3D's controls in nerfstudio's web viewer: which image's NeRF is shown.

nerfstudio's viewer installs every ``ViewerElement`` it finds on the pipeline under "Custom
Elements" and re-renders after each callback. These pick the shown scene: a split and an image index
(held-out "eval" or "train" images), a random-image button, an upload button that takes any photo
and shows its NeRF at once, and a read-only line naming the shown image and its class when known.
:class:`ViewerSetup` opens every client at the input view and keeps the status line and the one
camera frustum up to date; :class:`SplatControls` draws the scene as splats in the browser.
"""

from __future__ import annotations

import io
import math
import os
import random
import threading
import time
from typing import Callable, Optional, Set, Tuple

import numpy as np
from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO
from nerfstudio.viewer.viewer_elements import (
    ViewerButton,
    ViewerControl,
    ViewerDropdown,
    ViewerElement,
    ViewerNumber,
    ViewerText,
)

from vq3d_nerfstudio.data.dataset import load_image
from vq3d_nerfstudio.errors import DatasetError
from vq3d_nerfstudio.export.rasterize import covariances
from vq3d_nerfstudio.export.splats import SplatSettings, gaussians_from_nerf
from vq3d_nerfstudio.stage1.baked import COMPILED_DENSITY_PASS
from vq3d_nerfstudio.stage1.edits import EncodedImage, Placement, encode_image, interpolate
from vq3d_nerfstudio.stage2.checkpoint import CheckpointError
from vq3d_nerfstudio.stage2.sample import SampleError, SamplingSettings, SceneSampler, class_label_name

MAX_UPLOAD_BYTES = 25 * 2**20
"""Uploads larger than this are refused (a photo for a 256 px model needs far less)."""
MAX_UPLOAD_PIXELS = 50_000_000
"""... and so are images with more pixels than this (decompression bombs)."""
FRUSTUM_HIDE_DISTANCE = 0.1
"""The training-camera frustum hides while the viewer's camera is within this many world units of it."""
VIEWER_SKY_RADIUS = 8.0
"""Splats in the viewer: samples farther than this from the pivot (the sky) are pulled in to it."""
CPU_STILL_SIDE = 256
"""On a CPU the viewer's "Max res" (the still frame's longer side) starts here instead of 512 px."""
COMPILE_DELAY_S = 5.0
"""On a CPU the viewer compiles its density passes this long after the first scene is shown (after the
first picture; see :meth:`ViewerSetup.compile_density_pass`)."""


def guard_viewer_messages() -> None:
    """Make viser's server skip a websocket message it cannot decode (not msgpack, an unknown message
    type, missing fields, a text frame) with one warning line, and keep the connection. viser 0.2.7's
    consumer loop lets the decoding error end the connection handler with a traceback and without its
    clean-up, so the closed client stayed counted and registered. Replaces that loop (the module
    function each new connection looks up); installed once, for every server of this process."""
    import sys

    from viser.infra import _infra

    if getattr(_infra._message_consumer, "vq3d_guarded", False):
        return

    async def _message_consumer(websocket, handle_message, message_class) -> None:
        while True:
            raw = await websocket.recv()
            try:
                if not isinstance(raw, bytes):
                    raise TypeError(f"a {type(raw).__name__} frame, not msgpack bytes")
                message = message_class.deserialize(raw)
            except Exception as err:  # anything a browser (or anyone on the port) can send
                reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
                print(f"vq3d viewer: warning: ignored a malformed websocket message ({reason})", file=sys.stderr, flush=True)
                continue
            handle_message(message)

    _message_consumer.vq3d_guarded = True  # type: ignore[attr-defined]
    _infra._message_consumer = _message_consumer


class ViewerUploadButton(ViewerElement[object]):
    """viser's file-upload button as a nerfstudio ``ViewerElement``; ``cb_hook(element)`` runs after
    each upload with the file in ``element.uploaded`` (``.name``, ``.content`` bytes)."""

    def __init__(self, name: str, cb_hook: Callable, mime_type: str = "image/*", hint: Optional[str] = None) -> None:
        super().__init__(name, cb_hook=cb_hook)
        self.mime_type = mime_type
        self.hint = hint
        self.uploaded = None

    def _create_gui_handle(self, viser_server) -> None:
        self.gui_handle = viser_server.gui.add_upload_button(
            self.name, disabled=self.disabled, visible=self.visible, hint=self.hint, mime_type=self.mime_type
        )

    def install(self, viser_server) -> None:
        self._create_gui_handle(viser_server)

        def on_upload(event) -> None:
            self.uploaded = event.target.value
            self.cb_hook(self)

        self.gui_handle.on_upload(on_upload)


def decode_upload(name: str, content: bytes, size: int):
    """``[size, size, 3]`` image from uploaded bytes (read as :func:`~vq3d_nerfstudio.data.dataset.load_image`
    reads files: EXIF rotation, greyscale / 16-bit / CMYK, transparency over white), or ``ValueError``
    with a one-line message for the user. Refused before decoding: empty uploads, more than
    ``MAX_UPLOAD_BYTES``, anything Pillow cannot identify, more than ``MAX_UPLOAD_PIXELS`` pixels."""
    from PIL import Image

    if not content:
        raise ValueError(f"{name}: the upload is empty (0 bytes); pick the photo again")
    if len(content) > MAX_UPLOAD_BYTES:
        raise ValueError(f"{name}: {len(content) / 2**20:.1f} MB is over the {MAX_UPLOAD_BYTES // 2**20} MB upload limit")
    limit = f"the {MAX_UPLOAD_PIXELS // 10**6} megapixel limit; downscale it first"
    try:
        with Image.open(io.BytesIO(content)) as probe:  # reads the header only
            width, height = probe.size
    except Image.DecompressionBombError:
        raise ValueError(f"{name}: over {limit}") from None
    except Exception as err:  # anything PIL cannot open is "not an image"
        raise ValueError(f"{name}: not an image this viewer can read ({type(err).__name__}); upload a JPEG, PNG or WebP") from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise ValueError(f"{name}: {width}x{height} is over {limit}")
    try:
        return load_image(io.BytesIO(content), size, label=name)
    except DatasetError as err:  # truncated or corrupt data, an unsupported mode, ...
        detail = str(err).removeprefix(f"{name}: ").removesuffix("; replace or remove the file")
        raise ValueError(f"{name}: the image data is damaged or unsupported ({detail}); upload another photo") from None


class ViewerSetup(ViewerControl):
    """What nerfstudio's viewer does differently for a single-image model, set up once the viewer
    exists (``_setup``) and kept up to date by a watcher thread:

    - every client opens at the input view (the canonical camera: up +y, looking at the pivot, the
      model's field of view), where the model is good; the "Reset to input view" button goes back;
    - the first frame shows the scene the panel names: the viewer sends its camera index 0 with
      every frame, which must not pick training image 0 before anyone clicks a camera;
    - one training-camera frustum (all training images share the canonical camera), showing the
      shown scene's image, hidden while the camera is at the input view (its image plane would cover
      the render); clicking it goes back to the input view;
    - on a CPU, "Max res" starts at :data:`CPU_STILL_SIDE` instead of 512 px;
    - a frame computes the outputs the panel shows (:func:`shown_outputs`), not normals nobody looks at;
    - on a CPU the baked density passes get compiled in the background once the first scene is shown
      (:meth:`compile_density_pass`): frames render eagerly until it is ready, ~30-40% faster after;
    - the status line: what is shown, how long its encode took, the splat count.
    """

    def __init__(self, pipeline, status: ViewerText, splats: "SplatControls") -> None:
        super().__init__()
        self._pipeline = pipeline
        self._status = status
        self._splats = splats
        self._viewer = None
        self._scene = None
        self._compile_timer: Optional[threading.Timer] = None
        model = pipeline.model
        self.reset = ViewerButton("Reset to input view", cb_hook=lambda _: self.to_input_view_all())
        cfg = model.config.adversarial  # the novel views the model is trained for
        self.limits = ViewerText(
            "Supported views",
            f"within {cfg.novel_view_max_yaw_deg:g} deg yaw, {cfg.novel_view_max_elevation_deg:g} deg elevation "
            f"of the input view, around the pivot {model.camera_distance:g} units ahead",
            disabled=True, hint="one photo shows one side: farther views show what the photo cannot",
        )

    # ---- set-up ------------------------------------------------------------------------------
    def _setup(self, viewer) -> None:
        super()._setup(viewer)
        self._viewer = viewer
        model = self._pipeline.model
        panel = getattr(viewer, "control_panel", None)
        if panel is not None and getattr(model.device, "type", str(model.device)) == "cpu":
            panel._max_res.value = min(panel._max_res.value, CPU_STILL_SIDE)
        if panel is not None:
            model.shown_outputs = lambda: shown_outputs(panel)
        model.ignore_camera_index(int(getattr(viewer, "current_camera_idx", 0)))
        viewer.config.max_num_display_images = 1
        init_scene = viewer.init_scene

        def init_scene_with_one_frustum(*args, **kwargs):
            init_scene(*args, **kwargs)
            self.update_frustum()

        viewer.init_scene = init_scene_with_one_frustum
        guard_viewer_messages()
        viewer.viser_server.on_client_connect(self.on_connect)
        self._splats.attach(viewer.viser_server, VISER_NERFSTUDIO_SCALE_RATIO)
        threading.Thread(target=self._watch, name="vq3d-viewer-watch", daemon=True).start()

    def input_view(self) -> Tuple[Tuple[float, float, float], float]:
        """The canonical camera in viser's frame: its position and vertical field of view (radians)."""
        model = self._pipeline.model
        return (0.0, 0.0, model.camera_distance * VISER_NERFSTUDIO_SCALE_RATIO), math.radians(model.fov_deg)

    def on_connect(self, client) -> None:
        """A new client: to the input view, and follow its camera (see :meth:`camera_moved`)."""
        client.camera.on_update(self.camera_moved)
        self.to_input_view(client)

    def to_input_view(self, client) -> None:
        position, fov = self.input_view()
        with client.atomic():
            client.camera.up_direction = (0.0, 1.0, 0.0)
            client.camera.position = position
            client.camera.look_at = (0.0, 0.0, 0.0)
            client.camera.fov = fov

    def camera_moved(self, camera) -> None:
        """Hide the frustum while a camera is at the input view: its image plane would fill the view
        in front of the render. Elsewhere it shows, unless "Hide Train Cams" hid the cameras."""
        viewer = self._viewer
        if viewer is None or not getattr(viewer, "camera_handles", None):
            return
        position, _ = self.input_view()
        at_input = float(np.linalg.norm(np.asarray(camera.position) - np.asarray(position))) < FRUSTUM_HIDE_DISTANCE * VISER_NERFSTUDIO_SCALE_RATIO
        shown = not at_input and getattr(getattr(viewer, "hide_images", None), "visible", True)
        for handle in viewer.camera_handles.values():
            if handle.visible != shown:
                handle.visible = shown

    def to_input_view_all(self) -> None:
        if self._viewer is not None:
            for client in self._viewer.viser_server.get_clients().values():
                self.to_input_view(client)

    def update_frustum(self) -> None:
        """The one training-camera frustum, at the canonical camera, showing the shown image."""
        viewer = self._viewer
        if viewer is None or not getattr(viewer, "camera_handles", None):
            return
        model = self._pipeline.model
        image = model.scene.image
        picture = None
        if image is not None:
            picture = (image[0].permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy()
        for idx, old in list(viewer.camera_handles.items()):
            handle = viewer.viser_server.scene.add_camera_frustum(
                name=f"/cameras/camera_{idx:05d}", fov=math.radians(model.fov_deg), aspect=1.0,
                scale=viewer.config.camera_frustum_scale, image=picture, wxyz=old.wxyz, position=old.position,
                visible=old.visible,
            )
            handle.on_click(lambda event: self.to_input_view(event.client))
            viewer.camera_handles[idx] = handle

    # ---- the watcher: status, frustum and splats follow the shown scene -----------------------
    def _watch(self) -> None:
        while True:
            time.sleep(0.25)
            try:
                self.poll()
            except Exception as err:  # a viewer thread must not die; say what happened
                self._status.value = f"status unavailable: {type(err).__name__}: {err}"

    def compile_density_pass(self, delay: float = COMPILE_DELAY_S) -> None:
        """On a CPU with the baked field, start compiling the density passes in the background
        (:data:`COMPILED_DENSITY_PASS`), ``delay`` seconds after the first scene is shown: the compile
        (~26 s of the same cores the first time, ~7 s with torch's compile cache) started at once took
        the first picture from 3.2 to 4.7 s (benchmarks/viewer_latency.py, median of 3). ``VQ3D_NO_COMPILE=1`` turns it off (the test
        suite: a pass turning compiled mid-test would change a render by float rounding)."""
        model = self._pipeline.model
        if os.environ.get("VQ3D_NO_COMPILE", "") not in ("", "0"):
            return
        if getattr(model.device, "type", str(model.device)) == "cpu" and model.config.inference_field == "baked":
            cfg = model.config  # the coarse pass's intervals, and the fine pass's (coarse + PDF samples + 1)
            samples = (cfg.coarse_samples_per_ray, cfg.coarse_samples_per_ray + cfg.fine_samples_per_ray + 1)
            if delay <= 0:
                COMPILED_DENSITY_PASS.start(model.field.layout, samples)
            elif self._compile_timer is None:
                self._compile_timer = threading.Timer(delay, COMPILED_DENSITY_PASS.start, (model.field.layout, samples))
                self._compile_timer.daemon = True
                self._compile_timer.start()

    def poll(self) -> None:
        """Act on a new shown scene once its tri-planes exist: after its first frame, or at once
        while the NeRF render idles for the splats."""
        model = self._pipeline.model
        scene = model.scene
        if scene is self._scene:
            return
        if scene.planes is None:
            if not self._splats.on:
                return
            model.current_planes()
            scene = model.scene
        self._scene = scene
        self.compile_density_pass()
        seconds = getattr(scene, "encode_seconds", None)
        self._status.value = f"encoded in {seconds * 1000:.0f} ms" if seconds is not None else "shown"
        self.update_frustum()
        self._splats.scene_changed()


def shown_outputs(panel) -> Set[str]:
    """The outputs nerfstudio's control panel shows now: the chosen one, and the split view's while
    the split is on (what :attr:`Vq3dModel.shown_outputs` asks for)."""
    shown = {panel.output_render}
    if panel.split:
        shown.add(panel.split_output_render)
    return shown


class SceneControls:
    """The controls, bound to a pipeline (``pipeline.model`` shows scenes, ``pipeline.load_image``
    reads dataset images). Instances are attributes of the pipeline, where the viewer finds them."""

    def __init__(self, pipeline) -> None:
        self._pipeline = pipeline
        self.split = ViewerDropdown("Image split", "eval", ["eval", "train"], cb_hook=self._on_pick,
                                    hint="held-out (eval) or training images")
        self.index = ViewerNumber("Image index", 0, cb_hook=self._on_pick, hint="which image of the split to show")
        self.random = ViewerButton("Random image", cb_hook=self._on_random)
        self.upload = ViewerUploadButton("Upload a photo", cb_hook=self._on_upload,
                                         hint="any photo: encoded at once, its NeRF is shown")
        split, index = pipeline.model.default_scene
        first = self._label(split, index) if split in ("train", "eval") else "the photo VQ3D_SCENE names"
        self.shown = ViewerText("Shown", first, disabled=True, hint="the image whose NeRF is shown")
        self.status = ViewerText("Status", "", disabled=True, hint="how long the shown scene took to encode; splats")

    # ---- callbacks (run in viser's thread; the viewer re-renders afterwards) --------------------
    def _split_size(self, split: str) -> int:
        datamanager = self._pipeline.datamanager
        dataset = datamanager.train_dataset if split == "train" else datamanager.eval_dataset
        return len(dataset) if dataset is not None else 0

    def _label(self, split: str, index: int) -> str:
        datamanager = self._pipeline.datamanager
        dataset = datamanager.train_dataset if split == "train" else datamanager.eval_dataset
        meta = getattr(dataset, "metadata", None) or {}
        names, ids = meta.get("class_names") or [], meta.get("class_ids") or []
        text = f"{'held-out' if split == 'eval' else 'training'} image {index}"
        if index < len(ids) and 0 <= ids[index] < len(names):
            text += f", class {names[ids[index]]}"
        return text

    def _on_pick(self, _element=None) -> None:
        split, index = self.split.value, int(self.index.value)
        count = self._split_size(split)
        if not 0 <= index < count:
            self.shown.value = f"no {split} image {index}: the {split} split has {count} images (0-{count - 1})"
            return
        try:
            self._pipeline.model.show_image(split, index)
        except ValueError as err:  # DatasetError: the file is bad; the previous scene stays
            self.shown.value = f"cannot show {split} image {index}: {err}; still showing the previous image"
            return
        self.shown.value = self._label(split, index)

    def _on_random(self, _element=None) -> None:
        count = self._split_size(self.split.value)
        if count:
            self.index.value = random.randrange(count)  # its update callback shows the image
            self._on_pick()

    def _on_upload(self, element) -> None:
        file = element.uploaded if isinstance(element, ViewerUploadButton) else None
        if file is None:
            return
        try:
            image = decode_upload(file.name, file.content, self._pipeline.model.config.image_size)
        except ValueError as err:
            self.shown.value = f"upload refused: {err}; still showing the previous image"
            return
        self._pipeline.model.set_scene_images(image, key=("upload", 0))
        self.shown.value = f"uploaded photo {file.name}"


class SampleControls:
    """Stage-2 controls, present when the pipeline is given a stage-2 checkpoint: a class box (id,
    class name or 'none'), guidance and temperature, and a "Sample a scene" button that draws a new
    code grid and shows the NeRF it decodes to. Each click draws with the next seed (1, 2, ...), shown
    in the "Shown" line, so a scene can be reproduced with ``vq3d sample --seed``."""

    def __init__(self, pipeline, stage2_checkpoint, shown: ViewerText) -> None:
        self._pipeline = pipeline
        self._checkpoint = stage2_checkpoint
        self._shown = shown
        self._sampler = None
        self.draws = 0
        self.class_label = ViewerText("Sample class", "0", hint="class id, class name, or 'none' (unconditional)")
        self.guidance = ViewerNumber("Guidance scale", 1.0, hint="classifier-free guidance: 1 = none, higher follows the class more")
        self.temperature = ViewerNumber("Temperature", 1.0, hint="below 1: safer samples; 0: always the most likely code")
        self.button = ViewerButton("Sample a scene", cb_hook=self._on_sample)

    def sampler(self):
        if self._sampler is None:
            self._sampler = SceneSampler.from_checkpoint(self._checkpoint, self._pipeline.model)
        return self._sampler

    def _on_sample(self, _element=None) -> None:
        import torch

        try:
            sampler = self.sampler()
            class_id = sampler.resolve(self.class_label.value)
        except (CheckpointError, SampleError) as err:
            self._shown.value = f"cannot sample: {err}"
            return
        self.draws += 1
        settings = SamplingSettings(temperature=float(self.temperature.value), cfg_scale=float(self.guidance.value))
        codes = sampler.sample(class_id, 1, settings, torch.Generator().manual_seed(self.draws))
        self._pipeline.model.set_scene_indices(codes[0], key=("sample", self.draws))
        name = class_label_name(class_id, sampler.class_names, sampler.num_classes)
        self._shown.value = f"stage-2 sample of {name} (seed {self.draws})"


class EditControls:
    """Scene edits, live: remember the shown scene as A or B, then move a slider between their NeRFs
    (interpolation) or place B's NeRF into A's (object insertion) at a position and scale. Each
    change re-renders; the "Shown" line says what is on screen."""

    def __init__(self, pipeline, shown: ViewerText) -> None:
        from nerfstudio.viewer.viewer_elements import ViewerCheckbox, ViewerSlider, ViewerVec3

        self._pipeline = pipeline
        self._shown = shown
        self.ends = {}
        self.set_a = ViewerButton("Remember shown scene as A", cb_hook=lambda _: self._remember("A"))
        self.set_b = ViewerButton("Remember shown scene as B", cb_hook=lambda _: self._remember("B"))
        self.blend = ViewerSlider("A -> B", 0.0, 0.0, 1.0, 0.05, cb_hook=self._on_blend,
                                  hint="interpolate between the NeRFs of A and B")
        self.space = ViewerDropdown("Blend in", "latent", ["latent", "triplane", "codes"], cb_hook=self._on_blend,
                                    hint="latent: smooth, exact at the ends; triplane: features; codes: snapped (jumps)")
        self.place = ViewerCheckbox("Place B into A", False, cb_hook=self._on_place,
                                    hint="insert B's NeRF (a box around its pivot) into A's scene")
        self.position = ViewerVec3("Object position", (0.0, 0.0, 0.5), step=0.05, cb_hook=self._on_place,
                                   hint="where B's pivot goes; the camera is at (0, 0, 2)")
        self.scale = ViewerNumber("Object scale", 0.5, cb_hook=self._on_place, hint="B's size relative to its own NeRF")

    def _remember(self, name: str) -> None:
        model = self._pipeline.model
        image = model.scene.image
        if image is not None:
            self.ends[name] = encode_image(model, image[0].permute(1, 2, 0))
        else:  # a sample or an edit: only its tri-planes are known (latent blending falls back to them)
            planes = model.current_planes()
            self.ends[name] = EncodedImage(None, None, planes.clone())
        self._shown.value = f"remembered the shown scene as {name}"

    def _ready(self) -> bool:
        missing = [n for n in ("A", "B") if n not in self.ends]
        if missing:
            self._shown.value = f"remember a scene as {' and '.join(missing)} first (the buttons above)"
        return not missing

    def _on_blend(self, _element=None) -> None:
        if not self._ready():
            return
        a, b = self.ends["A"], self.ends["B"]
        space = self.space.value if a.latents is not None and b.latents is not None else "triplane"
        if space == "codes" and not self._pipeline.model.quantizer.has_codes:
            space = "latent"  # continuous tokens (no-quantizer): no codes to snap to
        t = float(self.blend.value)
        self._pipeline.model.set_scene_planes(interpolate(self._pipeline.model, a, b, t, space), key=("blend", 0))
        self._shown.value = f"A -> B at t = {t:.2f} ({space})"

    def _on_place(self, _element=None) -> None:
        if not self.place.value:
            return
        if not self._ready():
            return
        scale = float(self.scale.value)
        if scale <= 0:
            self._shown.value = "object scale must be positive"
            return
        placement = Placement(
            self.ends["B"].planes, tuple(float(v) for v in self.position.value), scale,
            camera=self._pipeline.model.canonical_camera,
        )
        self._pipeline.model.set_scene_planes(self.ends["A"].planes, key=("composite", 0), composition=placement)
        self._shown.value = f"B placed into A at {tuple(round(float(v), 2) for v in self.position.value)}, scale {scale:g}"


class SplatControls:
    """The shown scene as 3D Gaussians that the browser draws (viser's splat renderer, on the
    viewer's own GPU): orbiting needs no server render at all. While "Splats (browser)" is on the
    splats are rebuilt after each scene change (upload, index, sample, edit) in a background thread,
    with ``vq3d export-splats``'s code and defaults, and the server-side NeRF render idles (a blank
    frame at the far plane). The NeRF view stays the default and the reference."""

    NAME = "/vq3d/splats"

    def __init__(self, pipeline, status: ViewerText, settings=None) -> None:
        from nerfstudio.viewer.viewer_elements import ViewerCheckbox

        self._pipeline = pipeline
        self._status = status
        # the sky pulled in to 8 units, not export-splats' 50: the browser's far plane clips it there
        self.settings = settings or SplatSettings(background_radius=VIEWER_SKY_RADIUS)
        self.toggle = ViewerCheckbox("Splats (browser)", False, cb_hook=self._on_toggle,
                                     hint="draw the scene as 3D Gaussians in the browser; the server renders nothing")
        self._server = None
        self._scale = 1.0
        self._handle = None
        self._built_for = None
        self._lock = threading.Lock()
        self.count = 0
        self.bytes = 0
        self.build_seconds = None

    def attach(self, server, scale: float) -> None:
        """The viser server to draw on, and its units per world unit."""
        self._server, self._scale = server, scale

    @property
    def on(self) -> bool:
        return bool(self.toggle.value)

    def _on_toggle(self, _element=None) -> None:
        self._pipeline.model.idle_render = self.on
        if self._handle is not None:
            self._handle.visible = self.on
        if self.on:
            self.scene_changed()

    def scene_changed(self) -> None:
        """Rebuild for the shown scene in the background, when on and not built for it yet."""
        if self.on and self._pipeline.model.scene is not self._built_for:
            threading.Thread(target=self.build, name="vq3d-splats", daemon=True).start()

    def build(self) -> None:
        """Splats of the shown scene, sent to the browser (one build at a time)."""
        with self._lock:
            model = self._pipeline.model
            scene = model.scene
            if scene is self._built_for:
                return
            self._status.value = "building splats..."
            start = time.perf_counter()
            planes = model.current_planes()
            field = model.shown_field(planes)  # the baked field (quick), with any placed object
            gaussians, _ = gaussians_from_nerf(model, planes, self.settings, field=field)
            s = self._scale
            centers = (gaussians.means * s).cpu().numpy().astype("float32")
            covs = (covariances(gaussians.quats, gaussians.scales) * s * s).cpu().numpy().astype("float32")
            rgbs = gaussians.colors.cpu().numpy().astype("float32")
            opacities = gaussians.opacities[:, None].cpu().numpy().astype("float32")
            if self._server is not None:
                scene_api = self._server.scene
                add = getattr(scene_api, "add_gaussian_splats", None) or scene_api._add_gaussian_splats
                self._handle = add(self.NAME, centers=centers, covariances=covs, rgbs=rgbs, opacities=opacities)
                self._handle.visible = self.on
            self._built_for = scene
            self.count = len(gaussians)
            self.bytes = sum(a.nbytes for a in (centers, covs, rgbs, opacities))
            self.build_seconds = time.perf_counter() - start
            self._status.value = (f"{self.count} splats ({self.bytes / 2**20:.1f} MB) built in "
                                  f"{self.build_seconds:.1f} s")

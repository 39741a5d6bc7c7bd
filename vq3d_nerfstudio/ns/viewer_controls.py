"""VQ3D's controls in nerfstudio's web viewer: which image's NeRF is shown.

nerfstudio's viewer installs every ``ViewerElement`` it finds on the pipeline under "Custom
Elements" and re-renders after each callback. These pick the shown scene: a split and an image index
(held-out "eval" or "train" images), a random-image button, an upload button that takes any photo
and shows its NeRF at once, and a read-only line naming the shown image and its class when known.
Clicking a training camera frustum also picks that image (the model handles ``cam_idx``).
"""

from __future__ import annotations

import io
import random
from typing import Callable, Optional

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
from vq3d_nerfstudio.stage1.edits import EncodedImage, Placement, encode_image, interpolate
from vq3d_nerfstudio.stage2.checkpoint import CheckpointError
from vq3d_nerfstudio.stage2.sample import SampleError, SamplingSettings, SceneSampler, class_label_name

MAX_UPLOAD_BYTES = 25 * 2**20
"""Uploads larger than this are refused (a photo for a 256 px model needs far less)."""
MAX_UPLOAD_PIXELS = 50_000_000
"""... and so are images with more pixels than this (decompression bombs)."""


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


class CpuViewerDefaults(ViewerControl):
    """On a CPU, start the viewer's "Max res" at twice the model's input size instead of 512 px: a
    512 px still of `vq3d-tiny` would take ~14 s on 2 cores, 128 px ~0.8 s (scaled from the 64 and
    256 px frame times in BENCHMARKS.md). Raise it in Render Options when you want more pixels."""

    def __init__(self, pipeline) -> None:
        super().__init__()
        self._pipeline = pipeline

    def _setup(self, viewer) -> None:
        super()._setup(viewer)
        model = self._pipeline.model
        panel = getattr(viewer, "control_panel", None)
        if panel is not None and getattr(model.device, "type", str(model.device)) == "cpu":
            panel._max_res.value = min(panel._max_res.value, 2 * model.config.image_size)


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
        self.shown = ViewerText("Shown", "held-out image 0", disabled=True, hint="the image whose NeRF is shown")

    # ---- callbacks (run in viser's thread; the viewer re-renders afterwards) --------------------
    def _split_size(self, split: str) -> int:
        datamanager = self._pipeline.datamanager
        dataset = datamanager.train_dataset if split == "train" else datamanager.eval_dataset
        return len(dataset) if dataset is not None else 0

    def _label(self, split: str, index: int) -> str:
        datamanager = self._pipeline.datamanager
        dataset = datamanager.train_dataset if split == "train" else datamanager.eval_dataset
        meta = dataset.metadata if dataset is not None else {}
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
        placement = Placement(self.ends["B"].planes, tuple(float(v) for v in self.position.value), scale)
        self._pipeline.model.set_scene_planes(self.ends["A"].planes, key=("composite", 0), composition=placement)
        self._shown.value = f"B placed into A at {tuple(round(float(v), 2) for v in self.position.value)}, scale {scale:g}"

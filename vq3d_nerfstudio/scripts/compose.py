"""``vq3d compose``: place one photo's object into another photo's scene, render novel views."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import tyro

from vq3d_nerfstudio.checks import OutputDir, PositiveFloat
from vq3d_nerfstudio.scripts.common import Flat, ModelSource, OrbitLoop, reworded

ComposeOrbit = reworded(
    OrbitLoop, num_frames="Frames in the orbit video.",
    max_yaw_deg="Largest yaw of the orbit and of the novel views (degrees).",
)


@dataclass
class Compose:
    """Build the NeRF of a scene photo and of an object photo, place the object's NeRF (the part in a
    box around its pivot, and inside its foreground mask when given) at --position with --scale,
    and render the composite: densities add and colours are density-weighted per sample, so the
    object hides what is behind it and is hidden by what is in front. Writes composite_orbit.mp4,
    composite_disparity.mp4 and composite_views.png (scene | object | composite from the input view
    | composite from +/- the largest yaw | its disparity) into the output folder."""

    scene: Path
    """Photo of the scene."""
    object: Path
    """Photo of the object (its NeRF's pivot, the centre of the view at the camera distance, is what
    --position places)."""
    source: Flat[ModelSource] = field(default_factory=ModelSource)
    position: Tuple[float, float, float] = (0.0, 0.0, 0.5)
    """Where the object's pivot goes in the scene, world units (the camera is at (0, 0, 2) looking at
    the origin; +x right, +y up, +z towards the camera)."""
    scale: PositiveFloat = 0.5
    """Object size relative to its own NeRF."""
    object_box: Tuple[float, float, float, float, float, float] = (-0.6, -0.6, -0.6, 0.6, 0.6, 0.6)
    """The part of the object's NeRF that is kept: x0 y0 z0 x1 y1 z1 in its own frame (pivot at the
    origin, +y up, world units). Raise y0 to cut off the ground the object stands on (in `vq3d synth`
    scenes the ground is at y = -0.5)."""
    object_mask: Optional[Path] = None
    """Foreground mask of the object photo (white = object; same framing as the photo): keep only
    what lies inside it, e.g. from a segmentation tool."""
    output_dir: OutputDir = Path("composite")
    """Where the outputs go (created if missing)."""
    orbit: Flat[ComposeOrbit] = field(default_factory=ComposeOrbit)

    def main(self) -> None:
        import numpy as np
        import torch
        from PIL import Image
        from rich.progress import Progress

        from vq3d_nerfstudio.data.dataset import center_crop_box, load_image
        from vq3d_nerfstudio.errors import DatasetError
        from vq3d_nerfstudio.export.video import colorize_disparity, render_frames, to_uint8, write_image, write_video
        from vq3d_nerfstudio.geometry.cameras import orbit_cameras
        from vq3d_nerfstudio.stage1.edits import Placement, encode_image

        box = tuple(self.object_box)
        if self.scale <= 0 or any(lo >= hi for lo, hi in zip(box[:3], box[3:])):
            raise SystemExit("vq3d compose: error: --scale must be positive and --object-box x0 y0 z0 x1 y1 z1 needs x0 < x1, y0 < y1, z0 < z1")
        model = self.source.load("compose").model
        size = self.orbit.size(model)
        try:
            scene = encode_image(model, load_image(self.scene, model.config.image_size))
            obj = encode_image(model, load_image(self.object, model.config.image_size))
        except DatasetError as err:
            raise SystemExit(f"vq3d compose: error: {err}") from None
        mask = None
        if self.object_mask is not None:
            try:
                with Image.open(self.object_mask) as pil:
                    pil = pil.convert("L")
                    pil = pil.crop(center_crop_box(*pil.size)).resize((size, size), Image.Resampling.NEAREST)
                    mask = torch.from_numpy(np.asarray(pil) > 127)
            except OSError as err:
                raise SystemExit(f"vq3d compose: error: {self.object_mask}: cannot read the mask ({err})") from None
            if not mask.any():
                raise SystemExit(f"vq3d compose: error: {self.object_mask}: the mask is empty (white marks the object)")
        placement = Placement(obj.planes, tuple(self.position), self.scale, box, mask, model.canonical_camera)
        yaw = self.orbit.max_yaw_deg
        views = [(0.0, 0.0), (-yaw, 0.0), (yaw, 0.0)]
        orbit = self.orbit.loop()
        cameras = orbit_cameras(views + orbit, size, model.camera_distance, model.fov_deg).to(model.device)
        with Progress() as progress:
            task = progress.add_task("Rendering the composite", total=2 + len(views) + len(orbit))
            model.set_scene_planes(scene.planes)
            scene_rgb = model.get_outputs_for_camera(cameras[0:1])["rgb"].clamp(0, 1).cpu()
            progress.advance(task)
            model.set_scene_planes(obj.planes)
            object_rgb = model.get_outputs_for_camera(cameras[0:1])["rgb"].clamp(0, 1).cpu()
            progress.advance(task)
            model.set_scene_planes(scene.planes, key=("composite", 0), composition=placement)
            rgb, disparity = render_frames(model, cameras, on_frame=lambda: progress.advance(task))
        disp_rgb = colorize_disparity(disparity)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        strip = torch.cat([scene_rgb, object_rgb, rgb[0], rgb[1], rgb[2], disp_rgb[2]], dim=1)
        write_image(self.output_dir / "composite_views.png", to_uint8(strip))
        write_video(self.output_dir / "composite_orbit.mp4", rgb[len(views):], self.orbit.fps)
        write_video(self.output_dir / "composite_disparity.mp4", disp_rgb[len(views):], self.orbit.fps)
        print(f"Wrote composite_views.png, composite_orbit.mp4 and composite_disparity.mp4 to {self.output_dir}")


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.common import run

    run(tyro.cli(Compose), "compose")

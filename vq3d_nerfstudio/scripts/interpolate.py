"""``vq3d interpolate``: a video through the scenes between two photos' NeRFs, the camera orbiting."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Literal

import tyro

from vq3d_nerfstudio.checks import OutputDir, ranged
from vq3d_nerfstudio.scripts.common import Flat, ModelSource, Orbit


@dataclass
class Interpolate:
    """Encode two photos, walk from the first one's NeRF to the second's and back while the camera
    orbits, and write into the output folder: interpolation.mp4 and interpolation_disparity.mp4,
    and interpolation_strip.png (canonical views at t = 0, 1/4, 1/2, 3/4, 1)."""

    images: List[Path]
    """Exactly two photos: the start and the end."""
    source: Flat[ModelSource] = field(default_factory=ModelSource)
    output_dir: OutputDir = Path("interpolation")
    """Where the outputs go (created if missing)."""
    steps: ranged(int, 2) = 48
    """Frames from the first scene to the second (the video then comes back: 2 x steps frames)."""
    # stage1.edits.InterpolationSpace, spelled out: importing it loads torch and nerfstudio before
    # the options are parsed (tests/test_edits.py checks the two agree)
    space: Literal["latent", "triplane", "codes"] = "latent"
    """latent: the continuous encoder latent (smooth; the ends are exactly the two reconstructions);
    triplane: blend the tri-plane features; codes: snap the blended latent to codes (jumpy, for comparison)."""
    orbit: Flat[Orbit] = field(default_factory=lambda: Orbit(max_yaw_deg=15.0, max_elevation_deg=5.0))

    def main(self) -> None:
        import numpy as np
        from rich.progress import Progress

        from vq3d_nerfstudio.data.dataset import load_image
        from vq3d_nerfstudio.errors import DatasetError
        from vq3d_nerfstudio.export.video import colorize_disparity, to_uint8, write_image, write_video
        from vq3d_nerfstudio.geometry.cameras import orbit_cameras
        from vq3d_nerfstudio.stage1.edits import encode_image, interpolate

        if len(self.images) != 2:
            raise SystemExit(f"vq3d interpolate: error: --images takes exactly two photos, got {len(self.images)}")
        model = self.source.load("interpolate").model
        if self.space == "codes" and not model.quantizer.has_codes:
            raise SystemExit("vq3d interpolate: error: --space codes needs codes, and this run has continuous tokens "
                             "(no-quantizer); use --space latent or triplane")
        try:
            ends = [encode_image(model, load_image(path, model.config.image_size)) for path in self.images]
        except DatasetError as err:
            raise SystemExit(f"vq3d interpolate: error: {err}") from None
        size = self.orbit.size(model)
        ts = [i / (self.steps - 1) for i in range(self.steps)]
        ts = ts + ts[::-1]
        poses = self.orbit.path(len(ts))
        cameras = orbit_cameras(poses, size, model.camera_distance, model.fov_deg).to(model.device)
        canonical = orbit_cameras([(0.0, 0.0)], size, model.camera_distance, model.fov_deg).to(model.device)
        rgb, disparity = [], []
        with Progress() as progress:
            task = progress.add_task("Rendering the interpolation", total=len(ts) + 5)
            for i, t in enumerate(ts):
                model.set_scene_planes(interpolate(model, ends[0], ends[1], t, self.space), key=("interpolation", i))
                out = model.get_outputs_for_camera(cameras[i : i + 1])
                rgb.append(out["rgb"].clamp(0, 1).cpu())
                disparity.append(out["disparity"].cpu())
                progress.advance(task)
            strip = []
            for t in (0.0, 0.25, 0.5, 0.75, 1.0):
                model.set_scene_planes(interpolate(model, ends[0], ends[1], t, self.space))
                strip.append(to_uint8(model.get_outputs_for_camera(canonical)["rgb"].clamp(0, 1).cpu()))
                progress.advance(task)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_video(self.output_dir / "interpolation.mp4", rgb, self.orbit.fps)
        write_video(self.output_dir / "interpolation_disparity.mp4", colorize_disparity(disparity), self.orbit.fps)
        write_image(self.output_dir / "interpolation_strip.png", np.concatenate(strip, axis=1))
        print(f"Wrote interpolation.mp4, interpolation_disparity.mp4 and interpolation_strip.png to {self.output_dir}")


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.common import run

    run(tyro.cli(Interpolate), "interpolate")

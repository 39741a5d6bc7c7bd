"""``vq3d render-orbit``: orbit and disparity videos of one image's NeRF from a trained checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tyro

from vq3d_nerfstudio.checks import OutputDir
from vq3d_nerfstudio.scripts.common import Flat, ImageChoice, ModelSource, OrbitLoop, reworded

RenderOrbitLoop = reworded(
    OrbitLoop, num_frames="Frames in the loop.",
    max_yaw_deg="Largest yaw of the orbit (degrees); VQ3D supports limited camera motion around the input view.",
)


@dataclass
class RenderOrbit:
    """Render an orbit video, a disparity video and the canonical view of one image's NeRF: a dataset
    image (--split/--image-index) or any photo (--image)."""

    source: Flat[ModelSource] = field(default_factory=ModelSource)
    output_dir: OutputDir = Path("renders")
    """Where to write <split>_<index>_orbit.mp4, _disparity.mp4, _canonical.png and _input.png."""
    input: Flat[ImageChoice] = field(default_factory=ImageChoice)
    orbit: Flat[RenderOrbitLoop] = field(default_factory=RenderOrbitLoop)

    def main(self) -> None:
        from rich.progress import Progress

        from vq3d_nerfstudio.export.video import colorize_disparity, render_frames, to_uint8, write_image, write_video
        from vq3d_nerfstudio.geometry.cameras import orbit_cameras

        loaded = self.source.load("render-orbit")
        model = loaded.model
        image, stem_name = self.input.load(loaded, "render-orbit")
        model.set_scene_images(image)
        poses = [(0.0, 0.0)] + self.orbit.loop()
        cameras = orbit_cameras(poses, self.orbit.size(model), model.camera_distance, model.fov_deg).to(model.device)
        with Progress() as progress:
            task = progress.add_task("Rendering orbit", total=len(poses))
            rgb, disparity = render_frames(model, cameras, on_frame=lambda: progress.advance(task))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = self.output_dir / stem_name
        write_image(f"{stem}_input.png", to_uint8(image))
        write_image(f"{stem}_canonical.png", to_uint8(rgb[0]))
        write_video(f"{stem}_orbit.mp4", rgb[1:], self.orbit.fps)
        write_video(f"{stem}_disparity.mp4", colorize_disparity(disparity[1:]), self.orbit.fps)
        print(f"Wrote {stem}_orbit.mp4, {stem}_disparity.mp4, {stem}_canonical.png and {stem}_input.png")


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.common import run

    run(tyro.cli(RenderOrbit), "render-orbit")

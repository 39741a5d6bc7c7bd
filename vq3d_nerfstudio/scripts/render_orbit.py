"""``vq3d render-orbit``: orbit and disparity videos of one image's NeRF from a trained checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import tyro

from vq3d_nerfstudio.checks import OutputDir, PositiveInt


@dataclass
class RenderOrbit:
    """Render an orbit video, a disparity video and the canonical view of one image's NeRF: a dataset
    image (--split/--image-index) or any photo (--image)."""

    load_config: Path
    """The run's config.yml (outputs/<experiment>/vq3d-tiny/<timestamp>/config.yml)."""
    output_dir: OutputDir = Path("renders")
    """Where to write <split>_<index>_orbit.mp4, _disparity.mp4, _canonical.png and _input.png."""
    split: Literal["eval", "train"] = "eval"
    """Which split the image comes from; eval images were held out of training."""
    image_index: int = 0
    """Index of the image within the split."""
    image: Optional[Path] = None
    """Any photo instead of a dataset image (centre-cropped and resized to the model's size);
    outputs are then named after the file."""
    num_frames: PositiveInt = 48
    """Frames in the loop."""
    fps: PositiveInt = 24
    """Video frame rate."""
    max_yaw_deg: float = 20.0
    """Largest yaw of the orbit (degrees); VQ3D supports limited camera motion around the input view."""
    max_elevation_deg: float = 8.0
    """Largest elevation of the orbit (degrees)."""
    resolution: int = 0
    """Render size in pixels; 0 uses the model's image size."""

    def main(self) -> None:
        import imageio.v2 as imageio
        from nerfstudio.utils.eval_utils import eval_setup
        from rich.progress import Progress

        from vq3d_nerfstudio.orbit import colorize_disparity, orbit_cameras, orbit_path, render_frames, to_uint8, write_video

        if not self.load_config.exists():
            raise SystemExit(f"vq3d render-orbit: error: {self.load_config} does not exist; pass the run's config.yml")
        _, pipeline, _, _ = eval_setup(self.load_config, test_mode="inference")
        model = pipeline.model
        from vq3d_nerfstudio.data.dataparser import DatasetError
        from vq3d_nerfstudio.data.dataset import load_image

        try:
            if self.image is not None:
                image = load_image(self.image, model.config.image_size)
                stem_name = self.image.stem
            else:
                image = pipeline.load_image(self.split, self.image_index)
                stem_name = f"{self.split}_{self.image_index:05d}"
        except (IndexError, DatasetError) as err:
            raise SystemExit(f"vq3d render-orbit: error: {err}") from None
        model.set_scene_images(image)
        size = self.resolution or model.config.image_size
        poses = [(0.0, 0.0)] + orbit_path(self.num_frames, self.max_yaw_deg, self.max_elevation_deg)
        cameras = orbit_cameras(poses, size, model.camera_distance, model.fov_deg).to(model.device)
        with Progress() as progress:
            task = progress.add_task("Rendering orbit", total=len(poses))
            rgb, disparity = render_frames(model, cameras, on_frame=lambda: progress.advance(task))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = self.output_dir / stem_name
        imageio.imwrite(f"{stem}_input.png", to_uint8(image))
        imageio.imwrite(f"{stem}_canonical.png", to_uint8(rgb[0]))
        write_video(f"{stem}_orbit.mp4", rgb[1:], self.fps)
        write_video(f"{stem}_disparity.mp4", colorize_disparity(disparity[1:]), self.fps)
        print(f"Wrote {stem}_orbit.mp4, {stem}_disparity.mp4, {stem}_canonical.png and {stem}_input.png")


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.cli import run

    run(tyro.cli(RenderOrbit))

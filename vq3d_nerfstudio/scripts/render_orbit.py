"""``vq3d render-orbit``: orbit and disparity videos of one image's NeRF from a trained checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import tyro


@dataclass
class RenderOrbit:
    """Render an orbit video, a disparity video and the canonical view of one image's NeRF: a dataset
    image (--split/--image-index) or any photo (--image)."""

    load_config: Path
    """The run's config.yml (outputs/<experiment>/vq3d-tiny/<timestamp>/config.yml)."""
    output_dir: Path = Path("renders")
    """Where to write <split>_<index>_orbit.mp4, _disparity.mp4, _canonical.png and _input.png."""
    split: Literal["eval", "train"] = "eval"
    """Which split the image comes from; eval images were held out of training."""
    image_index: int = 0
    """Index of the image within the split."""
    image: Optional[Path] = None
    """Any photo instead of a dataset image (centre-cropped and resized to the model's size);
    outputs are then named after the file."""
    num_frames: int = 48
    """Frames in the loop."""
    fps: int = 24
    """Video frame rate."""
    max_yaw_deg: float = 20.0
    """Largest yaw of the orbit (degrees); VQ3D supports limited camera motion around the input view."""
    max_elevation_deg: float = 8.0
    """Largest elevation of the orbit (degrees)."""
    resolution: int = 0
    """Render size in pixels; 0 uses the model's image size."""

    def main(self) -> None:
        import imageio.v2 as imageio
        import numpy as np
        import torch
        from nerfstudio.utils.eval_utils import eval_setup
        from rich.progress import track

        from vq3d_nerfstudio.orbit import orbit_cameras, orbit_path

        if not self.load_config.exists():
            raise SystemExit(f"vq3d render-orbit: error: {self.load_config} does not exist; pass the run's config.yml")
        _, pipeline, _, _ = eval_setup(self.load_config, test_mode="inference")
        model = pipeline.model
        dataparser = pipeline.config.datamanager.dataparser
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
        cameras = orbit_cameras(poses, size, dataparser.camera_distance, dataparser.fov_deg).to(model.device)
        rgb_frames, disp_frames = [], []
        for i in track(range(len(poses)), description="Rendering orbit"):
            outputs = model.get_outputs_for_camera(cameras[i : i + 1])
            rgb_frames.append(outputs["rgb"].clamp(0, 1).cpu())
            disp_frames.append(outputs["disparity"][..., 0].cpu())
        disp_max = float(torch.stack(disp_frames).max().clamp_min(1e-6))
        to_u8 = lambda x: (x.numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)  # noqa: E731
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = self.output_dir / stem_name
        imageio.imwrite(f"{stem}_input.png", to_u8(image))
        imageio.imwrite(f"{stem}_canonical.png", to_u8(rgb_frames[0]))
        from nerfstudio.utils import colormaps

        disp_rgb = [colormaps.apply_colormap((d / disp_max)[..., None]) for d in disp_frames[1:]]
        for name, frames in (("orbit", rgb_frames[1:]), ("disparity", disp_rgb)):
            imageio.mimwrite(f"{stem}_{name}.mp4", [to_u8(f) for f in frames], fps=self.fps, macro_block_size=1)
        print(f"Wrote {stem}_orbit.mp4, {stem}_disparity.mp4, {stem}_canonical.png and {stem}_input.png")


if __name__ == "__main__":
    tyro.cli(RenderOrbit).main()

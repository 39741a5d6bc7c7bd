"""``vq3d reconstruct``: photos -> NeRFs (one forward pass each) -> videos, views and point clouds."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import tyro

from vq3d_nerfstudio.checks import NonNegativeInt, OutputDir, OutputFile, PositiveFloat, PositiveInt
from vq3d_nerfstudio.scripts.common import Flat, ModelSource, OrbitLoop, reworded

ReconstructOrbit = reworded(
    OrbitLoop, max_yaw_deg="Largest yaw of the orbit and of the novel views in <name>_views.png (degrees)."
)


def output_names(images: List[Path]) -> List[str]:
    """File stems, made unique with their parent folders when two photos share a name."""
    for depth in range(1, 6):
        names = ["_".join(p.with_suffix("").parts[-depth:]) for p in images]
        if len(set(names)) == len(names):
            return names
    return [f"{i:04d}_{p.stem}" for i, p in enumerate(images)]


def expand_images(paths: List[Path]) -> List[Path]:
    """Files as given; folders become their image files (sorted; by extension, as the dataparser
    finds them, not recursing). Missing paths and folders without images stop with one line."""
    from vq3d_nerfstudio.data.folders import IMAGE_EXTENSIONS, is_image_file

    images = []
    for path in paths:
        if path.is_dir():
            images += sorted(p for p in path.iterdir() if is_image_file(p))
        elif path.is_file():
            images.append(path)
        else:
            raise SystemExit(f"vq3d reconstruct: error: {path} does not exist; pass image files or folders of images")
    if not images:
        raise SystemExit(
            "vq3d reconstruct: error: no images found in " + ", ".join(map(str, paths))
            + f" (looked for {', '.join(IMAGE_EXTENSIONS)} files); pass image files or folders of images"
        )
    return images


@dataclass
class Reconstruct:
    """Turn photos into NeRFs with a trained stage-1 model (one forward pass each, no per-scene
    optimisation) and write, per photo, into the output folder: <name>_orbit.mp4 and
    <name>_disparity.mp4 (a loop around the input view), <name>_canonical.png (the reconstruction),
    <name>_views.png (input | canonical | two novel views | disparity) and <name>.ply (a coloured
    point cloud with normals)."""

    image: List[Path]
    """Photos, or folders of photos (jpg, png, webp, bmp, tif); each is centre-cropped to a square
    and resized to the model's input size."""
    source: Flat[ModelSource] = field(default_factory=ModelSource)
    output_dir: OutputDir = Path("reconstructions")
    """Where the outputs go (created if missing)."""
    orbit: Flat[ReconstructOrbit] = field(default_factory=ReconstructOrbit)
    num_points: NonNegativeInt = 20000
    """Points in each .ply (0 skips the point cloud). A photo whose NeRF holds no dense point within
    --max-point-radius gets no .ply, and a warning."""
    max_point_radius: PositiveFloat = 4.0
    """Drop points farther than this from the pivot (world units; the camera is 2 away): the sky."""
    contact_sheet: Optional[OutputFile] = None
    """Also stack every photo's views strip into this one image (a row per photo)."""
    contact_sheet_scale: PositiveInt = 2
    """Pixel-repeat factor of the contact sheet (small renders stay crisp on screen)."""

    def main(self) -> None:
        import numpy as np
        import torch
        from rich.progress import Progress

        from vq3d_nerfstudio.data.dataset import load_image
        from vq3d_nerfstudio.errors import DatasetError
        from vq3d_nerfstudio.export.ply import write_point_ply
        from vq3d_nerfstudio.export.pointcloud import point_cloud
        from vq3d_nerfstudio.export.video import colorize_disparity, render_frames, to_uint8, write_image, write_video
        from vq3d_nerfstudio.geometry.cameras import orbit_cameras

        images = expand_images(self.image)
        loaded = self.source.load("reconstruct")
        model = loaded.model
        size = self.orbit.size(model)
        yaw = self.orbit.max_yaw_deg
        poses = [(0.0, 0.0), (-yaw, 0.0), (yaw, 0.0)] + self.orbit.loop()
        cameras = orbit_cameras(poses, size, model.camera_distance, model.fov_deg).to(model.device)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        failed, strips = [], []
        with Progress() as progress:
            task = progress.add_task("Reconstructing", total=len(images) * len(poses))
            for path, name in zip(images, output_names(images)):
                try:
                    image = load_image(path, model.config.image_size)
                except DatasetError as err:
                    failed.append(str(err))
                    progress.advance(task, len(poses))
                    continue
                model.set_scene_images(image)
                rgb, disp = render_frames(model, cameras, on_frame=lambda: progress.advance(task))
                disp_rgb = colorize_disparity(disp)
                stem = self.output_dir / name
                write_image(f"{stem}_canonical.png", to_uint8(rgb[0]))
                shown = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=(size, size), mode="area")[0]
                strip = torch.cat([shown.permute(1, 2, 0), rgb[0], rgb[1], rgb[2], disp_rgb[0]], dim=1)
                write_image(f"{stem}_views.png", to_uint8(strip))
                strips.append(to_uint8(strip))
                write_video(f"{stem}_orbit.mp4", rgb[3:], self.orbit.fps)
                write_video(f"{stem}_disparity.mp4", disp_rgb[3:], self.orbit.fps)
                if self.num_points > 0:
                    points, colors, normals = point_cloud(model, loaded.orbit_rays, self.num_points, self.max_point_radius)
                    if len(points):
                        write_point_ply(Path(f"{stem}.ply"), points, colors, normals)
                    else:
                        print(f"vq3d reconstruct: warning: {name}: no point cloud written: no ray hit anything dense "
                              f"(accumulation >= 0.5) within --max-point-radius {self.max_point_radius:g} of the pivot; the "
                              "reconstruction is empty or all background (check the photo, or raise --max-point-radius)",
                              file=sys.stderr, flush=True)
        print(f"Wrote {len(images) - len(failed)} reconstruction(s) to {self.output_dir}")
        if self.contact_sheet is not None and strips:
            self.contact_sheet.parent.mkdir(parents=True, exist_ok=True)
            sheet = np.concatenate(strips, axis=0)
            scale = self.contact_sheet_scale
            write_image(self.contact_sheet, sheet.repeat(scale, axis=0).repeat(scale, axis=1))
            print(f"Wrote {self.contact_sheet}")
        if failed:
            raise SystemExit("vq3d reconstruct: error: skipped unreadable images:\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.common import run

    run(tyro.cli(Reconstruct), "reconstruct")

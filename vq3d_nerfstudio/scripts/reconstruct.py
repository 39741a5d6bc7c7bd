"""``vq3d reconstruct``: photos -> NeRFs (one forward pass each) -> videos, views and point clouds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
import tyro

from vq3d_nerfstudio.checks import OutputDir, OutputFile, PositiveInt


def write_ply(path: Path, points: np.ndarray, colors: np.ndarray, normals: np.ndarray) -> None:
    """Binary little-endian PLY with float xyz, float normals and uchar RGB (what ns-export and
    MeshLab / CloudCompare / Blender read). ``colors`` in [0, 1]."""
    count = len(points)
    rgb = (np.clip(colors, 0, 1) * 255 + 0.5).astype(np.uint8)
    vertex = np.empty(count, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("nx", "<f4"), ("ny", "<f4"),
                                     ("nz", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, key in enumerate("xyz"):
        vertex[key] = points[:, i]
        vertex["n" + key] = normals[:, i]
    for i, key in enumerate(("red", "green", "blue")):
        vertex[key] = rgb[:, i]
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {count}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property float nx\nproperty float ny\nproperty float nz\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(vertex.tobytes())
    tmp.replace(path)


@torch.no_grad()
def point_cloud(pipeline, num_points: int, max_radius: float, min_accumulation: float = 0.5):
    """Points of the shown scene seen from cameras orbiting the pivot (the export range): for each
    ray, the expected-depth point, its colour and normal; rays that hit nothing solid
    (accumulation < ``min_accumulation``) or land beyond ``max_radius`` of the pivot (sky) are dropped."""
    model = pipeline.model
    points, colors, normals = [], [], []
    kept, tries = 0, 0
    while kept < num_points and tries < 20:
        rays = pipeline.datamanager.orbit_rays(8192)
        out = model.get_outputs(rays)
        p = rays.origins + rays.directions * out["expected_depth"]
        keep = (out["accumulation"][:, 0] >= min_accumulation) & (p.norm(dim=-1) <= max_radius)
        points.append(p[keep].cpu())
        colors.append(out["rgb"][keep].clamp(0, 1).cpu())
        normals.append((out["normals"][keep] * 2 - 1).cpu())
        kept += int(keep.sum())
        tries += 1
    cat = lambda xs: torch.cat(xs)[:num_points].numpy()  # noqa: E731
    return cat(points), cat(colors), cat(normals)


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
    from vq3d_nerfstudio.data.dataparser import IMAGE_EXTENSIONS, is_image_file

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

    load_config: Path
    """The run's config.yml (outputs/<experiment>/vq3d-tiny/<timestamp>/config.yml)."""
    image: List[Path]
    """Photos, or folders of photos (jpg, png, webp, bmp, tif); each is centre-cropped to a square
    and resized to the model's input size."""
    output_dir: OutputDir = Path("reconstructions")
    """Where the outputs go (created if missing)."""
    num_frames: PositiveInt = 48
    """Frames in the orbit loop."""
    fps: PositiveInt = 24
    """Video frame rate."""
    max_yaw_deg: float = 20.0
    """Largest yaw of the orbit and of the novel views in <name>_views.png (degrees)."""
    max_elevation_deg: float = 8.0
    """Largest elevation of the orbit (degrees)."""
    resolution: int = 0
    """Render size in pixels; 0 uses the model's image size."""
    num_points: int = 20000
    """Points in each .ply (0 skips the point cloud)."""
    max_point_radius: float = 4.0
    """Drop points farther than this from the pivot (world units; the camera is 2 away): the sky."""
    contact_sheet: Optional[OutputFile] = None
    """Also stack every photo's views strip into this one image (a row per photo)."""
    contact_sheet_scale: PositiveInt = 2
    """Pixel-repeat factor of the contact sheet (small renders stay crisp on screen)."""

    def main(self) -> None:
        import imageio.v2 as imageio
        from nerfstudio.utils.eval_utils import eval_setup
        from rich.progress import Progress

        from vq3d_nerfstudio.data.dataparser import DatasetError
        from vq3d_nerfstudio.data.dataset import load_image
        from vq3d_nerfstudio.orbit import colorize_disparity, orbit_cameras, orbit_path, render_frames, to_uint8, write_video

        images = expand_images(self.image)
        if not self.load_config.exists():
            raise SystemExit(f"vq3d reconstruct: error: {self.load_config} does not exist; pass the run's config.yml")
        _, pipeline, _, _ = eval_setup(self.load_config, test_mode="inference")
        model = pipeline.model
        size = self.resolution or model.config.image_size
        poses = [(0.0, 0.0), (-self.max_yaw_deg, 0.0), (self.max_yaw_deg, 0.0)]
        poses += orbit_path(self.num_frames, self.max_yaw_deg, self.max_elevation_deg)
        cameras = orbit_cameras(poses, size, model.camera_distance, model.fov_deg).to(model.device)
        to_u8 = to_uint8
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
                imageio.imwrite(f"{stem}_canonical.png", to_u8(rgb[0]))
                shown = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=(size, size), mode="area")[0]
                strip = torch.cat([shown.permute(1, 2, 0), rgb[0], rgb[1], rgb[2], disp_rgb[0]], dim=1)
                imageio.imwrite(f"{stem}_views.png", to_u8(strip))
                strips.append(to_u8(strip))
                write_video(f"{stem}_orbit.mp4", rgb[3:], self.fps)
                write_video(f"{stem}_disparity.mp4", disp_rgb[3:], self.fps)
                if self.num_points > 0:
                    points, colors, normals = point_cloud(pipeline, self.num_points, self.max_point_radius)
                    write_ply(Path(f"{stem}.ply"), points, colors, normals)
        print(f"Wrote {len(images) - len(failed)} reconstruction(s) to {self.output_dir}")
        if self.contact_sheet is not None and strips:
            self.contact_sheet.parent.mkdir(parents=True, exist_ok=True)
            sheet = np.concatenate(strips, axis=0)
            scale = self.contact_sheet_scale
            imageio.imwrite(self.contact_sheet, sheet.repeat(scale, axis=0).repeat(scale, axis=1))
            print(f"Wrote {self.contact_sheet}")
        if failed:
            raise SystemExit("vq3d reconstruct: error: skipped unreadable images:\n  " + "\n  ".join(failed))


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.cli import run

    run(tyro.cli(Reconstruct))

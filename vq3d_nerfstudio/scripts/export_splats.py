"""``vq3d export-splats``: one image's NeRF -> 3D Gaussians in the standard 3DGS ``.ply`` layout."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import tyro

from vq3d_nerfstudio.checks import (
    ElevationRange,
    NonNegativeFloat,
    NonNegativeInt,
    OutputFile,
    PositiveFloat,
    PositiveInt,
    Probability,
    YawRange,
)
from vq3d_nerfstudio.scripts.common import Flat, ImageChoice, ModelSource, reworded

SplatImage = reworded(
    ImageChoice, image="A photo (centre-cropped and resized to the model's size); without it, --split/--image-index.",
    split="Which dataset split the image comes from (when no --image).",
)


@dataclass
class ExportSplats:
    """Turn one image's NeRF into 3D Gaussian splats and write them as a standard 3DGS .ply (what
    common splat viewers open). Splats start where the NeRF's rendering weight lies along rays of
    cameras orbiting the input view; with a CUDA GPU they are then refined against the NeRF's
    renders with gsplat's rasterizer (on a CPU that step is skipped). Prints how close a splat render
    is to the NeRF's (PSNR) and how fast each renders, and writes a side-by-side PNG
    (NeRF | splats, a row per view). The world frame is the NeRF's: y up, the input camera on +z
    (viewers that assume y down show it upside down)."""

    source: Flat[ModelSource] = field(default_factory=ModelSource)
    output: OutputFile = Path("splats.ply")
    """Where to write the .ply."""
    input: Flat[SplatImage] = field(default_factory=SplatImage)
    num_gaussians: PositiveInt = 20000
    """Most splats to write (the CPU renderer of the report stays quick up to ~20k at 64 px)."""
    num_cameras: PositiveInt = 8
    """Cameras whose rays place the splats: the canonical view and others round the orbit range."""
    max_yaw_deg: YawRange = 20.0
    """Yaw range of those cameras (degrees); VQ3D's NeRFs hold up for limited motion."""
    max_elevation_deg: ElevationRange = 8.0
    """Elevation range of those cameras (degrees)."""
    ray_resolution: NonNegativeInt = 0
    """Pixels on a side of those cameras over the model's field of view (0: the model's image
    size), one ray per pixel; the margin adds more at the same pixel size."""
    margin_deg: NonNegativeFloat = 10.0
    """Those cameras see this much farther than the model's field of view on every side (degrees)."""
    min_weight: Probability = 0.01
    """Samples with less rendering weight than this place no splat."""
    cell_depth_ratio: PositiveFloat = 5.0
    """Samples are merged in cells about a pixel of those cameras wide (grown together when more
    than --num-gaussians hold weight) and, at the pivot, this many times deeper (disparity bins of
    the input view's camera): weight spread along rays becomes a few splats, not many thin layers."""
    scale_mult: PositiveFloat = 0.5
    """Splat standard deviation as a fraction of its cell's width."""
    background_radius: PositiveFloat = 50.0
    """Samples beyond this distance from the pivot (the sky, ~1000 units off in the NeRF) are pulled
    in along their rays to it (world units; the camera is 2 away)."""
    refine_steps: NonNegativeInt = 300
    """gsplat optimisation steps against NeRF renders (CUDA only; skipped on a CPU)."""
    refine_resolution: NonNegativeInt = 0
    """Size of the NeRF renders the refinement fits (0: the model's image size)."""
    report_views: List[float] = field(default_factory=lambda: [0.0, 15.0])
    """Yaws (degrees, elevation 0) of the views in the report and the PNG; 0 is the input view."""
    report_resolution: NonNegativeInt = 0
    """Pixels on a side of the report's renders (0: the model's image size)."""
    timing_repeats: PositiveInt = 3
    """Renders per view timed for the report (after one untimed render)."""
    comparison: Optional[OutputFile] = None
    """Where to write the side-by-side PNG (default: beside the .ply, <name>_compare.png)."""
    seed: int = 0
    """Random seed."""

    def main(self) -> None:
        import torch

        from vq3d_nerfstudio.evaluation.metrics import psnr
        from vq3d_nerfstudio.export.ply import write_splat_ply
        from vq3d_nerfstudio.export.rasterize import cameras_to_viewmats, gsplat_rasterize, rasterize, render_gaussians
        from vq3d_nerfstudio.export.refine import refine_gaussians
        from vq3d_nerfstudio.export.splats import SplatSettings, export_poses, gaussians_from_nerf
        from vq3d_nerfstudio.export.video import to_uint8, write_image
        from vq3d_nerfstudio.geometry.cameras import orbit_cameras

        torch.manual_seed(self.seed)
        if not self.report_views:
            raise SystemExit("vq3d export-splats: error: --report-views must name a view")
        loaded = self.source.load("export-splats")
        model = loaded.model
        image, _ = self.input.load(loaded, "export-splats")
        model.set_scene_images(image)
        planes = model.current_planes()
        cuda = torch.cuda.is_available()
        size = model.config.image_size

        # 1. splats from the rendering weights along the rays of orbit cameras
        settings = SplatSettings(
            num_gaussians=self.num_gaussians, num_cameras=self.num_cameras, max_yaw_deg=self.max_yaw_deg,
            max_elevation_deg=self.max_elevation_deg, ray_resolution=self.ray_resolution, margin_deg=self.margin_deg,
            min_weight=self.min_weight, background_radius=self.background_radius, scale_mult=self.scale_mult,
            cell_depth_ratio=self.cell_depth_ratio,
        )
        poses = export_poses(self.num_cameras, self.max_yaw_deg, self.max_elevation_deg)
        gaussians, cameras = gaussians_from_nerf(model, planes, settings)
        side = int(cameras.width[0])
        print(f"Initialised {len(gaussians)} splats from the rendering weights along the rays of {len(poses)} "
              f"cameras ({side}x{side} px)")

        # 2. refinement against NeRF renders (gsplat, CUDA only)
        if not cuda:
            print("No CUDA GPU: skipping the gsplat refinement; the report shows the initialisation.")
        elif self.refine_steps > 0:
            res = self.refine_resolution or size
            fit_cameras = orbit_cameras(poses, res, model.camera_distance, model.fov_deg).to(model.device)
            targets = torch.stack(
                [model.get_outputs_for_camera(fit_cameras[i : i + 1])["rgb"].clamp(0, 1) for i in range(len(poses))]
            )
            viewmats, Ks = cameras_to_viewmats(fit_cameras)
            gaussians = refine_gaussians(
                gaussians.to("cuda"), targets.cuda(), viewmats.cuda(), Ks.cuda(), self.refine_steps
            )
            print(f"Refined the splats for {self.refine_steps} steps with gsplat against {len(poses)} NeRF renders")

        self.output.parent.mkdir(parents=True, exist_ok=True)
        write_splat_ply(self.output, gaussians)

        # 3. report: splat render vs NeRF render, and time per frame
        res = self.report_resolution or size
        report = orbit_cameras([(yaw, 0.0) for yaw in self.report_views], res, model.camera_distance, model.fov_deg)
        report = report.to(model.device)
        viewmats, Ks = cameras_to_viewmats(report)
        rasterize_fn, device = (gsplat_rasterize, "cuda") if cuda else (rasterize, "cpu")
        gaussians = gaussians.to(device)
        viewmats, Ks = viewmats.to(device), Ks.to(device)

        def timed(render):
            out = render()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(self.timing_repeats):
                render()
            if cuda:
                torch.cuda.synchronize()
            return out, (time.perf_counter() - start) / max(1, self.timing_repeats)

        rows, strips = [], []
        with torch.no_grad():
            for i, yaw in enumerate(self.report_views):
                nerf, nerf_s = timed(lambda: model.get_outputs_for_camera(report[i : i + 1])["rgb"].clamp(0, 1))
                splat, splat_s = timed(
                    lambda: render_gaussians(gaussians, viewmats[i : i + 1], Ks[i : i + 1], res, res, rasterize_fn)[0][0]
                )
                nerf, splat = nerf.float().cpu(), splat.clamp(0, 1).float().cpu()
                name = "input view" if yaw == 0 else f"yaw {yaw:g} deg"
                rows.append((name, psnr(splat.clamp(0, 1), nerf.clamp(0, 1)), nerf_s, splat_s))
                strips.append(torch.cat([nerf, splat], dim=1))
        renderer = "gsplat (CUDA)" if cuda else "pure-torch splats (CPU)"
        print(f"\nSplats vs NeRF at {res}x{res} px ({len(gaussians)} splats; NeRF: {model.device}, splats: {renderer})")
        print(f"{'view':<16}{'PSNR (dB)':>10}{'NeRF ms/frame':>15}{'splat ms/frame':>16}{'speed-up':>10}")
        for name, value, nerf_s, splat_s in rows:
            print(f"{name:<16}{value:>10.2f}{nerf_s * 1e3:>15.1f}{splat_s * 1e3:>16.1f}{nerf_s / max(splat_s, 1e-9):>9.1f}x")
        picture = self.comparison or self.output.with_name(self.output.stem + "_compare.png")
        picture.parent.mkdir(parents=True, exist_ok=True)
        sheet = torch.cat(strips, dim=0)
        scale = max(1, 256 // res)
        write_image(picture, to_uint8(sheet).repeat(scale, axis=0).repeat(scale, axis=1))
        print(f"\nWrote {self.output} and {picture} (NeRF | splats, a row per view)")


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.common import run

    run(tyro.cli(ExportSplats), "export-splats")

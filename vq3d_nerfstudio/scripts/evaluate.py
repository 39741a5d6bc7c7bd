"""``vq3d eval``: the multi-view protocol on a folder of nerfstudio-format scenes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tyro


@dataclass
class Evaluate:
    """Score single-image NeRFs against held-out views: frame 0 of each scene is the input, the
    other frames are novel views (PSNR, SSIM, depth AbsRel and delta<1.25), grouped by
    how far each view is from the input, beside the 'nothing moves' floor (the input image scored
    against each novel frame)."""

    load_config: Path
    """The run's config.yml."""
    scenes: Path
    """A folder of scenes (`*/transforms.json`), or one scene folder."""
    output: Path = Path("eval_results.json")
    """Where to write per-view and grouped results (JSON)."""

    def main(self) -> None:
        import numpy as np
        import torch
        from nerfstudio.utils.eval_utils import eval_setup
        from PIL import Image
        from rich.console import Console
        from rich.progress import track
        from rich.table import Table

        from vq3d_nerfstudio.data.dataparser import DatasetError, pinhole_cameras
        from vq3d_nerfstudio.data.dataset import load_image
        from vq3d_nerfstudio.evaluation import evaluate_scene, load_scene, summarize

        if (self.scenes / "transforms.json").exists():
            scene_files = [self.scenes / "transforms.json"]
        else:
            scene_files = sorted(self.scenes.glob("*/transforms.json"))
        if not scene_files:
            raise SystemExit(f"vq3d eval: error: no transforms.json in {self.scenes} or its subfolders")
        if not self.load_config.exists():
            raise SystemExit(f"vq3d eval: error: {self.load_config} does not exist; pass the run's config.yml")
        _, pipeline, _, _ = eval_setup(self.load_config, test_mode="inference")
        model = pipeline.model
        distance = pipeline.config.datamanager.dataparser.camera_distance

        def render(image, poses, intrinsics):
            model.set_scene_images(image)
            cameras = pinhole_cameras(
                torch.tensor(np.stack(poses)[:, :3], dtype=torch.float32),
                *(intrinsics[k] for k in ("fl_x", "fl_y", "cx", "cy", "w", "h")),
            )
            count = len(poses)
            outs = []
            for i in range(count):
                camera = cameras[i : i + 1]
                out = model.get_outputs_for_camera(camera.to(model.device))
                norm = camera.generate_rays(camera_indices=0, keep_shape=True).metadata["directions_norm"]
                outs.append({"rgb": out["rgb"].clamp(0, 1).cpu(), "z_depth": (out["depth"].cpu() / norm)[..., 0]})
            return outs

        def load_rgb(path):
            with Image.open(path) as pil:
                return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)

        results = []
        try:
            for scene_file in track(scene_files, description="Evaluating scenes"):
                results.append(
                    evaluate_scene(
                        load_scene(scene_file), render, distance, load_rgb,
                        lambda path: load_image(path, model.config.image_size),
                    )
                )
        except DatasetError as err:
            raise SystemExit(f"vq3d eval: error: {err}") from None
        summary = summarize(results)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text(json.dumps({"summary_by_offset_deg": summary, "scenes": results}, indent=1))
        table = Table(title=f"{len(results)} scenes: mean by view offset (degrees)")
        columns = ["psnr", "ssim", "still_psnr", "abs_rel", "delta1", "count"]
        table.add_column("offset")
        for column in columns:
            table.add_column(column)
        for offset, row in summary.items():
            table.add_row(offset, *[f"{row[c]:.3f}" if c in row else "-" for c in columns])
        Console().print(table)
        print(f"Wrote {self.output}")


if __name__ == "__main__":
    tyro.cli(Evaluate).main()

"""``vq3d eval``: the multi-view protocol on a folder of nerfstudio-format scenes."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import tyro

from vq3d_nerfstudio.checks import OutputFile, ranged
from vq3d_nerfstudio.scripts.common import Flat, ModelSource


@dataclass
class Evaluate:
    """Score single-image NeRFs against held-out views: frame 0 of each scene is the input, the
    other frames are novel views (PSNR, SSIM, LPIPS when its weights are here, depth AbsRel and
    delta<1.25, and how far the rendering weights spread from the true depth), grouped by how far
    each view is from the input, beside the 'nothing moves' floor (the input image scored against
    each novel frame). Where the input and a novel frame have depth, also the perfect-geometry
    ceiling (the true input warped through the true geometry: what one image allows), the share of
    the floor-to-ceiling gap the model gains, and PSNR on the co-visible pixels (whose surface the
    input sees); where frames have a mask_path (nonzero: foreground, as `vq3d synth` writes), PSNR
    and depth on the foreground. A scene with a missing or unreadable file is skipped and listed (on
    the console and under "skipped" in the output), unless --strict."""

    scenes: Path
    """A folder of scenes (`*/transforms.json`), or one scene folder."""
    source: Flat[ModelSource] = field(default_factory=ModelSource)
    output: OutputFile = Path("eval_results.json")
    """Where to write per-view and grouped results (JSON)."""
    load_step: ranged(Optional[int], 0) = None
    """Score the checkpoint of this step of a run (default: the latest)."""
    lpips_weights: Optional[Path] = None
    """torchvision's ImageNet AlexNet state dict for LPIPS (default: where torch hub caches it,
    ~/.cache/torch/hub/checkpoints/alexnet-owt-7be5be79.pth). Without it LPIPS is skipped, with a note."""
    strict: bool = False
    """Stop at the first scene with a missing or unreadable file instead of skipping it."""
    save_renders: Optional[Path] = None
    """Also write every scored frame's render: DIR/<scene folder>/<image stem>.png and
    <image stem>_depth.npy (z-depth, the scene's world units after the protocol's alignment)."""

    def main(self) -> None:
        from rich.console import Console
        from rich.table import Table

        from vq3d_nerfstudio.files import write_atomic

        skipped: List[Dict] = []
        summary, results = evaluate_run(
            self.source, self.scenes, self.load_step, self.lpips_weights, strict=self.strict, skipped=skipped,
            save_renders=self.save_renders,
        )
        self.output.parent.mkdir(parents=True, exist_ok=True)
        report = {"summary_by_offset_deg": summary, "scenes": results, "skipped": skipped}
        write_atomic(self.output, json.dumps(report, indent=1, ensure_ascii=False).encode("utf-8"))
        title = f"{len(results)} scenes" + (f" ({len(skipped)} skipped)" if skipped else "")
        table = Table(title=f"{title}: mean by view offset (degrees)")
        columns = ["psnr", "ssim", "lpips", "still_psnr", "ceiling_psnr", "gap_gained", "covisible_psnr", "fg_psnr",
                   "still_lpips", "abs_rel", "delta1", "fg_delta1", "depth_spread", "count"]
        columns = [c for c in columns if any(c in row for row in summary.values())]
        table.add_column("offset")
        for column in columns:
            table.add_column(column)
        for offset, row in summary.items():
            table.add_row(offset, *[f"{row[c]:.3f}" if c in row else "-" for c in columns])
        Console().print(table)
        print(f"Wrote {self.output}")
        if skipped:
            print(f"vq3d eval: warning: skipped {len(skipped)} scene(s) with bad files (listed under \"skipped\" in "
                  f"{self.output}; --strict stops at the first)", file=sys.stderr)


def evaluate_run(
    source: Union[Path, ModelSource],
    scenes: Path,
    load_step: Optional[int] = None,
    lpips_weights: Optional[Path] = None,
    rays_per_chunk: int = 8192,
    strict: bool = False,
    skipped: Optional[List[Dict]] = None,
    save_renders: Optional[Path] = None,
) -> Tuple[Dict, List[Dict]]:
    """Load a trained model (a run's ``config.yml`` or a :class:`ModelSource`) and score it on every scene: ``(summary by offset, per-scene results)``.

    A scene whose files are missing or unreadable is skipped with a warning line on stderr and
    appended to ``skipped`` (when given) as ``{"scene": transforms.json path, "error": message}``;
    with ``strict`` it ends the run (``SystemExit``, one line), as does having no scene left. With
    ``save_renders``, each scored scene's renders go to ``save_renders/<scene folder>/``."""
    import numpy as np
    import torch
    from rich.progress import track

    from vq3d_nerfstudio.data.dataset import load_image, read_rgb
    from vq3d_nerfstudio.data.scenes import load_scene
    from vq3d_nerfstudio.errors import DatasetError
    from vq3d_nerfstudio.evaluation.protocol import evaluate_scene, summarize
    from vq3d_nerfstudio.geometry.cameras import pinhole_cameras
    from vq3d_nerfstudio.stage1.perceptual import load_lpips_if_available

    if (scenes / "transforms.json").exists():
        scene_files = [scenes / "transforms.json"]
    else:
        scene_files = sorted(scenes.glob("*/transforms.json"))
    if not scene_files:
        raise SystemExit(f"vq3d eval: error: no transforms.json in {scenes} or its subfolders")
    if isinstance(source, Path):
        source = ModelSource(load_config=source)
    model = source.load("eval", load_step).model
    distance = model.camera_distance
    lpips, why_not = load_lpips_if_available("alex", lpips_weights)
    if lpips is None:
        print(f"LPIPS skipped: {why_not}")
    else:
        lpips = lpips.to(model.device)

    rendered: List = []  # the last scene's renders, for --save-renders

    @torch.no_grad()
    def render(image, poses, intrinsics):
        model.set_scene_images(image)
        planes = model.current_planes()
        cameras = pinhole_cameras(
            torch.tensor(np.stack(poses)[:, :3], dtype=torch.float32),
            *(intrinsics[k] for k in ("fl_x", "fl_y", "cx", "cy", "w", "h")),
        ).to(model.device)
        outs = []
        for i in range(len(poses)):
            rays = cameras.generate_rays(camera_indices=i, keep_shape=True)
            height, width = rays.shape
            rays = rays.flatten()
            out = model.renderer.render_chunked(rays, model.field, planes, rays_per_chunk, keep_samples=True)
            norm = rays.metadata["directions_norm"].cpu()
            outs.append({
                "rgb": out["rgb"].clamp(0, 1).reshape(height, width, 3),
                "z_depth": (out["depth"] / norm).reshape(height, width),
                "weights": out["weights_fine"].reshape(height, width, -1),
                "sample_z": (1.0 / out["disp_fine"].clamp_min(1e-12)).reshape(height, width, -1),
            })
        rendered[:] = outs
        return outs

    def load_rgb(path):  # ground truth as the input is read: EXIF rotation, modes, alpha over white
        return torch.from_numpy(read_rgb(path).astype(np.float32) / 255.0)

    results = []
    skipped = skipped if skipped is not None else []
    for scene_file in track(scene_files, description="Evaluating scenes"):
        try:
            scene = load_scene(scene_file)
            results.append(
                evaluate_scene(scene, render, distance, load_rgb, lambda path: load_image(path, model.config.image_size),
                               lpips=lpips)
            )
            if save_renders is not None:
                save_scene_renders(save_renders / scene_file.parent.name, scene.images, rendered)
        except DatasetError as err:
            if strict:
                raise SystemExit(f"vq3d eval: error: {err} (--strict)") from None
            skipped.append({"scene": str(scene_file), "error": str(err)})
            print(f"vq3d eval: warning: skipped scene {scene_file.parent.name}: {err}", file=sys.stderr, flush=True)
    if not results:
        raise SystemExit(
            f"vq3d eval: error: none of the {len(scene_files)} scenes could be scored; the first: {skipped[0]['error']}"
        )
    return summarize(results), results


def save_scene_renders(folder: Path, images: List[Path], outputs: List[Dict]) -> None:
    """``folder/<image stem>.png`` (8-bit RGB) and ``<image stem>_depth.npy`` (float32 z-depth) per frame."""
    import numpy as np

    from vq3d_nerfstudio.export.video import write_image
    from vq3d_nerfstudio.files import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    for image, out in zip(images, outputs):
        rgb = (out["rgb"].clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        write_image(folder / f"{image.stem}.png", rgb)
        buffer = io.BytesIO()
        np.save(buffer, out["z_depth"].cpu().numpy().astype(np.float32))
        write_atomic(folder / f"{image.stem}_depth.npy", buffer.getvalue())


if __name__ == "__main__":
    from vq3d_nerfstudio.scripts.common import run

    run(tyro.cli(Evaluate), "eval")

"""Multi-view evaluation protocol (pure functions; the ``vq3d eval`` command wires in a model).

A scene is a nerfstudio-format ``transforms.json`` (camera-to-world OpenGL ``transform_matrix`` per
frame, ``fl_x fl_y cx cy w h``, optional ``depth_file_path`` to z-depth ``.npy`` and top-level
``pivot``). Frame 0 is the input; the others are held-out novel views. The world is mapped so that
frame 0 becomes the canonical camera (identity rotation at ``(0, 0, distance)``) and scaled so that
frame 0's distance to the pivot (without a pivot: its median finite ground-truth depth) equals the
canonical distance; every other frame is rendered in that frame and scored.

Where frame 0 and a novel frame both have depth, the novel view is also scored against what one
image allows: the *perfect-geometry ceiling* (the true input warped through the true geometry,
:mod:`vq3d_nerfstudio.evaluation.warp`), the model's PSNR on the *co-visible* pixels (those whose
surface the input sees), and, in the summary, the share of the floor-to-ceiling gap the model gains.
Where a frame has a ``mask_path`` (nonzero: foreground), PSNR and depth are also scored on it alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from vq3d_nerfstudio.data.dataset import check_some_depth_valid, disparity_from_depth, load_depth_array
from vq3d_nerfstudio.data.scenes import EvalScene
from vq3d_nerfstudio.errors import DatasetError
from vq3d_nerfstudio.evaluation.metrics import depth_errors, depth_spread, psnr, ssim
from vq3d_nerfstudio.evaluation.warp import covisible_warp
from vq3d_nerfstudio.geometry.poses import align_pose, canonical_alignment, view_offset_deg

Renderer = Callable[[torch.Tensor, List[np.ndarray], Dict[str, float]], List[Dict[str, torch.Tensor]]]
"""``render(input_image [H, W, 3], canonical poses [4, 4] each, intrinsics) -> [{"rgb": [h, w, 3],
"z_depth": [h, w]}]``: build the NeRF from the input image and render it from each pose. A render may
add ``"weights"`` and ``"sample_z"`` (``[h, w, S]``) to be scored by :func:`depth_spread`."""


def evaluate_scene(
    scene: EvalScene, render: Renderer, distance: float, load_rgb, load_input, lpips: Optional[Callable] = None
) -> Dict:
    """Score frame 0 (reconstruction) and every novel view of one scene.

    ``load_rgb(path) -> [h, w, 3]`` reads a ground-truth frame; ``load_input(path) -> [S, S, 3]``
    reads the input image as the model sees it; ``lpips(a, b) -> [B]`` (``[B, 3, h, w]`` in [0, 1]),
    when given, adds LPIPS to every view and to the 'nothing moves' floor.

    Raises:
        DatasetError: naming the file: a frame that cannot be read or whose size is not the scene's
            ``w`` x ``h``, a depth file that is not an ``h`` x ``w`` numeric ``.npy`` or has no valid
            (positive) pixel, or frame 0's camera at the pivot.
    """
    hw = (int(scene.intrinsics["h"]), int(scene.intrinsics["w"]))

    def load_z_depth(path: Path) -> np.ndarray:  # a depth file with no valid pixel is a bad file
        depth = load_depth_array(path, hw)
        check_some_depth_valid(path, depth, disparity_from_depth(depth, "z-depth")[1], "z-depth")
        return depth

    depth0 = load_z_depth(scene.depths[0]) if scene.depths[0] is not None else None
    usable = depth0[np.isfinite(depth0) & (depth0 > 0)] if depth0 is not None else np.zeros(0)
    median = float(np.median(usable)) if usable.size else None
    if scene.pivot is None and median is None:
        raise DatasetError(f"{scene.images[0]}: scene has neither a pivot nor depth for frame 0; add a \"pivot\"")
    if scene.pivot is not None and not np.linalg.norm(scene.camera_to_worlds[0][:3, 3] - scene.pivot) > 0:
        raise DatasetError(
            f"{scene.images[0]}: frame 0's camera sits at the pivot {scene.pivot.tolist()}; the pivot is the point "
            "it looks at (set \"pivot\" to it, or remove it to scale by frame 0's depth)"
        )
    world_to_cam0, scale = canonical_alignment(scene.camera_to_worlds[0], distance, scene.pivot, median)
    poses = [align_pose(c2w, world_to_cam0, scale, distance) for c2w in scene.camera_to_worlds]
    outputs = render(load_input(scene.images[0]), poses, scene.intrinsics)

    def ground_truth(image: Path) -> torch.Tensor:
        gt = load_rgb(image)
        if tuple(gt.shape[:2]) != hw:
            raise DatasetError(
                f"{image}: is {gt.shape[1]}x{gt.shape[0]} but its transforms.json says w={hw[1]}, h={hw[0]}; "
                "fix w/h or the image"
            )
        return gt

    def foreground(i: int) -> Optional[torch.Tensor]:
        if not scene.masks or scene.masks[i] is None:
            return None
        from PIL import Image, UnidentifiedImageError

        path = scene.masks[i]
        try:
            with Image.open(path) as pil:
                mask = np.asarray(pil.convert("L")) > 0
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DatasetError(f"{path}: not a readable mask image ({err}); write a one-channel PNG") from err
        if mask.shape != hw:
            raise DatasetError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, the scene's frames {hw[1]}x{hw[0]}; resize it")
        return torch.from_numpy(mask)

    input_gt = ground_truth(scene.images[0])
    views = []
    for i, (image, depth, out) in enumerate(zip(scene.images, scene.depths, outputs)):
        gt = ground_truth(image)
        row = {
            "frame": i,
            "offset_deg": round(view_offset_deg(scene.camera_to_worlds[0], scene.camera_to_worlds[i]), 2),
            "psnr": psnr(out["rgb"], gt),
            "ssim": ssim(out["rgb"], gt),
        }
        still = input_gt.shape == gt.shape
        if i > 0:
            row["still_psnr"] = psnr(input_gt, gt) if still else float("nan")
        if lpips is not None:
            to_batch = lambda x: x.permute(2, 0, 1)[None].float()  # noqa: E731
            with torch.no_grad():
                row["lpips"] = float(lpips(to_batch(out["rgb"]), to_batch(gt))[0])
                if i > 0 and still:
                    row["still_lpips"] = float(lpips(to_batch(input_gt), to_batch(gt))[0])
        gt_depth = None
        if depth is not None:
            z_depth = load_z_depth(depth)
            gt_depth = torch.from_numpy(z_depth.astype(np.float64) * scale)
            row.update(depth_errors(out["z_depth"], gt_depth))
            if "weights" in out:
                spread = depth_spread(out["weights"], out["sample_z"], gt_depth)
                if spread is not None:
                    row["depth_spread"] = spread
            if i > 0 and still and depth0 is not None:
                warped, covisible = covisible_warp(input_gt.numpy(), depth0, scene.camera_to_worlds[0], z_depth,
                                                   scene.camera_to_worlds[i], scene.intrinsics)
                row["ceiling_psnr"] = psnr(torch.from_numpy(warped), gt)
                row["covisible_fraction"] = float(covisible.mean())
                covisible = torch.from_numpy(covisible)
                if bool(covisible.any()):
                    row["covisible_psnr"] = psnr(out["rgb"][covisible], gt[covisible])
        fg = foreground(i)
        if fg is not None and bool(fg.any()):
            row["fg_psnr"] = psnr(out["rgb"][fg], gt[fg])
            if gt_depth is not None:
                row.update({f"fg_{k}": v for k, v in depth_errors(out["z_depth"][fg], gt_depth[fg]).items()})
        views.append(row)
    return {"scene": scene.name, "scale": scale, "views": views}


def summarize(results: List[Dict], bin_deg: float = 5.0) -> Dict[str, Dict[str, float]]:
    """Mean of every metric, grouped by view offset rounded to ``bin_deg`` ('0' is the input view)."""
    groups: Dict[str, List[Dict]] = {}
    for result in results:
        for view in result["views"]:
            key = str(int(round(view["offset_deg"] / bin_deg) * bin_deg))
            groups.setdefault(key, []).append(view)
    summary = {}
    for key in sorted(groups, key=float):
        rows = groups[key]
        metrics = sorted({m for row in rows for m in row} - {"frame", "offset_deg"})
        summary[key] = {m: float(np.mean([row[m] for row in rows if m in row])) for m in metrics}
        summary[key]["count"] = len(rows)
        summary[key].update(gap_gained(rows))
    return summary


def gap_gained(rows: List[Dict]) -> Dict[str, float]:
    """The share of the floor-to-ceiling gap the model gains, over the views that have a ceiling:
    ``(mean psnr - mean still_psnr) / (mean ceiling_psnr - mean still_psnr)`` (means of the same
    views; a ratio of means, steady where single views' gaps are near 0). Empty without ceilings."""
    rows = [r for r in rows if "ceiling_psnr" in r and "still_psnr" in r]
    if not rows:
        return {}
    model, floor, ceiling = (float(np.mean([r[m] for r in rows])) for m in ("psnr", "still_psnr", "ceiling_psnr"))
    return {"gap_gained": (model - floor) / (ceiling - floor)} if ceiling - floor > 1e-9 else {}

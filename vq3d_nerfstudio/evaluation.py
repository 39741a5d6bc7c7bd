"""Multi-view evaluation protocol (pure functions; the ``vq3d eval`` command wires in a model).

A scene is a nerfstudio-format ``transforms.json`` (camera-to-world OpenGL ``transform_matrix`` per
frame, ``fl_x fl_y cx cy w h``, optional ``depth_file_path`` to z-depth ``.npy`` and top-level
``pivot``). Frame 0 is the input; the others are held-out novel views. The world is mapped so that
frame 0 becomes the canonical camera (identity rotation at ``(0, 0, distance)``) and scaled so that
frame 0's distance to the pivot (without a pivot: its median finite ground-truth depth) equals the
canonical distance; every other frame is rendered in that frame and scored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from vq3d_nerfstudio.data.dataparser import DatasetError

PSNR_CAP = 100.0  # reported for a perfect match (MSE 0)
POSE_TOLERANCE = 1e-3
"""How far a camera-to-world rotation may be from orthonormal (largest entry of ``R^T R - I``):
JSON files written in single precision are off by ~1e-7; a scaled or sheared matrix by far more."""


def pose_problem(pose: np.ndarray) -> Optional[str]:
    """Why ``pose`` is not a rigid camera-to-world matrix (a ``[4, 4]`` of finite numbers, rotation
    orthonormal within :data:`POSE_TOLERANCE` with determinant +1, bottom row ``0 0 0 1``), or ``None``."""
    if pose.shape != (4, 4):
        return "is not a 4x4 matrix of numbers"
    if not np.isfinite(pose).all():
        return "holds NaN or inf"
    if np.abs(pose[3] - np.array([0.0, 0.0, 0.0, 1.0])).max() > POSE_TOLERANCE:
        return f"has bottom row {pose[3].tolist()}, not [0, 0, 0, 1]"
    rotation = pose[:3, :3]
    error = float(np.abs(rotation.T @ rotation - np.eye(3)).max())
    if error > POSE_TOLERANCE:
        return f"has a rotation that is not orthonormal (|R^T R - I| up to {error:.3g})"
    if np.linalg.det(rotation) < 0:
        return "has a mirrored rotation (determinant -1)"
    return None


@dataclass
class EvalScene:
    """One scene of the evaluation set."""

    name: str
    images: List[Path]
    depths: List[Optional[Path]]
    camera_to_worlds: np.ndarray  # (N, 4, 4) OpenGL, world units
    intrinsics: Dict[str, float]  # fl_x, fl_y, cx, cy, w, h
    pivot: Optional[np.ndarray]


def load_scene(transforms_path: Path) -> EvalScene:
    """Read and validate a scene; errors name the file and what to fix. Every listed image and depth
    file must exist (whether it decodes is found when it is read)."""
    try:
        meta = json.loads(transforms_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise DatasetError(f"{transforms_path}: cannot read ({err}); write a nerfstudio transforms.json") from err
    if not isinstance(meta, dict):
        raise DatasetError(f"{transforms_path}: not a JSON object; write a nerfstudio transforms.json")
    missing = [k for k in ("fl_x", "fl_y", "cx", "cy", "w", "h", "frames") if k not in meta]
    if missing:
        raise DatasetError(f"{transforms_path}: missing {', '.join(missing)}; add them (nerfstudio format)")
    frames = meta["frames"]
    if not isinstance(frames, list) or len(frames) < 2:
        raise DatasetError(f"{transforms_path}: needs frame 0 (the input) and at least one novel view")
    root = transforms_path.parent
    images, depths, poses = [], [], []
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str) or "transform_matrix" not in frame:
            raise DatasetError(f"{transforms_path}: frame {i} lacks file_path or transform_matrix")
        image = root / frame["file_path"]
        if not image.is_file():
            raise DatasetError(f"{image}: listed in {transforms_path} (frame {i}) but missing; add it or remove the frame")
        images.append(image)
        depth = root / str(frame["depth_file_path"]) if frame.get("depth_file_path") else None
        if depth is not None and not depth.is_file():
            raise DatasetError(f"{depth}: listed in {transforms_path} (frame {i}) but missing; add it or remove depth_file_path")
        depths.append(depth)
        try:
            pose = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except (TypeError, ValueError):
            pose = np.full(1, np.nan)
        problem = pose_problem(pose)
        if problem is not None:
            raise DatasetError(
                f"{transforms_path}: frame {i} ({frame['file_path']}) transform_matrix {problem}; write a rigid "
                "camera-to-world matrix (orthonormal rotation, bottom row 0 0 0 1)"
            )
        poses.append(pose)
    try:
        pivot = np.asarray(meta["pivot"], dtype=np.float64) if "pivot" in meta else None
        intrinsics = {k: float(meta[k]) for k in ("fl_x", "fl_y", "cx", "cy", "w", "h")}
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{transforms_path}: intrinsics or pivot are not numbers ({err}); fix them") from err
    if pivot is not None and (pivot.shape != (3,) or not np.isfinite(pivot).all()):
        raise DatasetError(f"{transforms_path}: pivot is not a finite [x, y, z]; fix or remove it")
    if not all(math.isfinite(v) and v > 0 for k, v in intrinsics.items() if k in ("fl_x", "fl_y", "w", "h")):
        raise DatasetError(f"{transforms_path}: fl_x, fl_y, w and h must be positive numbers")
    return EvalScene(root.name, images, depths, np.stack(poses), intrinsics, pivot)


def canonical_alignment(
    c2w0: np.ndarray, distance: float, pivot: Optional[np.ndarray] = None, median_depth: Optional[float] = None
) -> Tuple[np.ndarray, float]:
    """World -> canonical map ``x -> s * (inv(c2w0) x) + (0, 0, distance)``.

    Returns:
        ``(world_to_canonical_rigid [4, 4], scale s)``; the rigid part is ``inv(c2w0)`` followed by
        the translation applied after scaling (see :func:`align_pose`).
    """
    reference = np.linalg.norm(c2w0[:3, 3] - pivot) if pivot is not None else median_depth
    if reference is None or not reference > 0:
        raise ValueError("need a pivot or a positive median depth of frame 0 to set the scale")
    return np.linalg.inv(c2w0), distance / float(reference)


def align_pose(c2w: np.ndarray, world_to_cam0: np.ndarray, scale: float, distance: float) -> np.ndarray:
    """A camera-to-world pose expressed in the canonical frame (rotation kept, position mapped)."""
    out = world_to_cam0 @ c2w
    out[:3, 3] = out[:3, 3] * scale + np.array([0.0, 0.0, distance])
    return out


def view_offset_deg(c2w0: np.ndarray, c2w: np.ndarray) -> float:
    """Angle between two cameras' optical axes, degrees."""
    a, b = -c2w0[:3, 2], -c2w[:3, 2]
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """PSNR in dB for images in [0, 1]; ``PSNR_CAP`` when they are identical."""
    mse = float(torch.mean((pred.double() - gt.double()) ** 2))
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else -10 * math.log10(mse)


def ssim(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """SSIM of two ``[H, W, 3]`` images in [0, 1] (Gaussian window of up to 7 pixels, odd, fitting the image)."""
    from pytorch_msssim import ssim as _ssim

    win = min(7, min(gt.shape[:2]))
    win -= 1 - win % 2
    to_batch = lambda x: x.permute(2, 0, 1)[None].double()  # noqa: E731
    return float(_ssim(to_batch(pred), to_batch(gt), data_range=1.0, win_size=win, size_average=True))


def depth_errors(pred: torch.Tensor, gt: torch.Tensor) -> Dict[str, float]:
    """AbsRel and delta < 1.25 over pixels with finite, positive ground truth."""
    mask = torch.isfinite(gt) & (gt > 0) & torch.isfinite(pred) & (pred > 0)
    if not bool(mask.any()):
        return {}
    p, g = pred[mask].double(), gt[mask].double()
    ratio = torch.maximum(p / g, g / p)
    return {"abs_rel": float(((p - g).abs() / g).mean()), "delta1": float((ratio < 1.25).double().mean())}


def depth_spread(weights: torch.Tensor, sample_z: torch.Tensor, gt: torch.Tensor) -> Optional[float]:
    """How far the rendering weights lie from the true surface: over pixels with finite, positive
    ground-truth z-depth, ``sum_i w_i |z_i - z_gt| / (z_gt sum_i w_i)``, averaged. 0 when all weight
    sits on the surface; a density smeared along the ray scores high even if its mean is right.

    Args:
        weights: ``[h, w, S]`` rendering weights of the samples.
        sample_z: ``[h, w, S]`` z-depth of the samples.
        gt: ``[h, w]`` ground-truth z-depth (same units).
    """
    mass = weights.sum(-1)
    mask = torch.isfinite(gt) & (gt > 0) & (mass > 1e-6)
    if not bool(mask.any()):
        return None
    w, z, g = weights[mask].double(), sample_z[mask].double(), gt[mask].double()[:, None]
    return float(((w * (z - g).abs()).sum(-1) / (g[:, 0] * w.sum(-1))).mean())


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
    from vq3d_nerfstudio.data.dataset import check_some_depth_valid, disparity_from_depth, load_depth_array

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
        if depth is not None:
            gt_depth = torch.from_numpy(load_z_depth(depth).astype(np.float64) * scale)
            row.update(depth_errors(out["z_depth"], gt_depth))
            if "weights" in out:
                spread = depth_spread(out["weights"], out["sample_z"], gt_depth)
                if spread is not None:
                    row["depth_spread"] = spread
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
    return summary

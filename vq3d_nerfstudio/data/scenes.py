"""Posed scenes on disk: a nerfstudio-format ``transforms.json`` read and validated for the
multi-view evaluation protocol and multi-view supervision (frame 0 is the input view).

A scene lists per frame a camera-to-world OpenGL ``transform_matrix``, ``file_path`` and an optional
``depth_file_path`` (z-depth ``.npy``) and ``mask_path`` (a one-channel image whose nonzero pixels
are the foreground, nerfstudio's convention), the shared intrinsics ``fl_x fl_y cx cy w h`` and an optional
top-level ``pivot``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from vq3d_nerfstudio.errors import DatasetError
from vq3d_nerfstudio.geometry.poses import pose_problem

@dataclass
class EvalScene:
    """One scene of the evaluation set."""

    name: str
    images: List[Path]
    depths: List[Optional[Path]]
    camera_to_worlds: np.ndarray  # (N, 4, 4) OpenGL, world units
    intrinsics: Dict[str, float]  # fl_x, fl_y, cx, cy, w, h
    pivot: Optional[np.ndarray]
    masks: List[Optional[Path]] = field(default_factory=list)  # per frame, or empty: no masks


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
    images, depths, masks, poses = [], [], [], []
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
        mask = root / str(frame["mask_path"]) if frame.get("mask_path") else None
        if mask is not None and not mask.is_file():
            raise DatasetError(f"{mask}: listed in {transforms_path} (frame {i}) but missing; add it or remove mask_path")
        masks.append(mask)
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
    return EvalScene(root.name, images, depths, np.stack(poses), intrinsics, pivot,
                     masks if any(m is not None for m in masks) else [])

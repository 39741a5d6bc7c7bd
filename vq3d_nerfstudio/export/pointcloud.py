"""Point clouds of a NeRF: the expected-depth points of orbiting rays, and their PLY file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from vq3d_nerfstudio.files import atomic_path


def write_point_ply(path: Path, points: np.ndarray, colors: np.ndarray, normals: np.ndarray) -> None:
    """Binary little-endian PLY with float xyz, float normals and uchar RGB (what ns-export and
    MeshLab / CloudCompare / Blender read), through ``plyfile``, written atomically. ``colors`` in [0, 1]."""
    count = len(points)
    rgb = (np.clip(colors, 0, 1) * 255 + 0.5).astype(np.uint8)
    vertex = np.empty(count, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("nx", "<f4"), ("ny", "<f4"),
                                     ("nz", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, key in enumerate("xyz"):
        vertex[key] = points[:, i]
        vertex["n" + key] = normals[:, i]
    for i, key in enumerate(("red", "green", "blue")):
        vertex[key] = rgb[:, i]
    with atomic_path(path) as tmp:
        PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<").write(str(tmp))


@torch.no_grad()
def point_cloud(model, orbit_rays, num_points: int, max_radius: float, min_accumulation: float = 0.5):
    """Points of the shown scene seen from cameras orbiting the pivot (the export range): for each
    ray, the expected-depth point, its colour and normal; rays that hit nothing solid
    (accumulation < ``min_accumulation``) or land beyond ``max_radius`` of the pivot (sky) are dropped.
    ``orbit_rays(n)``: n such rays (a datamanager's ``orbit_rays``, or
    :func:`vq3d_nerfstudio.geometry.cameras.orbit_rays` bound to the model's camera)."""
    points, colors, normals = [], [], []
    kept, tries = 0, 0
    while kept < num_points and tries < 20:
        rays = orbit_rays(8192)
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

"""Point clouds of a NeRF: the expected-depth points of orbiting rays (their PLY file is
:func:`vq3d_nerfstudio.export.ply.write_point_ply`)."""

from __future__ import annotations

import torch


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

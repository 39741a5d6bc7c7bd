"""Tri-plane sampling: pure functions on tensors.

A tri-plane is a tensor ``[B, 3, C, R, R]`` holding three axis-aligned feature planes over the
cube ``[-1, 1]^3`` (normalised, contracted scene coordinates):

- plane 0 (``xy``) is indexed by (x, y) and drops z,
- plane 1 (``xz``) is indexed by (x, z) and drops y,
- plane 2 (``yz``) is indexed by (y, z) and drops x.

Within a plane ``[C, R, R]`` the last axis (columns) is the plane's first coordinate and the
second-to-last axis (rows) its second coordinate, as ``torch.nn.functional.grid_sample`` expects.
Corners are aligned (``align_corners=True``): texel ``k`` sits at ``-1 + 2k / (R - 1)``, so a plane
that holds a linear ramp returns the coordinate exactly (EG3D-style tri-planes, Chan et al. 2022).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Which two coordinates of (x, y, z) index each plane, in grid_sample's (column, row) order.
PLANE_AXES = ((0, 1), (0, 2), (1, 2))


def sample_triplanes(planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample each plane at the projection of ``points`` and concatenate the features.

    Args:
        planes: ``[B, 3, C, R, R]`` tri-plane features.
        points: ``[B, P, 3]`` points in ``[-1, 1]^3`` (outside is zero-padded).

    Returns:
        ``[B, P, 3 * C]`` features: plane 0's C channels, then plane 1's, then plane 2's.
    """
    batch, num_planes, channels, res_h, res_w = planes.shape
    assert num_planes == 3, "a tri-plane has three planes"
    assert points.shape[0] == batch and points.shape[-1] == 3
    coords = torch.stack([points[..., list(axes)] for axes in PLANE_AXES], dim=1)  # (B, 3, P, 2)
    coords = coords.reshape(batch * 3, 1, -1, 2)  # (B*3, 1, P, 2)
    flat_planes = planes.reshape(batch * 3, channels, res_h, res_w)
    feats = F.grid_sample(flat_planes, coords, mode="bilinear", padding_mode="zeros", align_corners=True)
    # (B*3, C, 1, P) -> (B, 3, C, P) -> (B, P, 3, C) -> (B, P, 3C)
    feats = feats.reshape(batch, 3, channels, -1).permute(0, 3, 1, 2)
    return feats.reshape(batch, -1, 3 * channels)


def sample_triplanes_by_index(planes: torch.Tensor, points: torch.Tensor, batch_idx: torch.Tensor) -> torch.Tensor:
    """Sample tri-planes for points that each name the tri-plane (image) they belong to.

    Args:
        planes: ``[B, 3, C, R, R]``.
        points: ``[N, 3]`` points in ``[-1, 1]^3``.
        batch_idx: ``[N]`` integer index into the B tri-planes.

    Returns:
        ``[N, 3 * C]`` features; ``out[n] == sample_triplanes(planes[batch_idx[n]], points[n])``.
    """
    num_points = points.shape[0]
    batch = planes.shape[0]
    if batch == 1:
        return sample_triplanes(planes, points[None])[0]
    counts = torch.bincount(batch_idx, minlength=batch)
    if bool((counts == counts[0]).all()) and bool((batch_idx[:-1] <= batch_idx[1:]).all()):
        # Fast path: contiguous, equal-sized blocks per image (what the training datamanager yields).
        return sample_triplanes(planes, points.reshape(batch, -1, 3)).reshape(num_points, -1)
    out = points.new_zeros(num_points, 3 * planes.shape[2])
    for b in torch.unique(batch_idx).tolist():
        mask = batch_idx == b
        out[mask] = sample_triplanes(planes[b : b + 1], points[mask][None])[0]
    return out


def contract(points: torch.Tensor, scene_scale: float = 1.0) -> torch.Tensor:
    """mip-NeRF 360 scene contraction with the L-infinity norm, scaled into ``[-1, 1]^3``.

    ``x / scene_scale`` inside the unit cube is kept; outside it is mapped to
    ``(2 - 1 / |x|_inf) * x / |x|_inf`` (Barron et al. 2022, eq. 10, L-inf variant), and the result,
    in ``[-2, 2]^3``, is halved so it indexes a tri-plane.

    Args:
        points: ``[..., 3]`` world points.
        scene_scale: world size of the half-width of the linearly mapped inner cube.

    Returns:
        ``[..., 3]`` points in ``[-1, 1]^3``; the inner cube maps to ``[-0.5, 0.5]^3``.
    """
    x = points / scene_scale
    mag = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)
    contracted = torch.where(mag < 1, x, (2 - 1 / mag.clamp_min(1e-6)) * (x / mag.clamp_min(1e-6)))
    return contracted / 2

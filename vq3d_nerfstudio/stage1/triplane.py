"""Tri-plane sampling: pure functions on tensors.

A tri-plane is a tensor ``[B, 3, C, R, R]`` holding three axis-aligned feature planes over the
cube ``[-1, 1]^3`` of *plane coordinates* (U, V, W) (for the default layout, see
:func:`frustum_coordinates`; for the ``world`` layout, :func:`contract`). Below they are called x, y, z:

- plane 0 (``xy``) is indexed by (x, y) and drops z,
- plane 1 (``xz``) is indexed by (x, z) and drops y,
- plane 2 (``yz``) is indexed by (y, z) and drops x.

Within a plane ``[C, R, R]`` the last axis (columns) is the plane's first coordinate and the
second-to-last axis (rows) its second coordinate, as ``torch.nn.functional.grid_sample`` expects.
Corners are aligned (``align_corners=True``): texel ``k`` sits at ``-1 + 2k / (R - 1)``, so a plane
that holds a linear ramp returns the coordinate exactly (EG3D-style tri-planes, Chan et al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vq3d_nerfstudio.geometry.poses import CanonicalCamera

# Which two coordinates of (x, y, z) index each plane, in grid_sample's (column, row) order.
PLANE_AXES = ((0, 1), (0, 2), (1, 2))


#: Most elements one ``grid_sample`` call may output. On a GPU torch hands this call to cuDNN's grid
#: sampler, which refuses outputs a 32-bit index cannot address (CUDNN_STATUS_NOT_SUPPORTED; met by the
#: vq3d preset at 256 images a step on an H200), so larger queries are split along the points.
GRID_SAMPLE_MAX_ELEMENTS = 2**31 - 1


def sample_triplanes(planes: torch.Tensor, points: torch.Tensor, max_elements: int = GRID_SAMPLE_MAX_ELEMENTS) -> torch.Tensor:
    """Bilinearly sample each plane at the projection of ``points`` and concatenate the features.

    Args:
        planes: ``[B, 3, C, R, R]`` tri-plane features.
        points: ``[B, P, 3]`` points in ``[-1, 1]^3`` (outside is zero-padded).
        max_elements: most features one ``grid_sample`` call returns; more points are sampled in
            pieces (the result is the same).

    Returns:
        ``[B, P, 3 * C]`` features: plane 0's C channels, then plane 1's, then plane 2's.
    """
    batch, num_planes, channels, res_h, res_w = planes.shape
    assert num_planes == 3, "a tri-plane has three planes"
    assert points.shape[0] == batch and points.shape[-1] == 3
    piece = max(1, max_elements // (batch * 3 * channels))  # points per call
    if points.shape[1] > piece:
        return torch.cat([sample_triplanes(planes, points[:, i : i + piece], max_elements)
                          for i in range(0, points.shape[1], piece)], dim=1)
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


def contract_1d(s: torch.Tensor, inner: float) -> torch.Tensor:
    """Continuous, odd, strictly increasing map of the real line onto ``(-1, 1)``: linear
    ``inner * s`` for ``|s| <= 1``, then ``sign(s) * (inner + (1 - inner) * (1 - 1 / |s|))``
    (mip-NeRF 360's contraction in one dimension, Barron et al. 2022, eq. 10, with the inner part
    taking ``inner`` of the range instead of half). ``±inf`` maps to ``±1``.

    Written as ``clamp(s, -1, 1) * (1 - (1 - inner) / max(|s|, 1))``, one expression for both parts
    (half the tensor operations of a ``where`` over both branches: every sample of every render
    passes through here)."""
    inv_mag = s.abs().clamp_min(1.0).reciprocal()
    return s.clamp(-1.0, 1.0) * (1.0 - (1.0 - inner) * inv_mag)


def uncontract_1d(c: torch.Tensor, inner: float) -> torch.Tensor:
    """Inverse of :func:`contract_1d` on ``(-1, 1)``."""
    mag = c.abs()
    outer = torch.sign(c) / (1 - (mag - inner) / (1 - inner)).clamp_min(1e-12)
    return torch.where(mag <= inner, c / inner, outer)


def frustum_inner_extent(inner_resolution: int, margin: int) -> float:
    """Plane coordinate of the canonical frustum's edge for a plane of ``inner_resolution + 2 *
    margin`` texels whose inner ``inner_resolution`` texels cover the canonical image exactly.

    With ``align_corners=True`` texel ``k`` of ``R`` sits at ``-1 + 2k / (R - 1)``. Pixel-centre
    cell ``m`` of the inner part (normalised image coordinate ``-1 + (2m + 1) / R_in``) must land on
    texel ``margin + m``: that holds for every ``m`` when the image edge ``u = ±1`` maps to
    ``±R_in / (R - 1)``.
    """
    return inner_resolution / (inner_resolution + 2 * margin - 1)


def frustum_coordinates(
    points: torch.Tensor,
    camera_distance: float,
    fov_deg: float,
    uv_inner: float,
    depth_halfwidth: float = 1.0,
    depth_inner: float = 0.5,
) -> torch.Tensor:
    """World points -> plane coordinates (U, V, W) in ``[-1, 1]^3`` aligned to the canonical camera.

    The canonical camera sits at ``(0, 0, D)`` looking down -z (OpenGL: x right, y up), pinhole,
    ``fov_deg`` horizontal = vertical FOV (square images). A point's z-depth is ``d = D - z`` and
    its normalised image coordinates are ``u = x / (d tan(fov/2))``, ``v = y / (d tan(fov/2))``
    (``u = -1`` the left image edge, ``v = +1`` the top edge).

    - ``U = contract_1d(u, uv_inner)``, ``V = contract_1d(v, uv_inner)``: the canonical image
      fills ``[-uv_inner, uv_inner]`` linearly (so the xy plane is exactly image-aligned: every
      point that projects to pixel (i, j) samples the same texel at any depth), and the space seen
      only from novel views is contracted into the margin up to ``±1``.
    - ``W`` increases towards the camera (like world z): the slab ``|d - D| <= depth_halfwidth``
      around the pivot maps linearly onto ``[-depth_inner, depth_inner]``; farther space is
      contracted (``d = inf`` -> ``W = -1``); nearer space, ``0 < d < D - depth_halfwidth``, maps
      linearly onto ``(depth_inner, 1)``.

    Points at or behind the camera plane (``d <= 0``, never sampled by the canonical camera nor
    by the supported orbits) are clamped to ``d = 1e-4``. The map is continuous and invertible
    for ``d > 0`` (:func:`frustum_points`).

    Args:
        points: ``[..., 3]`` world points.

    Returns:
        ``[..., 3]`` (U, V, W).
    """
    tan_half = math.tan(math.radians(fov_deg) / 2)
    depth = (camera_distance - points[..., 2]).clamp_min(1e-4)
    inv_extent = (depth * tan_half).reciprocal()
    u = points[..., 0] * inv_extent
    v = points[..., 1] * inv_extent
    near_end = camera_distance - depth_halfwidth
    s = (depth - camera_distance) / depth_halfwidth
    far_or_slab = -contract_1d(s.clamp_min(-1.0), depth_inner)
    near = 1.0 - (1 - depth_inner) / near_end * depth  # depth_inner at near_end, 1 at the camera
    w = torch.where(depth < near_end, near, far_or_slab)
    return torch.stack([contract_1d(u, uv_inner), contract_1d(v, uv_inner), w], dim=-1)


def frustum_points(
    coords: torch.Tensor,
    camera_distance: float,
    fov_deg: float,
    uv_inner: float,
    depth_halfwidth: float = 1.0,
    depth_inner: float = 0.5,
) -> torch.Tensor:
    """Inverse of :func:`frustum_coordinates` for ``(U, V, W)`` in ``(-1, 1)^3``: ``[..., 3]`` world points."""
    tan_half = math.tan(math.radians(fov_deg) / 2)
    u, v = uncontract_1d(coords[..., 0], uv_inner), uncontract_1d(coords[..., 1], uv_inner)
    w = coords[..., 2]
    near_end = camera_distance - depth_halfwidth
    near_depth = near_end - (w - depth_inner) / (1 - depth_inner) * near_end
    slab_depth = camera_distance + depth_halfwidth * uncontract_1d(-w.clamp_max(depth_inner), depth_inner)
    depth = torch.where(w > depth_inner, near_depth, slab_depth)
    return torch.stack([u * depth * tan_half, v * depth * tan_half, camera_distance - depth], dim=-1)


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


@dataclass(frozen=True)
class PlaneLayout:
    """Where world points sample the tri-plane: one object used by every renderer (training, viewer,
    ns-render, ns-export, eval, splats, edits), through :class:`~vq3d_nerfstudio.stage1.field.TriplaneField`.

    - ``"frustum"``: :func:`frustum_coordinates` around the canonical camera; the planes have
      ``inner_resolution + 2 * margin`` texels, the inner ones covering the canonical image.
    - ``"world"``: :func:`contract` of world points (kept for ablations).
    """

    kind: str = "frustum"
    camera: CanonicalCamera = CanonicalCamera()
    """The canonical camera whose frustum the planes fill (the model's)."""
    inner_resolution: int = 64
    margin: int = 3
    depth_halfwidth: float = 1.0
    depth_inner: float = 0.5
    scene_scale: float = 1.5

    @property
    def resolution(self) -> int:
        """Texels on a side of each plane."""
        return self.inner_resolution + 2 * self.margin if self.kind == "frustum" else self.inner_resolution

    @property
    def uv_inner(self) -> float:
        return frustum_inner_extent(self.inner_resolution, self.margin)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """``[..., 3]`` world points -> ``[..., 3]`` plane coordinates in ``[-1, 1]^3``."""
        if self.kind == "world":
            return contract(points, self.scene_scale)
        return frustum_coordinates(
            points, self.camera.distance, self.camera.fov_deg, self.uv_inner, self.depth_halfwidth, self.depth_inner
        )

"""What one image allows at a novel view: the input warped through the true geometry (pure numpy).

A single image cannot show what it does not see. The best any single-image model can do at a novel
view is, roughly, to move the input's pixels where the true geometry puts them: this is the
*perfect-geometry ceiling* of ``vq3d eval``. A novel pixel is **co-visible** when the surface it
sees is the surface the input sees along the same 3D point (in the input's frame and not hidden
behind something nearer); those pixels take the input's colour there (bilinear), and every other
pixel (outside the input's frame, disoccluded) is left unmoved, as in the 'nothing moves' floor.

Cameras are nerfstudio's: OpenGL camera-to-world matrices (x right, y up, looking down -z), pixel
``(row i, column j)`` centred on ``(j + 0.5, i + 0.5)``; depth maps are z-depth in world units,
non-finite (``inf``) where a ray hits nothing: such a point is at infinity, so only the rotation
moves it, and it is co-visible where the input sees infinity too.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

#: Relative z-depth difference within which the input's depth and a novel pixel's 3D point count as
#: the same surface (the input's depth is read at the bilinear taps that carry weight).
COVISIBLE_REL_TOL = 0.05


def _pixel_rays(h: int, w: int, k: Dict[str, float]) -> np.ndarray:
    """(h, w, 3) camera-space directions with z = -1 through every pixel centre."""
    j, i = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5, indexing="xy")
    return np.stack([(j - k["cx"]) / k["fl_x"], -(i - k["cy"]) / k["fl_y"], -np.ones_like(j)], axis=-1)


def covisible_warp(
    input_rgb: np.ndarray,
    input_depth: np.ndarray,
    input_c2w: np.ndarray,
    novel_depth: np.ndarray,
    novel_c2w: np.ndarray,
    intrinsics: Dict[str, float],
    rel_tol: float = COVISIBLE_REL_TOL,
) -> Tuple[np.ndarray, np.ndarray]:
    """The input image seen from the novel camera through the true geometry.

    Args:
        input_rgb: (h, w, 3) input image (frame 0).
        input_depth: (h, w) its z-depth.
        input_c2w: (4, 4) its camera-to-world matrix (or (3, 4)).
        novel_depth: (h, w) z-depth at the novel view (same world units).
        novel_c2w: the novel camera-to-world matrix.
        intrinsics: ``fl_x, fl_y, cx, cy`` shared by both views.
    Returns:
        ``(warped, covisible)``: (h, w, 3) the input's colour at each co-visible novel pixel and the
        input's own pixel elsewhere (unmoved); (h, w) bool co-visibility mask.
    """
    h, w = novel_depth.shape
    rays = _pixel_rays(h, w, intrinsics)
    rot_n, t_n = np.asarray(novel_c2w, np.float64)[:3, :3], np.asarray(novel_c2w, np.float64)[:3, 3]
    rot_i, t_i = np.asarray(input_c2w, np.float64)[:3, :3], np.asarray(input_c2w, np.float64)[:3, 3]
    depth = np.asarray(novel_depth, np.float64)
    finite = np.isfinite(depth) & (depth > 0)
    # the novel pixel's point in the input camera: finite points move with the whole pose, points at
    # infinity (directions) with the rotation only
    directions = rays @ rot_n.T  # world
    points = t_n + np.where(finite, depth, 0.0)[..., None] * directions
    cam = np.where(finite[..., None], (points - t_i) @ rot_i, directions @ rot_i)
    z = -cam[..., 2]  # > 0 in front of the input camera
    with np.errstate(divide="ignore", invalid="ignore"):
        u = intrinsics["cx"] + intrinsics["fl_x"] * cam[..., 0] / z
        v = intrinsics["cy"] - intrinsics["fl_y"] * cam[..., 1] / z
    inside = (z > 0) & (u >= 0) & (u <= w) & (v >= 0) & (v <= h) & np.isfinite(u) & np.isfinite(v)
    # bilinear taps around (u - 0.5, v - 0.5), edges clamped
    x, y = np.where(inside, u - 0.5, 0.0), np.where(inside, v - 0.5, 0.0)
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    image = np.asarray(input_rgb, np.float64)
    in_depth = np.asarray(input_depth, np.float64)
    warped = np.zeros((h, w, 3))
    same_surface = np.zeros((h, w), bool)
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi = np.clip(x0 + dx, 0, w - 1).astype(int)
        yi = np.clip(y0 + dy, 0, h - 1).astype(int)
        warped += weight[..., None] * image[yi, xi]
        seen = in_depth[yi, xi]
        with np.errstate(invalid="ignore"):
            match = np.where(finite, np.abs(z - seen) <= rel_tol * seen, ~np.isfinite(seen))
        same_surface |= (weight > 1e-9) & match
    covisible = inside & same_surface
    return np.where(covisible[..., None], warped, image), covisible

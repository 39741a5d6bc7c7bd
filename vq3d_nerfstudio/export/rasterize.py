"""Rendering 3D Gaussian splats: a pure-torch rasterizer (CPU), the twin of ``gsplat.rasterization``
that the tests check against gsplat's own torch reference (projection, forward and backward) and a
literal per-pixel loop; gsplat's CUDA rasterizer behind the same signature; and the conversion of
nerfstudio cameras to the cameras both take.

Splat cameras follow gsplat and 3DGS: ``viewmats`` are OpenCV world-to-camera matrices (x right,
y down, z forward) and ``Ks`` pinhole intrinsics in pixels, pixel ``(row i, col j)`` centred at
``(j + 0.5, i + 0.5)``, the same pixel centres nerfstudio's cameras cast rays through
(:func:`cameras_to_viewmats` converts). Plain functions on tensors, apart from where splats come
from (:mod:`~vq3d_nerfstudio.export.splats`) and how they are fitted
(:mod:`~vq3d_nerfstudio.export.refine`), which both render with them.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from vq3d_nerfstudio.export.gaussians import Gaussians

ALPHA_MIN = 1.0 / 255.0
"""Splats with less alpha at a pixel are skipped there (3DGS, gsplat)."""
ALPHA_MAX = 0.999
"""Per-splat alpha is clamped to this (gsplat's CUDA rasterizer; Inria's uses 0.99)."""
TRANSMITTANCE_MIN = 1e-4
"""A pixel stops compositing before the splat that would take its transmittance to this or below."""

RasterizeFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


# ---- cameras ---------------------------------------------------------------------------------------
def cameras_to_viewmats(cameras) -> Tuple[torch.Tensor, torch.Tensor]:
    """nerfstudio ``Cameras`` (OpenGL camera-to-world, pinhole) -> (``[C, 4, 4]`` OpenCV
    world-to-camera ``viewmats``, ``[C, 3, 3]`` intrinsics ``Ks``), as gsplat takes them."""
    c2w = cameras.camera_to_worlds.reshape(-1, 3, 4).float()
    num = c2w.shape[0]
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], device=c2w.device).expand(num, 1, 4)
    c2w = torch.cat([c2w, bottom], 1)
    c2w = c2w * torch.tensor([1.0, -1.0, -1.0, 1.0], device=c2w.device)  # flip the y and z axes: OpenGL -> OpenCV
    Ks = torch.zeros(num, 3, 3, device=c2w.device)
    Ks[:, 0, 0] = cameras.fx.reshape(-1).float()
    Ks[:, 1, 1] = cameras.fy.reshape(-1).float()
    Ks[:, 0, 2] = cameras.cx.reshape(-1).float()
    Ks[:, 1, 2] = cameras.cy.reshape(-1).float()
    Ks[:, 2, 2] = 1.0
    return torch.linalg.inv(c2w), Ks


# ---- the splat renderer (pure torch) -------------------------------------------------------------
def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """``[N, 4]`` quaternions ``wxyz`` (normalised here) -> ``[N, 3, 3]`` rotation matrices."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, -1).reshape(*quats.shape[:-1], 3, 3)


def covariances(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``Sigma = R S S^T R^T`` (3DGS eq. 6): ``[N, 3, 3]`` world covariances."""
    M = quat_to_rotmat(quats) * scales[:, None, :]  # (N, 3, 3): R S
    return M @ M.transpose(-1, -2)


def project_gaussians(
    means: torch.Tensor,
    covars: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    eps2d: float = 0.3,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EWA splatting (Zwicker et al. 2001; 3DGS eq. 5): ``Sigma' = J W Sigma W^T J^T + eps2d I``.

    ``W`` is the viewmat's rotation, ``J`` the Jacobian of the perspective projection at the mean,
    evaluated (as in 3DGS and gsplat) with the mean's direction clamped to 1.3x the field of view so
    splats far off screen do not blow up; ``eps2d`` (variance, px^2) is 3DGS's low-pass filter.

    Args: ``[N, 3]`` means, ``[N, 3, 3]`` covariances (world), ``[C, 4, 4]`` viewmats, ``[C, 3, 3]`` Ks.
    Returns: ``means2d [C, N, 2]`` (pixels), ``covars2d [C, N, 2, 2]`` (px^2), ``depths [C, N]``
    (camera z).
    """
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    means_c = torch.einsum("cij,nj->cni", R, means) + t[:, None]  # (C, N, 3)
    covars_c = torch.einsum("cij,njk,clk->cnil", R, covars, R)  # (C, N, 3, 3)
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # (C, 1)
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    tx, ty, tz = means_c.unbind(-1)  # (C, N) each
    lim_x_pos, lim_x_neg = (width - cx) / fx + 0.3 * width / (2 * fx), cx / fx + 0.3 * width / (2 * fx)
    lim_y_pos, lim_y_neg = (height - cy) / fy + 0.3 * height / (2 * fy), cy / fy + 0.3 * height / (2 * fy)
    jx = tz * torch.clamp(tx / tz, min=-lim_x_neg, max=lim_x_pos)
    jy = tz * torch.clamp(ty / tz, min=-lim_y_neg, max=lim_y_pos)
    zero = torch.zeros_like(tz)
    J = torch.stack([fx / tz, zero, -fx * jx / tz**2, zero, fy / tz, -fy * jy / tz**2], -1).reshape(*tz.shape, 2, 3)
    covars2d = J @ covars_c @ J.transpose(-1, -2) + eps2d * torch.eye(2, dtype=means.dtype, device=means.device)
    means2d = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy], -1)  # (C, N, 2)
    return means2d, covars2d, tz


def _composite(
    means2d: torch.Tensor,
    covars2d: torch.Tensor,
    depths: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    width: int,
    height: int,
    near_plane: float,
    max_pairs: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back alpha compositing of one camera's projected splats (3DGS eq. 3, with gsplat's
    per-pixel rules: alpha = min(0.999, o exp(-d^T Sigma'^-1 d / 2)), skipped below 1/255; a pixel
    stops before the splat that would leave it transmittance <= 1e-4).

    Each splat is paired with the pixels of its footprint only: the box around its centre where
    alpha can reach 1/255 (radius ``sqrt(2 lambda_max ln(255 o))``, exact, so the result equals
    evaluating every splat at every pixel). Pairs are sorted by (pixel, depth) and composited with a
    segmented cumulative sum of ``log(1 - alpha)``; splats are taken in depth order in chunks of at
    most ``max_pairs`` pairs, carrying each pixel's transmittance between chunks, so memory stays
    bounded. Differentiable in means, covariances, opacities and colours.

    Returns ``rgb [H, W, D]``, ``alpha [H, W, 1]`` over a black background.
    """
    device, num_pixels = means2d.device, width * height
    a, b, c = covars2d[:, 0, 0], covars2d[:, 0, 1], covars2d[:, 1, 1]
    det = a * c - b * b
    # per splat: centre, the inverse covariance's xx, xy, yy, and opacity
    packed = torch.stack([means2d[:, 0], means2d[:, 1], c / det, -b / det, a / det, opacities], -1)  # (N, 6)
    with torch.no_grad():
        half = (a + c) / 2
        lambda_max = half + torch.sqrt((half**2 - det).clamp_min(0))
        reach = torch.sqrt(2 * lambda_max * torch.log((255 * opacities).clamp_min(1)))
        x0 = torch.ceil(means2d[:, 0] - reach - 0.5).clamp(0, width)
        x1 = torch.floor(means2d[:, 0] + reach - 0.5).clamp(-1, width - 1)
        y0 = torch.ceil(means2d[:, 1] - reach - 0.5).clamp(0, height)
        y1 = torch.floor(means2d[:, 1] + reach - 0.5).clamp(-1, height - 1)
        nx, ny = (x1 - x0 + 1).clamp_min(0).long(), (y1 - y0 + 1).clamp_min(0).long()
        valid = (depths > near_plane) & (det > 0) & (opacities >= ALPHA_MIN) & (nx > 0) & (ny > 0)
        order = torch.nonzero(valid)[:, 0]
        order = order[torch.argsort(depths[order], stable=True)]  # front to back
        counts = (nx * ny)[order]
        x0, y0, nx = x0.long()[order], y0.long()[order], nx[order]
    rgb = torch.zeros(num_pixels, colors.shape[-1], dtype=colors.dtype, device=device)
    transmittance = torch.ones(num_pixels, dtype=torch.float64, device=device)
    done = torch.zeros(num_pixels, dtype=torch.bool, device=device)
    ends = torch.cumsum(counts, 0)
    start, budget = 0, max(max_pairs, num_pixels)
    while start < order.shape[0]:
        base = int(ends[start - 1]) if start > 0 else 0
        stop = max(start + 1, int(torch.searchsorted(ends, base + budget, right=True)))
        with torch.no_grad():
            local = torch.arange(start, stop, device=device)
            g = torch.repeat_interleave(local, counts[start:stop])  # index into `order`
            offset = torch.arange(g.shape[0], device=device) - (ends[g] - counts[g] - base)
            px, py = x0[g] + offset % nx[g], y0[g] + offset // nx[g]
            pixel = py * width + px
        idx = order[g]
        mx, my, ca, cb, cc, op = packed[idx].unbind(-1)
        dx, dy = px + 0.5 - mx, py + 0.5 - my
        power = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
        alpha = torch.clamp_max(op * torch.exp(-power), ALPHA_MAX)
        with torch.no_grad():
            keep = torch.nonzero((power >= 0) & (alpha >= ALPHA_MIN) & ~done[pixel])[:, 0]
            # pairs come in depth order: a stable sort by pixel keeps it within each pixel
            keep = keep[torch.sort(pixel[keep].int(), stable=True).indices]
            pix = pixel[keep]
            seg_counts = torch.bincount(pix, minlength=num_pixels)
            seg_start = (torch.cumsum(seg_counts, 0) - seg_counts)[pix]  # each pair's pixel's first pair
        alpha = alpha[keep]
        log_keep = torch.log1p(-alpha.double())
        exclusive = torch.cumsum(log_keep, 0) - log_keep
        exclusive = exclusive - exclusive[seg_start]  # restart the sum at each pixel's first splat
        t_before = transmittance[pix] * torch.exp(exclusive)
        with torch.no_grad():
            live = t_before * (1 - alpha.double()) > TRANSMITTANCE_MIN
            done = done.index_fill(0, pix[~live], True)
        weight = (alpha.double() * t_before * live).to(colors.dtype)
        rgb = rgb.index_add(0, pix, weight[:, None] * colors[idx[keep]])
        log_t = torch.zeros(num_pixels, dtype=torch.float64, device=device).index_add(0, pix, log_keep * live)
        transmittance = transmittance * torch.exp(log_t)
        start = stop
    alpha_img = (1 - transmittance).to(colors.dtype)
    return rgb.reshape(height, width, -1), alpha_img.reshape(height, width, 1)


def rasterize(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    colors: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    width: int,
    height: int,
    backgrounds: Optional[torch.Tensor] = None,
    eps2d: float = 0.3,
    near_plane: float = 0.01,
    max_pairs: int = 1 << 22,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Render 3D Gaussians: the pure-torch (CPU) twin of ``gsplat.rasterization`` with post-activation
    colours (``sh_degree=None``), same arguments and conventions (``viewmats`` OpenCV
    world-to-camera, ``quats`` wxyz, ``scales`` linear, ``opacities`` in (0, 1)).

    Returns ``colors [C, H, W, D]`` and ``alphas [C, H, W, 1]``; ``backgrounds [C, D]`` fill what the
    splats leave (default black). Splats evaluate exactly down to alpha 1/255 (gsplat culls at
    3 sigma by 16 px tile, a hair less); memory is bounded by ``max_pairs`` (splat, pixel) pairs.
    """
    covars = covariances(quats, scales)
    means2d, covars2d, depths = project_gaussians(means, covars, viewmats, Ks, width, height, eps2d)
    images, alphas = [], []
    for cam in range(viewmats.shape[0]):
        rgb, alpha = _composite(
            means2d[cam], covars2d[cam], depths[cam], opacities, colors, width, height, near_plane, max_pairs
        )
        if backgrounds is not None:
            rgb = rgb + (1 - alpha) * backgrounds[cam]
        images.append(rgb)
        alphas.append(alpha)
    return torch.stack(images), torch.stack(alphas)


def gsplat_rasterize(means, quats, scales, opacities, colors, viewmats, Ks, width, height, backgrounds=None):
    """``gsplat.rasterization`` (CUDA) with the same arguments and returns as :func:`rasterize`."""
    from gsplat import rasterization

    rgb, alpha, _ = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, backgrounds=backgrounds)
    return rgb, alpha


def render_gaussians(gaussians: Gaussians, viewmats: torch.Tensor, Ks: torch.Tensor, width: int, height: int,
                     rasterize_fn: RasterizeFn = rasterize) -> Tuple[torch.Tensor, torch.Tensor]:
    """Render ``gaussians`` from ``[C]`` cameras with ``rasterize_fn``: ``([C, H, W, 3], [C, H, W, 1])``."""
    g = gaussians
    return rasterize_fn(g.means, g.quats, g.scales, g.opacities, g.colors, viewmats, Ks, width, height)

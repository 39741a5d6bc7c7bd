"""3D Gaussian splats from a VQ3D NeRF: isotropic splats placed where the NeRF's rendering weight
lies along the rays of cameras orbiting the input view (the first step of ``vq3d export-splats``;
:func:`~vq3d_nerfstudio.export.refine.refine_gaussians` may then fit them to the NeRF's renders).

Frames and units: world points are in the NeRF's world frame (OpenGL: y up; the canonical camera at
``(0, 0, 2)`` looks at the origin), in world units. The splats are
:class:`~vq3d_nerfstudio.export.gaussians.Gaussians`; rendering them is
:mod:`~vq3d_nerfstudio.export.rasterize`'s and their file :mod:`~vq3d_nerfstudio.export.ply`'s.
Everything here is plain functions on tensors except :func:`nerf_samples`, which runs the model's
own samplers and field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from vq3d_nerfstudio.export.gaussians import Gaussians
from vq3d_nerfstudio.export.rasterize import ALPHA_MAX
from vq3d_nerfstudio.geometry.cameras import orbit_cameras


# ---- initialisation from the NeRF's rendering weights --------------------------------------------
@dataclass
class NerfSamples:
    """The fine samples of ``R`` rays, ``S`` per ray, as the model composites them."""

    positions: torch.Tensor
    """``[R, S, 3]`` sample midpoints, world frame (the sampler works in world space; the field
    contracts internally, so nothing needs un-contracting)."""
    rgb: torch.Tensor
    """``[R, S, 3]`` field colour in [0, 1]."""
    alphas: torch.Tensor
    """``[R, S]`` per-sample alpha ``1 - exp(-density * delta)``; the last is 1 when the model's
    background is its last sample (see :func:`nerf_samples`)."""
    weights: torch.Tensor
    """``[R, S]`` rendering weights ``alpha_i T_i``; they sum to 1 with an opaque last sample."""
    distances: torch.Tensor
    """``[R, S]`` distance of each midpoint from the ray origin (world units; unit directions)."""
    origins: torch.Tensor
    """``[R, 3]`` ray origins."""
    directions: torch.Tensor
    """``[R, 3]`` unit ray directions."""
    pixel_angles: torch.Tensor
    """``[R]`` angular size of the ray's pixel (radians): the pixel's footprint at distance ``t``
    is ``t * pixel_angle``."""


@torch.no_grad()
def nerf_samples(model, ray_bundle, planes: torch.Tensor, batch_idx: Optional[torch.Tensor] = None, field=None) -> NerfSamples:
    """Run ``model``'s renderer passes (:meth:`~vq3d_nerfstudio.stage1.renderer.NerfRenderer.sample`:
    the samplers and the field, as every render does) on ``ray_bundle`` (flat, ``[R]``) and keep
    what compositing discards: each fine sample's position, colour and alpha. With the model's
    ``last_sample`` background the leftover transmittance is given to the last sample (alpha 1), so
    ``sum_i weights_i * rgb_i`` is the model's rendered colour (tests check both against
    ``render_rays``). ``field``: another field than ``model.field`` (a scene with an object placed
    in it, a baked field)."""
    from nerfstudio.field_components.field_heads import FieldHeadNames

    if batch_idx is None:
        batch_idx = torch.zeros(len(ray_bundle), dtype=torch.long, device=planes.device)
    passes = model.renderer.sample(ray_bundle, model.field if field is None else field, planes, batch_idx)
    ray_bundle, fine = passes.ray_bundle, passes.fine
    density = passes.fine_outputs[FieldHeadNames.DENSITY]
    weights = passes.fine_weights[..., 0]  # (R, S)
    alphas = (1 - torch.exp(-fine.deltas * density))[..., 0]  # (R, S)
    if getattr(model.renderer.renderer_rgb, "background_color", None) == "last_sample":
        weights = weights.clone()
        weights[:, -1] += (1 - weights.sum(-1)).clamp_min(0)
        alphas = alphas.clone()
        alphas[:, -1] = 1.0
    pixel_area = ray_bundle.pixel_area[:, 0] if ray_bundle.pixel_area is not None else None
    if pixel_area is None:
        raise ValueError("rays without pixel_area: generate them from Cameras")
    return NerfSamples(
        positions=fine.frustums.get_positions(),
        rgb=passes.fine_outputs[FieldHeadNames.RGB],
        alphas=alphas,
        weights=weights,
        distances=((fine.frustums.starts + fine.frustums.ends) / 2)[..., 0],
        origins=ray_bundle.origins,
        directions=ray_bundle.directions,
        pixel_angles=pixel_area.sqrt(),
    )


def pull_in_background(positions: torch.Tensor, origins: torch.Tensor, directions: torch.Tensor, radius: float) -> torch.Tensor:
    """Move points farther than ``radius`` from the pivot (origin) back along their own rays onto
    the sphere of that radius: the camera that saw a point still sees it at the same pixel, and
    splat viewers' far planes keep the sky (the NeRF's far samples sit near its far plane, ~1000
    units away). Rays start inside the sphere.

    Args: ``[M, 3]`` points, their rays' ``[M, 3]`` origins and unit directions.
    Returns: ``[M, 3]`` points.
    """
    far = positions.norm(dim=-1) > radius
    od = (origins * directions).sum(-1)
    # |o + t d| = radius, the root in front of the origin: t = -o.d + sqrt((o.d)^2 - |o|^2 + r^2)
    t = -od + torch.sqrt((od**2 - origins.pow(2).sum(-1) + radius**2).clamp_min(0))
    return torch.where(far[:, None], origins + directions * t[:, None], positions)


def view_cells(
    positions: torch.Tensor, camera_distance: float, cell_angle: float, depth_ratio: float = 5.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cells of the canonical camera's projective space: bins of ``x / z`` and ``y / z`` (``z`` the
    depth from the canonical camera at ``(0, 0, camera_distance)`` looking down -z) ``cell_angle``
    wide, and of disparity ``1 / z`` so that a cell at the pivot is ``depth_ratio`` times deeper than
    wide. Cells widen with depth as pixel footprints do (near detail and the far background get
    splats in proportion to their screen area) and deepen with its square, as mip-NeRF 360's
    contraction and the disparity-spaced sampler do: weight a NeRF spreads along rays, which a
    single photo leaves uncertain, merges into a few splats rather than many thin layers.

    Args: ``[M, 3]`` world points; the canonical camera's distance to the pivot; bin width (radians).
    Returns: ``[M]`` int64 cell keys (equal keys: same cell), ``[M]`` cell widths (world units).
    """
    z = (camera_distance - positions[:, 2]).clamp_min(0.05 * camera_distance)
    disparity_bin = depth_ratio * cell_angle / camera_distance  # depth bin z^2 * this = ratio * width at z = distance
    bins = torch.stack([positions[:, 0] / z / cell_angle, positions[:, 1] / z / cell_angle, 1 / z / disparity_bin], -1)
    cell = (torch.floor(bins) + 2**20).clamp(0, 2**21 - 1).long()  # 21 bits a coordinate
    return (cell[:, 0] * 2**21 + cell[:, 1]) * 2**21 + cell[:, 2], z * cell_angle


def _merge_in_cells(
    keys: torch.Tensor,
    ray_ids: torch.Tensor,
    positions: torch.Tensor,
    rgb: torch.Tensor,
    alphas: torch.Tensor,
    weights: torch.Tensor,
    sizes: torch.Tensor,
) -> Dict[str, torch.Tensor]:
    """One splat per distinct cell ``key`` (``[M]`` samples in, ``[K]`` splats out): weight-averaged
    position, colour and cell width; opacity = the cell's alpha along each ray through it
    (``1 - prod(1 - alpha_i)`` over that ray's samples inside), averaged over rays by their weight
    there; ``weights`` = the summed rendering weight."""
    cell, inverse = torch.unique(keys, return_inverse=True)
    num = cell.shape[0]

    def wsum(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((num, *values.shape[1:]), dtype=values.dtype)
        return out.index_add_(0, inverse, values)

    total = wsum(weights)
    denom = total.clamp_min(1e-12)
    # per (cell, ray): alpha through the cell and the ray's weight in it
    pair, pair_inverse = torch.unique(inverse * (int(ray_ids.max()) + 1) + ray_ids, return_inverse=True)
    log_transmit = torch.zeros(pair.shape[0], dtype=torch.float64).index_add_(
        0, pair_inverse, torch.log1p(-alphas.double().clamp(max=1 - 1e-7))
    )
    pair_alpha = (1 - torch.exp(log_transmit)).float()
    pair_weight = torch.zeros(pair.shape[0]).index_add_(0, pair_inverse, weights)
    pair_cell = pair // (int(ray_ids.max()) + 1)
    opacity = torch.zeros(num).index_add_(0, pair_cell, pair_alpha * pair_weight) / denom
    return {
        "means": wsum(weights[:, None] * positions) / denom[:, None],
        "colors": wsum(weights[:, None] * rgb) / denom[:, None],
        "sizes": wsum(weights * sizes) / denom,  # the cell's width at its samples' depths
        "opacities": opacity,
        "weights": total,
    }


@torch.no_grad()
def gaussians_from_samples(
    samples: List[NerfSamples],
    num_gaussians: int,
    camera_distance: float,
    min_weight: float = 0.01,
    background_radius: float = 50.0,
    scale_mult: float = 0.5,
    depth_ratio: float = 5.0,
) -> Gaussians:
    """Isotropic splats where the NeRF's rendering weight sits, seen from the rays in ``samples``.

    1. Samples with rendering weight ``>= min_weight`` are kept (what the renders show). They are
       world points already (the sampler works in world space; only the field contracts), but the
       far ones, up to the far plane, are pulled in along their rays (:func:`pull_in_background`).
    2. They are merged in cells of the canonical camera's projective space (:func:`view_cells`),
       about one pixel of the rays' cameras wide and ``depth_ratio`` times deeper at the pivot,
       across rays and cameras, by :func:`_merge_in_cells`: weight-averaged position and colour,
       the alpha of the cell along each ray as opacity. When more than ``num_gaussians`` cells hold
       weight, all cells grow by one factor (bisected) until they fit; should 1024x not do, the
       cells with least weight go.
    3. Each splat's standard deviation is ``scale_mult`` times its cell's width: at 0.5 a grid of
       splats one cell apart sums to a nearly flat coverage (no holes, little blur). Rotation is
       the identity.

    Args:
        samples: from :func:`nerf_samples`, one entry per batch of rays (ray ids are per entry).
        camera_distance: of the canonical camera from the pivot (world units).
    """
    parts: Dict[str, List[torch.Tensor]] = {k: [] for k in ("positions", "rgb", "alphas", "weights", "ray_ids")}
    ray_offset = 0
    for s in samples:
        num_rays, num_samples = s.weights.shape
        keep = s.weights >= min_weight  # (R, S)
        ray, _ = keep.nonzero(as_tuple=True)
        parts["positions"].append(
            pull_in_background(s.positions[keep].cpu(), s.origins[ray].cpu(), s.directions[ray].cpu(), background_radius)
        )
        parts["rgb"].append(s.rgb[keep].float().cpu())
        parts["alphas"].append(s.alphas[keep].float().cpu())
        parts["weights"].append(s.weights[keep].float().cpu())
        parts["ray_ids"].append(ray.cpu() + ray_offset)
        ray_offset += num_rays
    cat = {k: torch.cat(v) for k, v in parts.items()}
    if cat["weights"].numel() == 0:
        raise ValueError(f"no sample has rendering weight >= {min_weight}: nothing to export")

    pixel_angle = float(torch.cat([x.pixel_angles.reshape(-1) for x in samples]).median())

    def cells(mult: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return view_cells(cat["positions"], camera_distance, mult * pixel_angle, depth_ratio)

    # the finest cells (from one pixel wide up, bisected in log scale) whose count fits the budget
    mult = 1.0
    if torch.unique(cells(mult)[0]).numel() > num_gaussians:
        low, high = 0.0, math.log(1024.0)  # invariant: exp(low) gives too many cells
        for _ in range(12):
            mid = (low + high) / 2
            low, high = (mid, high) if torch.unique(cells(math.exp(mid))[0]).numel() > num_gaussians else (low, mid)
        mult = math.exp(high)
    keys, sizes = cells(mult)
    merged = _merge_in_cells(keys, cat["ray_ids"], cat["positions"], cat["rgb"], cat["alphas"], cat["weights"], sizes)
    if merged["weights"].shape[0] > num_gaussians:
        top = torch.topk(merged["weights"], num_gaussians).indices
        merged = {k: v[top] for k, v in merged.items()}
    sigma = scale_mult * merged["sizes"]
    num = merged["means"].shape[0]
    return Gaussians(
        means=merged["means"],
        scales=sigma[:, None].expand(num, 3).clone(),
        quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(num, 4).clone(),
        opacities=merged["opacities"].clamp(1e-4, ALPHA_MAX),
        colors=merged["colors"].clamp(0, 1),
    )


def export_poses(num_cameras: int, max_yaw_deg: float, max_elevation_deg: float) -> List[Tuple[float, float]]:
    """(yaw, elevation) of the cameras whose rays place the splats: the canonical view, then the
    others evenly round an ellipse of ``+-max_yaw`` by ``+-max_elevation`` around it."""
    poses = [(0.0, 0.0)]
    for i in range(num_cameras - 1):
        angle = 2 * math.pi * i / (num_cameras - 1)
        poses.append((max_yaw_deg * math.cos(angle), max_elevation_deg * math.sin(angle)))
    return poses


def export_cameras(poses: List[Tuple[float, float]], resolution: int, distance: float, fov_deg: float, margin_deg: float):
    """Square cameras at ``poses`` that see ``margin_deg`` farther on every side than ``fov_deg``, at
    the pixel size ``resolution`` pixels give ``fov_deg`` (so views in between, and what the edge of
    a novel view shows, were seen well inside some camera's frame, not only at its border)."""
    wide = fov_deg + 2 * margin_deg
    size = round(resolution * math.tan(math.radians(wide / 2)) / math.tan(math.radians(fov_deg / 2)))
    return orbit_cameras(poses, size, distance, wide)


@dataclass
class SplatSettings:
    """Where splats come from (``vq3d export-splats``'s options; the viewer's splat toggle uses
    the defaults). See :func:`gaussians_from_samples` for the merging options."""

    num_gaussians: int = 20000
    num_cameras: int = 8
    max_yaw_deg: float = 20.0
    max_elevation_deg: float = 8.0
    ray_resolution: int = 0
    """Pixels on a side over the model's field of view (0: the model's image size)."""
    margin_deg: float = 10.0
    min_weight: float = 0.01
    background_radius: float = 50.0
    scale_mult: float = 0.5
    cell_depth_ratio: float = 5.0


@torch.no_grad()
def gaussians_from_nerf(model, planes: torch.Tensor, settings: SplatSettings, field=None, rays_per_chunk: int = 4096):
    """Splats of one scene's NeRF (``planes``; ``field`` instead of ``model.field`` when given): the
    fine samples along the rays of :func:`export_cameras` at :func:`export_poses`, merged by
    :func:`gaussians_from_samples`. Returns ``(gaussians, cameras)``."""
    poses = export_poses(settings.num_cameras, settings.max_yaw_deg, settings.max_elevation_deg)
    resolution = settings.ray_resolution or model.config.image_size
    cameras = export_cameras(poses, resolution, model.camera_distance, model.fov_deg, settings.margin_deg)
    cameras = cameras.to(planes.device)
    samples = []
    for i in range(len(poses)):
        rays = cameras.generate_rays(camera_indices=i, keep_shape=False)
        for start in range(0, len(rays), rays_per_chunk):
            samples.append(nerf_samples(model, rays[start : start + rays_per_chunk], planes, field=field))
    gaussians = gaussians_from_samples(
        samples, settings.num_gaussians, model.camera_distance, settings.min_weight, settings.background_radius,
        settings.scale_mult, settings.cell_depth_ratio,
    )
    return gaussians, cameras

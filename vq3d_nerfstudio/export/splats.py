"""3D Gaussian splats from a VQ3D NeRF: initialisation from rendering weights, the standard 3DGS
``.ply`` layout, a pure-torch splat rasterizer (CPU) and an optional refinement with gsplat (CUDA).

Frames and units: world points are in the NeRF's world frame (OpenGL: y up; the canonical camera at
``(0, 0, 2)`` looks at the origin), in world units. Splat cameras follow gsplat and 3DGS:
``viewmats`` are OpenCV world-to-camera matrices (x right, y down, z forward) and ``Ks`` pinhole
intrinsics in pixels, pixel ``(row i, col j)`` centred at ``(j + 0.5, i + 0.5)``, the same pixel
centres nerfstudio's cameras cast rays through (:func:`cameras_to_viewmats` converts).

Gaussians follow 3DGS (Kerbl et al., SIGGRAPH 2023): mean ``mu``, covariance
``Sigma = R S S^T R^T`` (``S = diag(scales)``, ``R`` from a unit quaternion ``wxyz``), an opacity and
a colour (degree 0 spherical harmonics: ``rgb = 0.5 + C0 * f_dc``, no view dependence since the NeRF
has none). Everything here is plain functions on tensors except :func:`nerf_samples`, which runs the
model's own samplers and field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from plyfile import PlyData, PlyElement, PlyParseError

from vq3d_nerfstudio.files import atomic_path
from vq3d_nerfstudio.geometry.cameras import orbit_cameras

SH_C0 = 0.28209479177387814
"""Degree-0 real spherical harmonic, ``1 / (2 sqrt(pi))``: 3DGS stores colour as ``(rgb - 0.5) / C0``."""

NUM_SH_REST = 45
"""f_rest coefficients in the standard layout (degree 3: 15 per channel), written as zeros."""

PLY_PROPERTIES: Tuple[str, ...] = (
    "x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2",
    *(f"f_rest_{i}" for i in range(NUM_SH_REST)),
    "opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
)
"""The vertex properties of a 3DGS ``.ply`` (Inria's ``save_ply``), in order, all float32."""

ALPHA_MIN = 1.0 / 255.0
"""Splats with less alpha at a pixel are skipped there (3DGS, gsplat)."""
ALPHA_MAX = 0.999
"""Per-splat alpha is clamped to this (gsplat's CUDA rasterizer; Inria's uses 0.99)."""
TRANSMITTANCE_MIN = 1e-4
"""A pixel stops compositing before the splat that would take its transmittance to this or below."""

RasterizeFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Gaussians:
    """``N`` 3D Gaussians, activated values (what the renderer uses, not the ``.ply`` encodings)."""

    means: torch.Tensor
    """``[N, 3]`` centres, world frame and units."""
    scales: torch.Tensor
    """``[N, 3]`` standard deviations along the rotated axes (world units, > 0)."""
    quats: torch.Tensor
    """``[N, 4]`` unit quaternions, ``wxyz``."""
    opacities: torch.Tensor
    """``[N]`` in (0, 1)."""
    colors: torch.Tensor
    """``[N, 3]`` RGB, nominally in [0, 1]."""

    def __len__(self) -> int:
        return self.means.shape[0]

    def to(self, device) -> "Gaussians":
        return Gaussians(*(t.to(device) for t in (self.means, self.scales, self.quats, self.opacities, self.colors)))

    def detach(self) -> "Gaussians":
        return Gaussians(*(t.detach() for t in (self.means, self.scales, self.quats, self.opacities, self.colors)))


# ---- encodings and the .ply file ------------------------------------------------------------------
def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    """RGB -> degree-0 SH coefficient (``f_dc``): ``(rgb - 0.5) / C0``."""
    return (rgb - 0.5) / SH_C0


def sh_dc_to_rgb(f_dc: torch.Tensor) -> torch.Tensor:
    """Degree-0 SH coefficient -> RGB: ``0.5 + C0 * f_dc`` (the inverse of :func:`rgb_to_sh_dc`)."""
    return 0.5 + SH_C0 * f_dc


def write_splat_ply(path: Path, gaussians: Gaussians) -> None:
    """Write the standard 3DGS ``.ply``: binary little endian, one ``vertex`` element with the float
    properties :data:`PLY_PROPERTIES` (through ``plyfile``). Encodings as Inria's 3DGS stores them:
    ``f_dc`` = :func:`rgb_to_sh_dc`, ``opacity`` = logit, ``scale_*`` = log, ``rot_*`` = normalised
    ``wxyz``; normals and ``f_rest_*`` are zeros. Written atomically (:func:`~vq3d_nerfstudio.files.atomic_path`)."""
    g = gaussians.detach().to("cpu")
    count = len(g)
    opacity = g.opacities.double().clamp(1e-6, 1 - 1e-6)
    columns = {
        "x": g.means[:, 0], "y": g.means[:, 1], "z": g.means[:, 2],
        "opacity": torch.log(opacity / (1 - opacity)),
    }
    f_dc = rgb_to_sh_dc(g.colors)
    log_scales = torch.log(g.scales.clamp_min(1e-12))
    quats = F.normalize(g.quats, dim=-1)
    for i in range(3):
        columns[f"f_dc_{i}"] = f_dc[:, i]
        columns[f"scale_{i}"] = log_scales[:, i]
    for i in range(4):
        columns[f"rot_{i}"] = quats[:, i]
    vertex = np.zeros(count, dtype=[(name, "<f4") for name in PLY_PROPERTIES])
    for name, values in columns.items():
        vertex[name] = values.float().numpy()
    with atomic_path(Path(path)) as tmp:
        PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<").write(str(tmp))


def read_splat_ply(path: Path) -> Gaussians:
    """Read a 3DGS ``.ply`` whose vertex properties are all float (any order, extra properties
    ignored; the inverse of :func:`write_splat_ply`, also for Inria's files). Only the DC colour is
    read: view-dependent ``f_rest`` terms are dropped."""
    try:
        ply = PlyData.read(str(path))
    except (PlyParseError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable PLY file ({err})") from err
    if [element.name for element in ply.elements] != ["vertex"]:
        raise ValueError(f"{path}: expected one 'vertex' element, found {[e.name for e in ply.elements]}")
    vertex = ply["vertex"].data
    for prop in ply["vertex"].properties:
        if getattr(prop, "val_dtype", None) not in ("f4", "float", "float32"):
            raise ValueError(f"{path}: property {prop.name} is {getattr(prop, 'val_dtype', 'a list')}; a 3DGS .ply holds floats")
    missing = {"x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity", "scale_0", "scale_1", "scale_2",
               "rot_0", "rot_1", "rot_2", "rot_3"} - set(vertex.dtype.names)
    if missing:
        raise ValueError(f"{path}: missing properties {sorted(missing)}")

    def stack(keys: List[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([vertex[k].astype(np.float32) for k in keys], axis=-1))

    return Gaussians(
        means=stack(["x", "y", "z"]),
        scales=torch.exp(stack(["scale_0", "scale_1", "scale_2"])),
        quats=F.normalize(stack(["rot_0", "rot_1", "rot_2", "rot_3"]), dim=-1),
        opacities=torch.sigmoid(stack(["opacity"])[:, 0]),
        colors=sh_dc_to_rgb(stack(["f_dc_0", "f_dc_1", "f_dc_2"])),
    )


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


# ---- refinement against the NeRF's renders ------------------------------------------------------
def refine_gaussians(
    gaussians: Gaussians,
    targets: torch.Tensor,
    viewmats: torch.Tensor,
    Ks: torch.Tensor,
    steps: int,
    rasterize_fn: RasterizeFn = gsplat_rasterize,
    means_lr: float = 1.6e-4,
    scales_lr: float = 5e-3,
    quats_lr: float = 1e-3,
    opacities_lr: float = 5e-2,
    colors_lr: float = 2.5e-3,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> Gaussians:
    """Fit the splats to ``targets`` (``[C, H, W, 3]`` NeRF renders from the ``[C]`` cameras) with an
    L1 loss, one camera per step, Adam on the 3DGS parameterisation (means, log-scales, quaternions,
    logit-opacities, SH DC colours; the learning rates are gsplat's ``simple_trainer`` defaults,
    ``means_lr`` per unit of the scene's extent, here the cameras' distance to the pivot). No
    densification or pruning: the count stays as initialised. ``rasterize_fn`` is gsplat's CUDA
    rasterizer in ``vq3d export-splats``; :func:`rasterize` works too (slowly, on the CPU).
    """
    device = targets.device
    extent = float(torch.linalg.inv(viewmats)[:, :3, 3].norm(dim=-1).mean())
    opacity = gaussians.opacities.clamp(1e-4, 1 - 1e-4)
    params = {
        "means": gaussians.means.clone(),
        "log_scales": torch.log(gaussians.scales),
        "quats": gaussians.quats.clone(),
        "logit_opacities": torch.log(opacity / (1 - opacity)),
        "sh_dc": rgb_to_sh_dc(gaussians.colors),
    }
    params = {k: torch.nn.Parameter(v.detach().to(device).contiguous()) for k, v in params.items()}
    lrs = {"means": means_lr * extent, "log_scales": scales_lr, "quats": quats_lr, "logit_opacities": opacities_lr,
           "sh_dc": colors_lr}
    optimizer = torch.optim.Adam([{"params": [params[k]], "lr": lrs[k], "name": k} for k in params], eps=1e-15)

    def current() -> Gaussians:
        return Gaussians(
            means=params["means"],
            scales=torch.exp(params["log_scales"]),
            quats=F.normalize(params["quats"], dim=-1),
            opacities=torch.sigmoid(params["logit_opacities"]),
            colors=sh_dc_to_rgb(params["sh_dc"]).clamp_min(0),  # gsplat's SH activation
        )

    height, width = targets.shape[1:3]
    for step in range(steps):
        cam = step % viewmats.shape[0]
        rgb, _ = render_gaussians(current(), viewmats[cam : cam + 1], Ks[cam : cam + 1], width, height, rasterize_fn)
        loss = (rgb[0] - targets[cam]).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(step, float(loss))
    out = current().detach()
    out.colors = out.colors.clamp(0, 1)
    return out

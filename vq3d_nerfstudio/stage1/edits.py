"""Scene edits on single-image NeRFs: interpolation between two images' NeRFs, and placing one
image's object into another image's scene (VQ3D Sec. 5: interpolation and object insertion).

Interpolation spaces (``space``):

- ``latent`` (default): the continuous encoder latent before quantization. Per token, the unit
  latents of the two images are slerped (VQ; FSQ latents are blended linearly); the quantization residual (code minus latent) is blended
  linearly on top, so ``t = 0`` and ``t = 1`` decode exactly to the two reconstructions while every
  ``t`` in between is a smooth path that never snaps from code to code.
- ``triplane``: linear blend of the two decoded tri-planes (features, not images).
- ``codes``: blend the latents, then snap them with the quantizer's own rounding: what a purely
  quantized latent gives (jumps between codes; kept for comparison).

Composition: densities add, colours are density-weighted per sample. For an object placed at
``position`` with ``scale``, a world point ``x`` reads the object's NeRF at ``(x - position) / scale``
(its own frame, pivot at the origin) with density divided by ``scale`` (so its optical thickness is
scale-invariant), kept only inside a box around its pivot and, when a foreground mask of the
object's photo is given, inside the mask's viewing frustum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import torch

from vq3d_nerfstudio.geometry.poses import CanonicalCamera
from vq3d_nerfstudio.stage1.field import PointField
from vq3d_nerfstudio.stage1.quantizer import FactorizedQuantizer

InterpolationSpace = Literal["latent", "triplane", "codes"]


# ---- interpolation ------------------------------------------------------------------------------
def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of unit vectors along the last axis (linear where they nearly agree)."""
    dot = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    sin = torch.sin(omega)
    small = sin.abs() < eps
    wa = torch.where(small, torch.full_like(dot, 1.0 - t), torch.sin((1.0 - t) * omega) / torch.where(small, 1.0, sin))
    wb = torch.where(small, torch.full_like(dot, t), torch.sin(t * omega) / torch.where(small, 1.0, sin))
    return wa * a + wb * b


@dataclass
class EncodedImage:
    """What interpolation needs of one image: latents (code space, before snapping) and snapped codes
    ``[1, T, d]``, tri-planes."""

    latents: torch.Tensor
    codes: torch.Tensor
    planes: torch.Tensor


@torch.no_grad()
def encode_image(model, image: torch.Tensor) -> EncodedImage:
    """``image``: ``[S, S, 3]`` in [0, 1] (load_image's output)."""
    x = image.permute(2, 0, 1)[None].to(model.device, torch.float32)
    quantizer = model.quantizer
    latents = quantizer.encode(model.encoder(x))
    # continuous tokens (no-quantizer) are their own codes
    codes = quantizer.get_codes_from_indices(quantizer.snap(latents)) if quantizer.has_codes else latents
    return EncodedImage(latents, codes, model.decoder(quantizer.output_from_codes(codes)))


@torch.no_grad()
def interpolate(model, a: EncodedImage, b: EncodedImage, t: float, space: InterpolationSpace = "latent") -> torch.Tensor:
    """Tri-planes ``[1, 3, C, R, R]`` of the scene a fraction ``t`` of the way from ``a`` to ``b``."""
    if space == "triplane":
        return torch.lerp(a.planes, b.planes, t)
    quantizer = model.quantizer
    # VQ latents are unit vectors (great-circle blend); FSQ latents are points of a box and continuous
    # tokens points of their space (straight blends)
    z = slerp(a.latents, b.latents, t) if isinstance(quantizer, FactorizedQuantizer) else torch.lerp(a.latents, b.latents, t)
    if space == "codes":
        return model.decoder(quantizer.output_from_codes(quantizer.get_codes_from_indices(quantizer.snap(z))))
    if space != "latent":
        raise ValueError(f"unknown interpolation space {space!r}; use latent, triplane or codes")
    z = z + (1.0 - t) * (a.codes - a.latents) + t * (b.codes - b.latents)
    return model.decoder(quantizer.output_from_codes(z))


# ---- composition ----------------------------------------------------------------------------------
def composite(density_a: torch.Tensor, rgb_a: torch.Tensor, density_b: torch.Tensor, rgb_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two fields at the same points: densities ``[N, 1]`` add; colours ``[N, 3]`` are
    density-weighted, written so that where ``b`` is empty the result is exactly ``a``."""
    density = density_a + density_b
    share = density_b / density.clamp_min(1e-12)
    return density, rgb_a + share * (rgb_b - rgb_a)


@dataclass
class Placement:
    """An object's NeRF placed into a scene."""

    planes: torch.Tensor
    """The object's tri-planes ``[1, 3, C, R, R]`` (from its own photo)."""
    position: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Where the object's pivot goes, world units (the scene camera is at (0, 0, camera distance))."""
    scale: float = 1.0
    """Size of the object relative to its own NeRF."""
    box: Tuple[float, float, float, float, float, float] = (-0.5, -0.5, -0.5, 0.5, 0.5, 0.5)
    """Keep the object's NeRF inside this box, ``(x0, y0, z0, x1, y1, z1)`` in its own frame (pivot at
    the origin, world units): e.g. raise y0 above the object's ground to leave the ground behind."""
    mask: Optional[torch.Tensor] = None
    """Foreground mask ``[H, W]`` bool of the object's photo: keep only what projects inside it."""
    camera: CanonicalCamera = CanonicalCamera()
    """The object photo's canonical camera (the model's; for the mask)."""


def object_region(local: torch.Tensor, placement: Placement) -> torch.Tensor:
    """``[N]`` bool: object-frame points inside the kept region (the box, and the mask's frustum)."""
    box = torch.tensor(placement.box, dtype=local.dtype, device=local.device)
    inside = ((local >= box[:3]) & (local <= box[3:])).all(dim=-1)
    if placement.mask is not None:
        mask = placement.mask.to(local.device)
        height, width = mask.shape
        focal = placement.camera.focal_length(width)
        depth = placement.camera.distance - local[:, 2]  # the canonical camera looks down -z
        safe = depth.clamp_min(1e-6)
        u = (focal * local[:, 0] / safe + width / 2.0).floor().long()
        v = (-focal * local[:, 1] / safe + height / 2.0).floor().long()
        valid = (depth > 0) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
        hit = torch.zeros_like(inside)
        hit[valid] = mask[v[valid], u[valid]]
        inside = inside & hit
    return inside


class ComposedField(PointField):
    """The scene's field (``planes``) with the placed object's: a :class:`PointField` over the
    composite query, so the renderer and normals treat it like the tri-plane field. ``object_field``
    (default ``field``) answers for the object, at its ``placement.planes``: e.g. the object's own
    baked field when ``field`` is the scene's."""

    def __init__(self, field: PointField, placement: Placement, object_field: Optional[PointField] = None) -> None:
        self.field = field
        self.placement = placement
        self.object_field = field if object_field is None else object_field

    def query(self, points: torch.Tensor, planes: torch.Tensor, point_batch: torch.Tensor):
        """Composite density ``[N, 1]`` and RGB ``[N, 3]`` at world points ``[N, 3]``."""
        density, rgb = self.field.query(points, planes, point_batch)
        p = self.placement
        offset = torch.tensor(p.position, dtype=points.dtype, device=points.device)
        local = (points - offset) / p.scale
        inside = object_region(local, p)
        obj_density = torch.zeros_like(density)
        obj_rgb = torch.zeros_like(rgb)
        if inside.any():
            zeros = torch.zeros(int(inside.sum()), dtype=torch.long, device=points.device)
            d, c = self.object_field.query(local[inside], p.planes.to(points.device), zeros)
            obj_density = obj_density.index_put((inside,), d / p.scale)  # out of place: keeps gradients
            obj_rgb = obj_rgb.index_put((inside,), c)
        return composite(density, rgb, obj_density, obj_rgb)

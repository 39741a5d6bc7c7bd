"""Radiance fields: what the renderer asks of a field (:class:`PointField`), and the tri-plane field
(density and colour at world points, given one tri-plane per image)."""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from nerfstudio.cameras.rays import RaySamples
from nerfstudio.field_components.activations import trunc_exp
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.field_components.mlp import MLP
from torch import nn

from vq3d_nerfstudio.stage1.triplane import PlaneLayout, sample_triplanes_by_index


class PointField:
    """A field defined by a point query ``query(points [N, 3], planes, batch_idx [N]) -> (density
    [N, 1], rgb [N, 3])``; this base class derives what the renderer and the exporters call: outputs
    for ray samples (``field(ray_samples, planes, batch_idx)``), density alone, and normals."""

    def query(self, points: torch.Tensor, planes: torch.Tensor, batch_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, ray_samples: RaySamples, planes: torch.Tensor, batch_idx: torch.Tensor) -> Dict[FieldHeadNames, torch.Tensor]:
        return outputs_from_query(self.query, ray_samples, planes, batch_idx)

    def density_at(self, positions: torch.Tensor, planes: torch.Tensor, batch_idx: torch.Tensor) -> torch.Tensor:
        """Density ``[N, 1]`` at world points ``[N, 3]``, point ``i`` in tri-plane ``batch_idx[i]``."""
        return self.query(positions, planes, batch_idx)[0]

    def rgb_at(self, positions: torch.Tensor, planes: torch.Tensor, batch_idx: torch.Tensor) -> torch.Tensor:
        """RGB ``[N, 3]`` in [0, 1] at world points ``[N, 3]``."""
        return self.query(positions, planes, batch_idx)[1]

    def normals_at(self, positions: torch.Tensor, planes: torch.Tensor, batch_idx: torch.Tensor) -> torch.Tensor:
        """Unit normals ``[N, 3]``: the negated, normalised density gradient (works under no_grad;
        zero where the density does not vary in space)."""
        with torch.enable_grad():
            points = positions.detach().requires_grad_(True)
            density = self.density_at(points, planes.detach(), batch_idx)
            if not density.requires_grad:  # a field that is piecewise constant in space
                return torch.zeros_like(positions)
            (grad,) = torch.autograd.grad(density.sum(), points, allow_unused=True)
        if grad is None:
            return torch.zeros_like(positions)
        return torch.nn.functional.normalize(-grad, dim=-1)


class TriplaneField(nn.Module, PointField):
    """Sample the image's tri-plane at the points' plane coordinates (``layout``); small MLPs give
    density and colour.

    Colour does not depend on view direction: a single photo carries no view-dependent signal.
    Unlike nerfstudio's ``TriplaneEncoding``, the planes are an input (decoded per image), not a
    learned per-scene parameter.

    With ``num_depth_frequencies > 0`` the density MLP also sees the plane coordinates (U, V, W) and
    ``sin/cos(2^k pi W)``, k < num_depth_frequencies. In the frustum layout a canonical ray keeps
    (U, V) fixed, so its samples read one xy texel and differ only by their xz/yz features; the
    explicit depth coordinate lets that texel say *where along the ray* its surface is.
    """

    def __init__(
        self,
        triplane_channels: int,
        hidden_dim: int,
        layout: PlaneLayout,
        geo_feat_dim: int = 15,
        num_depth_frequencies: int = 0,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.geo_feat_dim = geo_feat_dim
        self.num_depth_frequencies = num_depth_frequencies
        freqs = math.pi * 2.0 ** torch.arange(max(num_depth_frequencies, 0), dtype=torch.float32)
        self.register_buffer("depth_freqs", freqs, persistent=False)  # (F,) pi * 2^k
        position_dim = 3 + 2 * num_depth_frequencies if num_depth_frequencies > 0 else 0
        self.density_mlp = MLP(
            in_dim=3 * triplane_channels + position_dim,
            num_layers=2,
            layer_width=hidden_dim,
            out_dim=1 + geo_feat_dim,
            activation=nn.ReLU(),
            implementation="torch",
        )
        self.color_mlp = MLP(
            in_dim=geo_feat_dim,
            num_layers=2,
            layer_width=hidden_dim,
            out_dim=3,
            activation=nn.ReLU(),
            out_activation=nn.Sigmoid(),
            implementation="torch",
        )

    def features(self, positions: torch.Tensor, planes: torch.Tensor, batch_idx: torch.Tensor) -> torch.Tensor:
        """Density-MLP input ``[N, 3C (+ position)]`` at world points ``[N, 3]``."""
        return self.features_at_coords(self.layout(positions), planes, batch_idx)

    def features_at_coords(self, coords: torch.Tensor, planes: torch.Tensor, batch_idx: torch.Tensor) -> torch.Tensor:
        """Density-MLP input ``[N, 3C (+ position)]`` at plane coordinates ``[N, 3]`` (U, V, W)."""
        feats = sample_triplanes_by_index(planes, coords, batch_idx)
        if self.num_depth_frequencies <= 0:
            return feats
        angles = coords[:, 2:3] * self.depth_freqs.to(coords.dtype)  # (N, F)
        return torch.cat([feats, coords, torch.sin(angles), torch.cos(angles)], dim=-1)

    def density_at(self, positions: torch.Tensor, planes: torch.Tensor, batch_idx: torch.Tensor) -> torch.Tensor:
        """Density alone (skips the colour MLP)."""
        return density_from_logit(self.density_mlp(self.features(positions, planes, batch_idx))[:, :1])

    def forward(
        self, ray_samples: RaySamples, planes: torch.Tensor, batch_idx: torch.Tensor
    ) -> Dict[FieldHeadNames, torch.Tensor]:
        """Density ``[R, S, 1]`` (per world unit) and RGB ``[R, S, 3]`` in [0, 1].

        Args:
            ray_samples: ``[R, S]`` samples (world frame).
            planes: ``[B, 3, C, Rp, Rp]`` tri-planes.
            batch_idx: ``[R]`` which tri-plane each ray uses.
        """
        return outputs_from_query(self.query, ray_samples, planes, batch_idx)

    def query(self, positions: torch.Tensor, planes: torch.Tensor, batch_idx: torch.Tensor):
        """Density ``[N, 1]`` and RGB ``[N, 3]`` at world points ``[N, 3]``, point ``i`` in tri-plane
        ``batch_idx[i]`` (the colour does not depend on the view direction)."""
        logit, rgb = self.query_coords(self.layout(positions), planes, batch_idx)
        return density_from_logit(logit), rgb

    def query_coords(self, coords: torch.Tensor, planes: torch.Tensor, batch_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Density logit ``[N, 1]`` (the density MLP's output before :func:`density_from_logit`) and
        RGB ``[N, 3]`` at plane coordinates ``[N, 3]``: everything the field computes is a function
        of (U, V, W) and the tri-plane, which is what lets a scene be baked (``stage1/baked.py``)."""
        hidden = self.density_mlp(self.features_at_coords(coords, planes, batch_idx))
        return hidden[:, :1], self.color_mlp(hidden[:, 1:])


def density_from_logit(logit: torch.Tensor) -> torch.Tensor:
    """Density (per world unit) from the density MLP's raw output: ``exp(logit - 1)`` with nerfstudio's
    gradient clamp (``trunc_exp``); the shift starts a fresh field nearly transparent."""
    return trunc_exp(logit - 1.0)


def outputs_from_query(query, ray_samples: RaySamples, planes: torch.Tensor, batch_idx: torch.Tensor) -> Dict[FieldHeadNames, torch.Tensor]:
    """A field's outputs for ``[R, S]`` ray samples from its point query
    ``query(points [N, 3], planes, batch_idx [N]) -> (density [N, 1], rgb [N, 3])``; ray ``r`` reads
    tri-plane ``batch_idx[r]``."""
    positions = ray_samples.frustums.get_positions()  # (R, S, 3)
    num_rays, num_samples = positions.shape[:2]
    point_batch = batch_idx[:, None].expand(num_rays, num_samples).reshape(-1)
    density, rgb = query(positions.reshape(-1, 3), planes, point_batch)
    return {
        FieldHeadNames.DENSITY: density.reshape(num_rays, num_samples, 1),
        FieldHeadNames.RGB: rgb.reshape(num_rays, num_samples, 3),
    }

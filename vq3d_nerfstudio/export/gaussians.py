"""3D Gaussians as 3DGS defines them (Kerbl et al., SIGGRAPH 2023): the type every splat module
passes around, and the colour encoding the ``.ply`` file and the refinement share.

A Gaussian has a mean ``mu``, a covariance ``Sigma = R S S^T R^T`` (``S = diag(scales)``, ``R`` from
a unit quaternion ``wxyz``), an opacity and a colour (degree 0 spherical harmonics:
``rgb = 0.5 + C0 * f_dc``, no view dependence since the NeRF has none). Means are in the NeRF's
world frame (OpenGL: y up; the canonical camera at ``(0, 0, 2)`` looks at the origin), in world
units. Separate from the conversion (:mod:`~vq3d_nerfstudio.export.splats`), the renderer
(:mod:`~vq3d_nerfstudio.export.rasterize`), the refinement (:mod:`~vq3d_nerfstudio.export.refine`)
and the file (:mod:`~vq3d_nerfstudio.export.ply`) because all four use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SH_C0 = 0.28209479177387814
"""Degree-0 real spherical harmonic, ``1 / (2 sqrt(pi))``: 3DGS stores colour as ``(rgb - 0.5) / C0``."""


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


def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    """RGB -> degree-0 SH coefficient (``f_dc``): ``(rgb - 0.5) / C0``."""
    return (rgb - 0.5) / SH_C0


def sh_dc_to_rgb(f_dc: torch.Tensor) -> torch.Tensor:
    """Degree-0 SH coefficient -> RGB: ``0.5 + C0 * f_dc`` (the inverse of :func:`rgb_to_sh_dc`)."""
    return 0.5 + SH_C0 * f_dc

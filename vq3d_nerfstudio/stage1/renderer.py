"""Volume rendering of a tri-plane NeRF with nerfstudio's samplers and renderers, written once for
training, the viewer, ``ns-render`` / ``ns-export``, ``vq3d eval`` and the splat export.

Rays are clipped to ``[near, far]``, sampled coarsely (uniform up to ``linear_until``, linear in
disparity beyond), resampled from the coarse weights (PDF samples added to the coarse ones) and
composited with the last sample as background. The field is any callable
``field(ray_samples [R, S], planes, batch_idx [R]) -> {DENSITY, RGB}`` (see
:class:`~vq3d_nerfstudio.stage1.field.PointField`); ray ``r`` reads tri-plane ``batch_idx[r]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from nerfstudio.cameras.rays import RayBundle, RaySamples
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.model_components.ray_samplers import PDFSampler, SpacedSampler
from nerfstudio.model_components.renderers import AccumulationRenderer, DepthRenderer, RGBRenderer
from nerfstudio.model_components.scene_colliders import NearFarCollider
from torch import nn

from vq3d_nerfstudio.stage1 import losses


class PiecewiseLinDispSampler(SpacedSampler):
    """Uniform in distance up to ``linear_until``, then linear in disparity out to the far plane.

    nerfstudio's ``UniformLinDispPiecewiseSampler`` with the switch point scaled from 1 to
    ``linear_until`` world units, so that the near scene (the canonical camera sits 2 units from the
    pivot) gets a third of the samples and the unbounded background the rest.
    """

    def __init__(self, num_samples: int, linear_until: float, train_stratified: bool = True) -> None:
        a = linear_until
        super().__init__(
            num_samples=num_samples,
            spacing_fn=lambda x: torch.where(x < a, x / (2 * a), 1 - a / (2 * x)),
            spacing_fn_inv=lambda s: torch.where(s < 0.5, 2 * a * s, a / (2 - 2 * s)),
            train_stratified=train_stratified,
        )


@dataclass
class RaySamplesPass:
    """One coarse and one fine pass over ``R`` rays: the samples, the field's outputs and weights."""

    ray_bundle: RayBundle
    """The rays, clipped to the near/far planes."""
    coarse: RaySamples
    coarse_outputs: Dict[FieldHeadNames, torch.Tensor]
    coarse_weights: torch.Tensor
    """``[R, Sc, 1]``."""
    fine: RaySamples
    fine_outputs: Dict[FieldHeadNames, torch.Tensor]
    fine_weights: torch.Tensor
    """``[R, Sf, 1]`` (the fine samples include the coarse ones)."""

    def directions_norm(self) -> torch.Tensor:
        """``[R, 1]`` length of each ray's camera-space direction with ``z = -1`` (1 when the rays
        carry none): z-depth is ``t / directions_norm``."""
        metadata = self.ray_bundle.metadata
        if metadata is None or "directions_norm" not in metadata:
            return torch.ones_like(self.ray_bundle.origins[:, :1])
        return metadata["directions_norm"]


class NerfRenderer(nn.Module):
    """Coarse pass, PDF resampling, fine pass, compositing. No parameters of its own."""

    def __init__(
        self, near_plane: float, far_plane: float, coarse_samples: int, fine_samples: int, linear_until: float
    ) -> None:
        super().__init__()
        # reset_near_plane=False: nerfstudio's default moves the near plane to 0 outside training, so
        # inference sampled [0, near) - points at and behind the camera that training never sees
        # (a decoded margin filled them with density; BENCHMARKS.md, issue 23 second round).
        self.collider = NearFarCollider(near_plane=near_plane, far_plane=far_plane, reset_near_plane=False)
        self.sampler_coarse = PiecewiseLinDispSampler(coarse_samples, linear_until)
        self.sampler_pdf = PDFSampler(num_samples=fine_samples, include_original=True)
        self.renderer_rgb = RGBRenderer(background_color="last_sample")
        self.renderer_depth = DepthRenderer(method="expected")
        self.renderer_accumulation = AccumulationRenderer()

    def sample(self, ray_bundle: RayBundle, field, planes: torch.Tensor, batch_idx: torch.Tensor) -> RaySamplesPass:
        """Clip the rays, then run the coarse sampler, the field, the PDF sampler and the field again."""
        ray_bundle = self.collider(ray_bundle)
        coarse = self.sampler_coarse(ray_bundle)
        coarse_outputs = field(coarse, planes, batch_idx)
        coarse_weights = coarse.get_weights(coarse_outputs[FieldHeadNames.DENSITY])
        fine = self.sampler_pdf(ray_bundle, coarse, coarse_weights.detach())
        fine_outputs = field(fine, planes, batch_idx)
        fine_weights = fine.get_weights(fine_outputs[FieldHeadNames.DENSITY])
        return RaySamplesPass(ray_bundle, coarse, coarse_outputs, coarse_weights, fine, fine_outputs, fine_weights)

    def render(
        self,
        ray_bundle: RayBundle,
        field,
        planes: torch.Tensor,
        batch_idx: torch.Tensor,
        keep_samples: bool = False,
        normals: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """Per-ray outputs ``[R, C]``: ``rgb`` (fine), ``rgb_coarse``, ``accumulation``, ``depth``
        (expected ray distance; also under ``expected_depth``, the name nerfstudio's exporters read),
        ``disparity`` (expected ``1 / z``); with ``normals`` the field's ``normals`` in [0, 1] at the
        expected depth; with ``keep_samples`` the per-sample weights and disparities of both passes
        (for the depth loss and depth metrics)."""
        passes = self.sample(ray_bundle, field, planes, batch_idx)
        norm = passes.directions_norm()
        fine, fine_w, coarse_w = passes.fine, passes.fine_weights, passes.coarse_weights
        fine_disp = losses.sample_disparity((fine.frustums.starts + fine.frustums.ends) / 2, norm)
        depth = self.renderer_depth(fine_w, fine)
        outputs = {
            "rgb": self.renderer_rgb(rgb=passes.fine_outputs[FieldHeadNames.RGB], weights=fine_w),
            "rgb_coarse": self.renderer_rgb(rgb=passes.coarse_outputs[FieldHeadNames.RGB], weights=coarse_w),
            "accumulation": self.renderer_accumulation(fine_w),
            "depth": depth,
            "expected_depth": depth,
            "disparity": losses.expected_disparity(fine_w, fine_disp),
        }
        if normals:
            rays = passes.ray_bundle
            points = rays.origins + rays.directions * depth
            outputs["normals"] = (field.normals_at(points, planes, batch_idx) + 1) / 2
        if keep_samples:
            coarse = passes.coarse
            coarse_disp = losses.sample_disparity((coarse.frustums.starts + coarse.frustums.ends) / 2, norm)
            outputs.update(weights_fine=fine_w, disp_fine=fine_disp, weights_coarse=coarse_w, disp_coarse=coarse_disp)
        return outputs

    @torch.no_grad()
    def render_chunked(
        self,
        ray_bundle: RayBundle,
        field,
        planes: torch.Tensor,
        rays_per_chunk: int,
        keep_samples: bool = False,
        batch_idx: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """:meth:`render` of a flat bundle in chunks of ``rays_per_chunk`` (bounded memory), the
        outputs concatenated on the CPU. Every ray reads tri-plane 0 unless ``batch_idx`` says."""
        if batch_idx is None:
            batch_idx = torch.zeros(len(ray_bundle), dtype=torch.long, device=planes.device)
        chunks = [
            self.render(ray_bundle[start : start + rays_per_chunk], field, planes,
                        batch_idx[start : start + rays_per_chunk], keep_samples=keep_samples)
            for start in range(0, len(ray_bundle), rays_per_chunk)
        ]
        return {key: torch.cat([chunk[key] for chunk in chunks]).cpu() for key in chunks[0]}

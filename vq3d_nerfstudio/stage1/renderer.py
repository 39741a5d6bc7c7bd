"""Volume rendering of a tri-plane NeRF with nerfstudio's samplers and renderers, written once for
training, the viewer, ``ns-render`` / ``ns-export``, ``vq3d eval`` and the splat export.

Rays are clipped to ``[near, far]``, sampled coarsely (uniform up to ``linear_until``, linear in
disparity beyond), resampled from the coarse weights (PDF samples added to the coarse ones) and
composited with the last sample as background. The field is any callable
``field(ray_samples [R, S], planes, batch_idx [R]) -> {DENSITY, RGB}`` (see
:class:`~vq3d_nerfstudio.stage1.field.PointField`); ray ``r`` reads tri-plane ``batch_idx[r]``.

The fine samples contain every coarse interval that received no PDF edge, unchanged; a field with a
point query (a ``PointField``) is evaluated once for those (:func:`coarse_duplicates`), which saves
a fifth to a third of the fine pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from nerfstudio.cameras.rays import RayBundle, RaySamples
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.model_components.ray_samplers import PDFSampler, SpacedSampler
from nerfstudio.model_components.renderers import AccumulationRenderer, DepthRenderer, RGBRenderer
from nerfstudio.model_components.scene_colliders import NearFarCollider
from torch import nn

from vq3d_nerfstudio.stage1 import losses
from vq3d_nerfstudio.stage1.field import PointField


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


def coarse_duplicates(coarse: RaySamples, fine: RaySamples) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which fine intervals are coarse intervals, unchanged: ``(duplicate [R, Sf] bool, index [R, Sf]
    long)``, fine interval ``j`` of ray ``r`` being coarse interval ``index[r, j]`` where ``duplicate``.

    nerfstudio's ``PDFSampler(include_original=True)`` sorts the coarse edges together with the new
    ones (in spacing space, then maps them to distances with the same function), so a coarse interval
    that received no new edge comes back with bit-identical spacing ends: it is a duplicate exactly
    when both of its ends are consecutive coarse edges. An interval of zero width (a new edge equal to
    a coarse one) is not: only its start matches.
    """
    edges = torch.cat([coarse.spacing_starts[..., 0], coarse.spacing_ends[..., -1:, 0]], dim=-1)  # (R, Sc+1)
    starts, ends = fine.spacing_starts[..., 0].contiguous(), fine.spacing_ends[..., 0]  # (R, Sf)
    index = torch.searchsorted(edges.contiguous(), starts, side="left").clamp_max(edges.shape[-1] - 2)
    duplicate = (edges.gather(-1, index) == starts) & (edges.gather(-1, index + 1) == ends)
    return duplicate, index


def fine_values_reusing_coarse(
    query: Callable[..., Tuple[torch.Tensor, ...]],
    coarse_values: Tuple[torch.Tensor, ...],
    coarse: RaySamples,
    fine: RaySamples,
    planes: torch.Tensor,
    batch_idx: torch.Tensor,
) -> Tuple[torch.Tensor, ...]:
    """A point query's values ``[R, Sf, C]`` at the fine samples: ``coarse_values`` (``[R, Sc, C]``
    each, the same query at the coarse samples) where a fine interval is a coarse one
    (:func:`coarse_duplicates`), one flat ``query(points [N, 3], planes, batch_idx [N])`` at the others.
    Equal to querying every fine sample (same points, same function), gradients included: a
    duplicate's gradient reaches the parameters through the coarse evaluation instead of a second one."""
    duplicate, index = coarse_duplicates(coarse, fine)
    num_rays, num_coarse = coarse.spacing_starts.shape[:2]
    new = ~duplicate
    positions = fine.frustums.get_positions()[new]  # (N, 3), ray-major order
    values = query(positions, planes, batch_idx[:, None].expand_as(new)[new])
    # fine sample -> row of [coarse values (R*Sc rows); new values (N rows)]
    source = torch.arange(num_rays, device=index.device)[:, None] * num_coarse + index
    source[new] = num_rays * num_coarse + torch.arange(positions.shape[0], device=index.device)
    return tuple(
        torch.cat([at_coarse.reshape(num_rays * num_coarse, -1), at_new])[source]  # (R, Sf, C)
        for at_coarse, at_new in zip(coarse_values, values)
    )


def colour_where_seen(
    field: PointField, positions: torch.Tensor, weights: torch.Tensor, min_weight: float, planes: torch.Tensor, batch_idx: torch.Tensor
) -> torch.Tensor:
    """RGB ``[R, S, 3]`` of ``field`` at the sample ``positions`` ``[R, S, 3]`` whose weight ``[R, S, 1]``
    exceeds ``min_weight`` and at each ray's last sample (the background colour); 0 elsewhere.
    Composited, the result differs from the colour at every sample by at most ``(S - 1) * min_weight``
    per channel (colours lie in [0, 1])."""
    seen = weights[..., 0] > min_weight
    seen[:, -1] = True
    rows = seen.reshape(-1).nonzero().squeeze(1)  # flat sample indices, ray-major
    num_samples = seen.shape[1]
    colour = field.rgb_at(positions.reshape(-1, 3).index_select(0, rows), planes, batch_idx[rows // num_samples])
    rgb = weights.new_zeros(seen.numel(), 3).index_copy_(0, rows, colour)
    return rgb.reshape(*seen.shape, 3)


@dataclass
class RaySamplesPass:
    """One coarse and one fine pass over ``R`` rays: the samples, the field's outputs and weights
    (sampled with ``colour_min_weight``, the RGB outputs are 0 where a sample's weight is at most it)."""

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

    def sample(
        self,
        ray_bundle: RayBundle,
        field,
        planes: torch.Tensor,
        batch_idx: torch.Tensor,
        reuse_coarse: bool = True,
        colour_min_weight: Optional[float] = None,
    ) -> RaySamplesPass:
        """Clip the rays, then run the coarse sampler, the field, the PDF sampler and the field again
        (a :class:`PointField` at the fine samples that are not coarse ones; every fine sample with
        ``reuse_coarse=False``, the reference that :func:`fine_values_reusing_coarse` is tested
        against, or for a field without a point query).

        With ``colour_min_weight`` the field's density comes first (``field.density_at``) and its
        colour (``field.rgb_at``) only where a sample's weight exceeds it (:func:`colour_where_seen`):
        for fields whose colour costs as much as their density apart (a baked grid); the outputs'
        RGB is then 0 at the samples left out. Without gradients, and every fine sample is looked up
        (``reuse_coarse`` is for fields that cost more than finding the duplicates does)."""
        ray_bundle = self.collider(ray_bundle)
        coarse = self.sampler_coarse(ray_bundle)
        if colour_min_weight is not None:
            return self._sample_density_first(ray_bundle, coarse, field, planes, batch_idx, colour_min_weight)
        coarse_outputs = field(coarse, planes, batch_idx)
        coarse_weights = coarse.get_weights(coarse_outputs[FieldHeadNames.DENSITY])
        fine = self.sampler_pdf(ray_bundle, coarse, coarse_weights.detach())
        if reuse_coarse and isinstance(field, PointField):
            heads = (FieldHeadNames.DENSITY, FieldHeadNames.RGB)
            values = fine_values_reusing_coarse(
                field.query, tuple(coarse_outputs[head] for head in heads), coarse, fine, planes, batch_idx
            )
            fine_outputs = dict(zip(heads, values))
        else:
            fine_outputs = field(fine, planes, batch_idx)
        fine_weights = fine.get_weights(fine_outputs[FieldHeadNames.DENSITY])
        return RaySamplesPass(ray_bundle, coarse, coarse_outputs, coarse_weights, fine, fine_outputs, fine_weights)

    @torch.no_grad()
    def _sample_density_first(
        self, ray_bundle: RayBundle, coarse: RaySamples, field: PointField, planes: torch.Tensor, batch_idx: torch.Tensor, min_weight: float
    ) -> RaySamplesPass:
        """:meth:`sample` with ``colour_min_weight``: densities of both passes, then colours where seen."""
        def positions_and_density(samples: RaySamples) -> Tuple[torch.Tensor, torch.Tensor]:
            positions = samples.frustums.get_positions()  # (R, S, 3)
            points = batch_idx[:, None].expand(positions.shape[:2]).reshape(-1)
            density = field.density_at(positions.reshape(-1, 3), planes, points)
            return positions, density.reshape(*positions.shape[:2], 1)

        coarse_positions, coarse_density = positions_and_density(coarse)
        coarse_weights = coarse.get_weights(coarse_density)
        fine = self.sampler_pdf(ray_bundle, coarse, coarse_weights)
        fine_positions, fine_density = positions_and_density(fine)
        fine_weights = fine.get_weights(fine_density)
        coarse_outputs = {
            FieldHeadNames.DENSITY: coarse_density,
            FieldHeadNames.RGB: colour_where_seen(field, coarse_positions, coarse_weights, min_weight, planes, batch_idx),
        }
        fine_outputs = {
            FieldHeadNames.DENSITY: fine_density,
            FieldHeadNames.RGB: colour_where_seen(field, fine_positions, fine_weights, min_weight, planes, batch_idx),
        }
        return RaySamplesPass(ray_bundle, coarse, coarse_outputs, coarse_weights, fine, fine_outputs, fine_weights)

    def render(
        self,
        ray_bundle: RayBundle,
        field,
        planes: torch.Tensor,
        batch_idx: torch.Tensor,
        keep_samples: bool = False,
        normals: bool = False,
        reuse_coarse: bool = True,
        colour_min_weight: Optional[float] = None,
    ) -> Dict[str, torch.Tensor]:
        """Per-ray outputs ``[R, C]``: ``rgb`` (fine), ``rgb_coarse``, ``accumulation``, ``depth``
        (expected ray distance; also under ``expected_depth``, the name nerfstudio's exporters read),
        ``disparity`` (expected ``1 / z``); with ``normals`` the field's ``normals`` in [0, 1] at the
        expected depth; with ``keep_samples`` the per-sample weights and disparities of both passes
        (for the depth loss and depth metrics). ``reuse_coarse``, ``colour_min_weight``: see :meth:`sample`."""
        passes = self.sample(ray_bundle, field, planes, batch_idx, reuse_coarse, colour_min_weight)
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

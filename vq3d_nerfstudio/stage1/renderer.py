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

Inference with a baked field (cheap lookups, no gradients) takes :meth:`NerfRenderer.render_density_first`:
the same samples as plain ``[R, S]`` distances (:func:`pdf_spacing` is nerfstudio's PDF sampler on
them, tested against it), densities first, colours only where a sample is seen.
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


def midpoint_positions(origins: torch.Tensor, directions: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """World points ``[R, S, 3]`` halfway between ``edges`` ``[R, S + 1]`` (ray distances) along the rays."""
    return origins[:, None] + directions[:, None] * (edges[:, :-1] + edges[:, 1:])[..., None] / 2


def sample_weights(edges: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """Rendering weights ``[R, S, 1]`` of the intervals between ``edges`` ``[R, S + 1]`` (ray distances)
    with ``density`` ``[R, S]``: nerfstudio's ``RaySamples.get_weights``, ``(1 - exp(-density delta))
    T_before``, written as ``T_before - T_after`` (the same value, ``T_after = T_before exp(-density
    delta)``): one exp per sample instead of two."""
    after = torch.exp(-torch.cumsum((edges[:, 1:] - edges[:, :-1]) * density, dim=-1))
    before = torch.cat([torch.ones_like(after[:, :1]), after[:, :-1]], dim=-1)
    return torch.nan_to_num(before - after)[..., None]


def directions_norm(ray_bundle: RayBundle) -> torch.Tensor:
    """``[R, 1]`` length of each ray's camera-space direction with ``z = -1`` (1 when the rays carry
    none): z-depth is ``t / directions_norm``."""
    metadata = ray_bundle.metadata
    if metadata is None or "directions_norm" not in metadata:
        return torch.ones_like(ray_bundle.origins[:, :1])
    return metadata["directions_norm"]


def pdf_spacing(spacing: torch.Tensor, weights: torch.Tensor, num_samples: int, histogram_padding: float, eps: float = 1e-5) -> torch.Tensor:
    """Edges ``[R, S + num_samples + 2]`` in spacing space of nerfstudio's ``PDFSampler`` outside
    training (``include_original=True``): ``num_samples + 1`` evenly spaced quantiles of the padded
    weights ``[R, S]`` over the intervals between ``spacing`` ``[R, S + 1]``, sorted together with those.
    The same operations as nerfstudio's, on plain tensors (tested against it)."""
    weights = weights + histogram_padding
    weights_sum = weights.sum(dim=-1, keepdim=True)
    padding = torch.relu(eps - weights_sum)
    weights = weights + padding / weights.shape[-1]
    weights_sum += padding
    cdf = torch.cumsum(weights / weights_sum, dim=-1).clamp_max(1.0)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], dim=-1)
    num_bins = num_samples + 1
    u = torch.linspace(0.0, 1.0 - (1.0 / num_bins), steps=num_bins, device=cdf.device) + 1.0 / (2 * num_bins)
    u = u.expand(cdf.shape[0], num_bins).contiguous()
    inds = torch.searchsorted(cdf, u, side="right")
    below = torch.clamp(inds - 1, 0, spacing.shape[-1] - 1)
    above = torch.clamp(inds, 0, spacing.shape[-1] - 1)
    cdf_g0, cdf_g1 = torch.gather(cdf, -1, below), torch.gather(cdf, -1, above)
    bins_g0, bins_g1 = torch.gather(spacing, -1, below), torch.gather(spacing, -1, above)
    t = torch.clip(torch.nan_to_num((u - cdf_g0) / (cdf_g1 - cdf_g0), 0), 0, 1)
    return torch.sort(torch.cat([spacing, bins_g0 + t * (bins_g1 - bins_g0)], -1), -1)[0]


@dataclass
class RaySamplesPass:
    """One coarse and one fine pass over ``R`` rays (:meth:`NerfRenderer.sample`): the samples, the
    field's outputs and weights."""

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
        """:func:`directions_norm` of the rays."""
        return directions_norm(self.ray_bundle)


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
    ) -> RaySamplesPass:
        """Clip the rays, then run the coarse sampler, the field, the PDF sampler and the field again
        (a :class:`PointField` at the fine samples that are not coarse ones; every fine sample with
        ``reuse_coarse=False``, the reference that :func:`fine_values_reusing_coarse` is tested
        against, or for a field without a point query)."""
        ray_bundle = self.collider(ray_bundle)
        coarse = self.sampler_coarse(ray_bundle)
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
        coarse_colour: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """Per-ray outputs ``[R, C]``: ``rgb`` (fine), ``rgb_coarse``, ``accumulation``, ``depth``
        (expected ray distance; also under ``expected_depth``, the name nerfstudio's exporters read),
        ``disparity`` (expected ``1 / z``); with ``normals`` the field's ``normals`` in [0, 1] at the
        expected depth; with ``keep_samples`` the per-sample weights and disparities of both passes
        (for the depth loss and depth metrics). ``reuse_coarse``: see :meth:`sample`.

        With ``colour_min_weight`` (a :class:`PointField`, no gradients): :meth:`render_density_first`,
        the same samples and outputs with each sample's colour computed only where it is seen; there
        ``coarse_colour=False`` skips the coarse pass's colours (``rgb_coarse`` comes back black)."""
        if colour_min_weight is not None:
            return self.render_density_first(
                ray_bundle, field, planes, batch_idx, colour_min_weight, keep_samples, normals, coarse_colour
            )
        passes = self.sample(ray_bundle, field, planes, batch_idx, reuse_coarse)
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
    def render_density_first(
        self,
        ray_bundle: RayBundle,
        field: PointField,
        planes: torch.Tensor,
        batch_idx: torch.Tensor,
        min_weight: float,
        keep_samples: bool = False,
        normals: bool = False,
        coarse_colour: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """:meth:`render`'s outputs for a field whose colour costs as much as its density apart (a baked
        grid): the densities of both passes first (``field.density_at``), then the colours where a
        sample's weight exceeds ``min_weight`` (:func:`colour_where_seen`; the RGB outputs then differ
        by at most ``(S - 1) * min_weight``, everything else is unchanged). ``coarse_colour=False``:
        no colour lookups in the coarse pass, ``rgb_coarse`` black (a viewer showing another output).

        The same samples as :meth:`sample` (nerfstudio's collider, spaced sampler in eval and PDF
        sampler with the original bins), computed as plain ``[R, S]`` distances instead of
        ``RaySamples``: at inference the bookkeeping of those (frustums, spacing functions per pass,
        per-sample copies of the ray) cost as much as the lookups of a baked grid."""
        rays = self.collider(ray_bundle)
        coarse_sampler, pdf_sampler = self.sampler_coarse, self.sampler_pdf
        s_near, s_far = coarse_sampler.spacing_fn(rays.nears), coarse_sampler.spacing_fn(rays.fars)  # (R, 1)

        def distances(spacing: torch.Tensor) -> torch.Tensor:  # nerfstudio's spacing_to_euclidean_fn
            return coarse_sampler.spacing_fn_inv(spacing * s_far + (1 - spacing) * s_near)

        compiled_pass = getattr(field, "compiled_density_pass", None)  # a baked field, once compiled

        def positions_density_weights(edges: torch.Tensor):
            fused = compiled_pass(rays.origins, rays.directions, edges) if compiled_pass is not None else None
            if fused is not None:
                return fused
            positions = midpoint_positions(rays.origins, rays.directions, edges)  # (R, S, 3)
            points = batch_idx[:, None].expand(positions.shape[:2]).reshape(-1)
            density = field.density_at(positions.reshape(-1, 3), planes, points).reshape(positions.shape[:2])
            return positions, sample_weights(edges, density)

        num_coarse = coarse_sampler.num_samples
        coarse_spacing = torch.linspace(0.0, 1.0, num_coarse + 1, device=rays.origins.device)[None]  # (1, Sc + 1)
        coarse_edges = distances(coarse_spacing)  # (R, Sc + 1)
        coarse_positions, coarse_weights = positions_density_weights(coarse_edges)
        fine_spacing = pdf_spacing(coarse_spacing.expand(len(rays), -1), coarse_weights[..., 0], pdf_sampler.num_samples,
                                   pdf_sampler.histogram_padding)
        fine_edges = distances(fine_spacing)
        fine_positions, fine_weights = positions_density_weights(fine_edges)

        fine_rgb = colour_where_seen(field, fine_positions, fine_weights, min_weight, planes, batch_idx)
        if coarse_colour:
            coarse_rgb = colour_where_seen(field, coarse_positions, coarse_weights, min_weight, planes, batch_idx)
            rgb_coarse = self.renderer_rgb(rgb=coarse_rgb, weights=coarse_weights)
        else:
            rgb_coarse = torch.zeros_like(rays.origins)
        fine_mid = ((fine_edges[:, :-1] + fine_edges[:, 1:]) / 2)[..., None]  # (R, Sf, 1)
        accumulation = fine_weights.sum(dim=-2)
        # nerfstudio's DepthRenderer("expected"): clipped to the chunk's nearest and farthest sample
        depth = ((fine_weights * fine_mid).sum(dim=-2) / (accumulation + 1e-10)).clip(fine_mid.min(), fine_mid.max())
        norm = directions_norm(rays)
        fine_disp = losses.sample_disparity(fine_mid, norm)
        outputs = {
            "rgb": self.renderer_rgb(rgb=fine_rgb, weights=fine_weights),
            "rgb_coarse": rgb_coarse,
            "accumulation": accumulation,
            "depth": depth,
            "expected_depth": depth,
            "disparity": losses.expected_disparity(fine_weights, fine_disp),
        }
        if normals:
            outputs["normals"] = (field.normals_at(rays.origins + rays.directions * depth, planes, batch_idx) + 1) / 2
        if keep_samples:
            coarse_mid = ((coarse_edges[:, :-1] + coarse_edges[:, 1:]) / 2)[..., None]
            outputs.update(weights_fine=fine_weights, disp_fine=fine_disp, weights_coarse=coarse_weights,
                           disp_coarse=losses.sample_disparity(coarse_mid, norm))
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

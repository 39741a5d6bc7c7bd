"""A shown scene's field baked into a dense grid over plane-coordinate space, for inference.

Everything :class:`~vq3d_nerfstudio.stage1.field.TriplaneField` computes at a point is a function of
the point's plane coordinates (U, V, W) and the scene's tri-plane (the colour has no view
dependence), so one scene's field is a fixed function on ``[-1, 1]^3``: :func:`bake_volume` samples
it once at the nodes of a regular grid and :class:`BakedField` answers every later query with one
trilinear lookup instead of three plane lookups and two MLPs.

Grid convention: node ``k`` of ``n`` along an axis sits at ``-1 + 2k / (n - 1)`` (``grid_sample``'s
``align_corners=True``, the planes' own convention, see ``triplane.py``). With ``n = m (R - 1) + 1``
for planes of ``R`` texels, every texel is a node and ``m - 1`` nodes lie between texels, so at a node
the baked value is the field's value there. The layouts map every point into ``[-1, 1]^3`` (the
frustum layout's contractions reach ±1 only at infinity), so the border clamp of the lookup only
absorbs rounding.
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vq3d_nerfstudio.stage1.field import PointField, density_from_logit
from vq3d_nerfstudio.stage1.renderer import midpoint_positions, sample_weights
from vq3d_nerfstudio.stage1.triplane import PlaneLayout

#: Volume channels: the density logit (before ``density_from_logit``), then RGB in [0, 1].
BAKED_CHANNELS = 4

#: Inference with a baked field computes a sample's colour only where its rendering weight exceeds this
#: (``NerfRenderer.render``'s ``colour_min_weight``, :meth:`NerfRenderer.render_density_first`): a pixel then
#: differs by at most ``(S - 1) * 1e-4`` (0.005, 1.2 of 255 levels, for 49 fine samples) from compositing every
#: sample's colour, while a sixth of the samples need a colour (the shipped model's example scenes at a 20
#: degree orbit: 6-9 of 49 fine, 2-3 of 24 coarse; 9-14 and 3-5 at 1e-6). Measured against 1e-6 on the
#: render-throughput frame (BENCHMARKS.md): the same 47.80 dB against the exact render, 5% less time.
COLOUR_MIN_WEIGHT = 1e-4


def bake_resolution(
    layout: PlaneLayout, num_depth_frequencies: int, nodes_per_texel: int = 2, nodes_per_period: int = 16
) -> Tuple[int, int, int]:
    """Grid nodes ``(D, H, W)`` along (W, V, U) for a field on ``layout``'s planes.

    U and V: ``nodes_per_texel`` nodes per texel interval of the planes (``R`` texels, margin
    included), so the texels are nodes. W: as many, or more where the density MLP's highest depth
    frequency ``sin(pi 2^(F-1) W)`` (``2^(F-1)`` periods over [-1, 1]) would get fewer than
    ``nodes_per_period`` nodes a period; rounded up to whole texel intervals so the texels stay nodes.
    """
    intervals = layout.resolution - 1
    uv = nodes_per_texel * intervals + 1
    depth_steps = nodes_per_texel * intervals
    if num_depth_frequencies > 0:
        periods = 2 ** (num_depth_frequencies - 1)
        depth_steps = max(depth_steps, math.ceil(periods * nodes_per_period / intervals) * intervals)
    return depth_steps + 1, uv, uv


def grid_coordinates(depth: int, height: int, width: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Plane coordinates ``[D, H, W, 3]`` (U, V, W order) of the grid's nodes: node ``(d, h, w)`` at
    ``(-1 + 2w / (W - 1), -1 + 2h / (H - 1), -1 + 2d / (D - 1))``."""
    axes = [torch.arange(n, dtype=torch.float64, device=device) * (2.0 / (n - 1)) - 1.0 for n in (depth, height, width)]
    d, h, w = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([w, h, d], dim=-1).to(dtype)


@torch.no_grad()
def bake_volume(
    field, planes: torch.Tensor, resolution: Tuple[int, int, int], points_per_chunk: int = 2**18
) -> torch.Tensor:
    """``[1, 4, D, H, W]``: the field's density logit and RGB at every node of the grid.

    Args:
        field: anything with ``query_coords(coords [N, 3], planes, batch_idx [N]) -> (logit [N, 1],
            rgb [N, 3])`` (:meth:`TriplaneField.query_coords`).
        planes: ``[1, 3, C, R, R]`` the scene's tri-plane.
        resolution: ``(D, H, W)`` nodes (:func:`bake_resolution`).
        points_per_chunk: nodes evaluated at once (bounds the memory of the MLPs' activations).
    """
    depth, height, width = resolution
    volume = planes.new_empty(1, BAKED_CHANNELS, depth, height, width)
    slices_per_chunk = max(1, points_per_chunk // (height * width))
    for start in range(0, depth, slices_per_chunk):
        stop = min(depth, start + slices_per_chunk)
        coords = grid_coordinates(depth, height, width, planes.dtype, planes.device)[start:stop].reshape(-1, 3)
        zeros = torch.zeros(coords.shape[0], dtype=torch.long, device=planes.device)
        logit, rgb = field.query_coords(coords, planes, zeros)
        values = torch.cat([logit, rgb], dim=-1).reshape(stop - start, height, width, BAKED_CHANNELS)
        volume[0, :, start:stop] = values.permute(3, 0, 1, 2)
    return volume


#: Pieces one volume lookup is split into. torch's CPU ``grid_sample`` in 3D runs one thread per batch
#: element, so the points go in as a batch of this many over the (expanded, not copied) volume: with
#: a channels-last volume, 3.4x faster on 2 cores (3.2M points: 0.44 s -> 0.13 s).
LOOKUP_PIECES = 8


def sample_volume(volume: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples ``[N, C]`` of ``volume`` ``[1, C, D, H, W]`` at plane coordinates ``[N, 3]``
    (U indexes W, V indexes H, W indexes D; outside ``[-1, 1]`` the border value)."""
    num_points, channels = coords.shape[0], volume.shape[1]
    pieces = LOOKUP_PIECES if num_points >= 64 * LOOKUP_PIECES else 1
    padded = -num_points % pieces
    if padded:
        coords = torch.cat([coords, coords.new_zeros(padded, 3)])
    grid = coords.reshape(pieces, -1, 1, 1, 3)
    batch = volume.expand(pieces, -1, -1, -1, -1)
    values = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=True)  # (P, C, N/P, 1, 1)
    return values.reshape(pieces, channels, -1).permute(0, 2, 1).reshape(-1, channels)[:num_points]


def trilinear(volume: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """:func:`sample_volume` of a one-channel ``volume`` ``[D, H, W]`` at plane coordinates ``[..., 3]``
    (result ``[...]``), written as eight gathers and lerps: slower than ``grid_sample`` in eager mode,
    but one loop with the rest of the pass under ``torch.compile`` (:class:`CompiledDensityPass`)."""
    depth, height, width = volume.shape
    flat = volume.reshape(-1)
    x = ((coords[..., 0] + 1) * (0.5 * (width - 1))).clamp(0, width - 1)
    y = ((coords[..., 1] + 1) * (0.5 * (height - 1))).clamp(0, height - 1)
    z = ((coords[..., 2] + 1) * (0.5 * (depth - 1))).clamp(0, depth - 1)
    x0, y0, z0 = x.floor().clamp(max=width - 2), y.floor().clamp(max=height - 2), z.floor().clamp(max=depth - 2)
    fx, fy, fz = x - x0, y - y0, z - z0
    corner = (z0.long() * height + y0.long()) * width + x0.long()

    def lerp_x(offset: int) -> torch.Tensor:
        return flat[corner + offset] * (1 - fx) + flat[corner + offset + 1] * fx

    plane = height * width
    near = lerp_x(0) * (1 - fy) + lerp_x(width) * fy
    far = lerp_x(plane) * (1 - fy) + lerp_x(plane + width) * fy
    return near * (1 - fz) + far * fz


def fused_density_pass(
    logit: torch.Tensor, layout: PlaneLayout, origins: torch.Tensor, directions: torch.Tensor, edges: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One density pass of :meth:`NerfRenderer.render_density_first` through a baked density logit
    ``[D, H, W]``: the sample midpoints ``[R, S, 3]`` between ``edges`` ``[R, S + 1]`` along the rays
    and their rendering weights ``[R, S, 1]`` (layout, trilinear lookup, density, weights)."""
    positions = midpoint_positions(origins, directions, edges)
    density = density_from_logit(trilinear(logit, layout(positions)))
    return positions, sample_weights(edges, density)


class CompiledDensityPass:
    """:func:`fused_density_pass` under ``torch.compile``, compiled in a background thread so that
    nothing waits for it: until it is :attr:`ready` (or when compiling fails: no C++ compiler, an
    unsupported platform) renders take the eager path. The viewer starts it (``ns/viewer_controls.py``).

    Why: the eager density passes are a dozen tensor operations over every sample plus a
    ``grid_sample``; compiled into one loop a pass runs ~3x faster (1.9 vs 5.9 ms for 4096 rays x 49
    samples on 2 CPU cores) and a 256 px viewer frame ~30% faster (192 vs 263 ms; BENCHMARKS.md, render
    throughput), after a one-off compile of 26 s (7 s with torch's compile cache of an earlier run).
    One compiled graph serves every scene, model and ray count (dynamic shapes; the warm-up's sizes
    are all different, or torch's duck sizing would tie them and recompile at the first real call)."""

    def __init__(self) -> None:
        self.ready = False
        self.error: Optional[str] = None
        self._function = None
        self._thread: Optional[threading.Thread] = None

    def start(self, layout: PlaneLayout, samples: Tuple[int, ...]) -> None:
        """Compile for ``layout`` and passes of ``samples`` intervals (the coarse and fine counts), in
        a daemon thread; a second call while compiling or compiled does nothing."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._compile, args=(layout, samples), name="vq3d-compile", daemon=True)
        self._thread.start()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the compile; whether it is :attr:`ready`."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.ready

    @torch.no_grad()
    def _compile(self, layout: PlaneLayout, samples: Tuple[int, ...]) -> None:
        try:
            function = torch.compile(fused_density_pass, dynamic=True)
            logit = torch.zeros(11, 10, 9)  # sizes equal to no other size here (see the class docstring)
            for rays, count in [(64, count) for count in samples] + [(96, samples[0])]:  # two ray counts: shapes symbolic
                edges = torch.linspace(0.5, 3.0, count + 1).expand(rays, -1).contiguous()
                origins = torch.zeros(rays, 3)
                directions = torch.nn.functional.normalize(torch.randn(rays, 3), dim=-1)
                got, expected = function(logit, layout, origins, directions, edges), fused_density_pass(logit, layout, origins, directions, edges)
                if not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected)):
                    raise RuntimeError("the compiled pass differs from the eager one")
            self._function = function
            self.ready = True
        except Exception as err:  # no compiler, an unsupported platform: the eager path stays
            self.error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"vq3d: rendering without torch.compile ({self.error})", file=sys.stderr)

    def __call__(self, logit: torch.Tensor, layout: PlaneLayout, origins: torch.Tensor, directions: torch.Tensor,
                 edges: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """:func:`fused_density_pass`, compiled; None until :attr:`ready`."""
        if not self.ready:
            return None
        return self._function(logit, layout, origins.contiguous(), directions.contiguous(), edges.contiguous())


COMPILED_DENSITY_PASS = CompiledDensityPass()
"""The process's compiled density pass (one compile serves every baked field)."""


class BakedField(PointField):
    """One scene's field as a baked grid (:func:`bake_volume`): a query is ``layout`` then trilinear
    lookups; ``planes`` and ``batch_idx`` are ignored (the scene is in the grid).

    The density *logit* is interpolated and :func:`density_from_logit` applied after, as the field
    does; interpolating the density itself was worse on the shipped ``vq3d-tiny-synth`` (64 px,
    20 degree orbit, 4 example scenes: 45-52 dB against the exact render instead of 32-38 dB, median
    depth error 0.05-0.08% instead of 0.9-1.6%): the logit is smooth where the density, its
    exponential, changes by orders of magnitude across a surface within one grid cell.

    Density and colour sit in separate volumes (a lookup costs about the same per channel), so a
    renderer can ask for the density everywhere and the colour only where it is seen
    (``NerfRenderer.render``'s ``colour_min_weight``, :meth:`NerfRenderer.render_density_first`).
    """

    def __init__(self, volume: torch.Tensor, layout: PlaneLayout, source_planes: Optional[torch.Tensor] = None) -> None:
        self.logit = volume[:, :1].contiguous()
        """``[1, 1, D, H, W]`` density logit at the grid's nodes."""
        self.rgb = volume[:, 1:].contiguous(memory_format=torch.channels_last_3d)
        """``[1, 3, D, H, W]`` RGB at the grid's nodes (channels-last: a node's three values together)."""
        self.layout = layout
        self.source_planes = source_planes
        """The tri-plane it was baked from (what a cache compares to know it is current)."""

    @classmethod
    def bake(cls, field, planes: torch.Tensor, resolution: Optional[Tuple[int, int, int]] = None) -> "BakedField":
        """Bake ``field`` (a :class:`TriplaneField`) on ``planes`` ``[1, 3, C, R, R]``, at
        :func:`bake_resolution` of its layout unless ``resolution`` says."""
        if resolution is None:
            resolution = bake_resolution(field.layout, field.num_depth_frequencies)
        return cls(bake_volume(field, planes, resolution), field.layout, planes)

    @property
    def resolution(self) -> Tuple[int, int, int]:
        """Grid nodes ``(D, H, W)`` along (W, V, U)."""
        return tuple(self.logit.shape[2:])

    def query(self, points: torch.Tensor, planes: torch.Tensor, batch_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Density ``[N, 1]`` and RGB ``[N, 3]`` at world points ``[N, 3]``."""
        coords = self.layout(points)
        return density_from_logit(sample_volume(self.logit, coords)), sample_volume(self.rgb, coords)

    def density_at(self, positions: torch.Tensor, planes: torch.Tensor, batch_idx: torch.Tensor) -> torch.Tensor:
        return density_from_logit(sample_volume(self.logit, self.layout(positions)))

    def compiled_density_pass(
        self, origins: torch.Tensor, directions: torch.Tensor, edges: torch.Tensor
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """A density pass of :meth:`NerfRenderer.render_density_first` (sample midpoints, weights) by
        :data:`COMPILED_DENSITY_PASS` once it is ready; None before (the renderer's eager pass)."""
        return COMPILED_DENSITY_PASS(self.logit[0, 0], self.layout, origins, directions, edges)

    def rgb_at(self, positions: torch.Tensor, planes: torch.Tensor, batch_idx: torch.Tensor) -> torch.Tensor:
        return sample_volume(self.rgb, self.layout(positions))

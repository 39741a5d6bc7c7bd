"""Tri-plane sampling and scene contraction, against hand-derived values."""

import math

import pytest
import torch

from vq3d_nerfstudio.stage1.triplane import (
    PlaneLayout,
    contract,
    contract_1d,
    frustum_coordinates,
    frustum_points,
    sample_triplanes,
    sample_triplanes_by_index,
    uncontract_1d,
)

RES = 9


def ramp_planes() -> torch.Tensor:
    """Plane k, channel 0 = its first coordinate, channel 1 = its second (align_corners grid)."""
    coord = torch.linspace(-1, 1, RES)
    cols = coord[None, :].expand(RES, RES)  # varies along columns: the first coordinate
    rows = coord[:, None].expand(RES, RES)  # varies along rows: the second coordinate
    plane = torch.stack([cols, rows])  # (2, R, R)
    return plane[None, None].expand(1, 3, 2, RES, RES).contiguous()


def test_linear_ramp_plane_returns_the_coordinate():
    torch.manual_seed(0)
    points = torch.rand(1, 50, 3) * 2 - 1
    feats = sample_triplanes(ramp_planes(), points)[0]  # (P, 6)
    x, y, z = points[0].unbind(-1)
    expected = torch.stack([x, y, x, z, y, z], dim=-1)  # xy plane, xz plane, yz plane
    assert torch.allclose(feats, expected, atol=1e-5)


@pytest.mark.parametrize("plane, dropped", [(0, 2), (1, 1), (2, 0)])
def test_each_plane_drops_a_different_axis(plane, dropped):
    torch.manual_seed(plane)
    planes = torch.zeros(1, 3, 1, RES, RES)
    planes[0, plane, 0] = torch.randn(RES, RES)  # only this plane is non-zero
    points = torch.rand(1, 20, 3) * 2 - 1
    moved = points.clone()
    moved[..., dropped] = torch.rand(20) * 2 - 1
    base = sample_triplanes(planes, points)[0, :, plane]
    assert torch.allclose(sample_triplanes(planes, moved)[0, :, plane], base, atol=1e-6)
    for kept in {0, 1, 2} - {dropped}:
        shifted = points.clone()
        shifted[..., kept] = -shifted[..., kept]
        assert not torch.allclose(sample_triplanes(planes, shifted)[0, :, plane], base, atol=1e-3)


@pytest.mark.parametrize("sorted_blocks", [True, False])
def test_sample_by_index_matches_per_point_reference(sorted_blocks):
    torch.manual_seed(3)
    planes = torch.randn(3, 3, 4, RES, RES)
    batch_idx = torch.arange(3).repeat_interleave(5)
    if not sorted_blocks:
        batch_idx = batch_idx[torch.randperm(15)]
    points = torch.rand(15, 3) * 2 - 1
    out = sample_triplanes_by_index(planes, points, batch_idx)
    reference = torch.stack([sample_triplanes(planes[b : b + 1], p[None, None])[0, 0] for p, b in zip(points, batch_idx)])
    assert torch.allclose(out, reference, atol=1e-6)


@pytest.mark.parametrize("max_elements", [1, 5 * 3 * 4, 7 * 3 * 4 * 2 + 1])
def test_sampling_in_pieces_equals_one_call(max_elements):
    """A query over the one-call limit (cuDNN's 32-bit index on a GPU) is sampled in pieces of points:
    bit-identical to one call, whatever the piece size (1 point, a divisor of P = 35, or not one)."""
    gen = torch.Generator().manual_seed(0)
    planes = torch.randn(2, 3, 4, RES, RES, generator=gen)
    points = torch.rand(2, 35, 3, generator=gen) * 2.2 - 1.1  # some outside: zero padding
    whole = sample_triplanes(planes, points)
    pieces = sample_triplanes(planes, points, max_elements=max_elements)
    assert pieces.shape == (2, 35, 12) and torch.equal(pieces, whole)


def test_contraction_hand_values():
    scale = 1.5
    inside = torch.tensor([[0.3, -0.6, 1.2]])
    assert torch.allclose(contract(inside, scale), inside / scale / 2)
    # |x|_inf = 3 (in units of scale) along x: (2 - 1/3) * (1, 1/3, 0) / 2
    outside = torch.tensor([[4.5, 1.5, 0.0]])
    assert torch.allclose(contract(outside, scale), torch.tensor([[5 / 6, 5 / 18, 0.0]]), atol=1e-6)
    far = contract(torch.tensor([[0.0, 0.0, -1e6]]), scale)
    assert far[0, 2] < -0.999 and far[0, 2] >= -1.0


def test_decoder_layout_lines_image_rows_up_with_world_y():
    """A token-grid cell at image row i, column j lands where the canonical camera sees it."""
    from vq3d_nerfstudio.stage1.decoder import align_to_image

    grids = torch.zeros(1, 3, 1, RES, RES)
    top_row, left_col = 0, 0
    grids[0, :, 0, top_row, left_col] = 1.0  # the image's top-left cell in every plane
    planes = align_to_image(grids)
    # xy plane: top-left of the image is (x=-1, y=+1) -> plane row R-1 (y ascending), column 0
    assert planes[0, 0, 0, RES - 1, 0] == 1
    # xz plane: columns are x (left -> -1), rows are z; image top is far away (-z) -> row 0
    assert planes[0, 1, 0, 0, 0] == 1
    # yz plane: columns are y (top -> +1 -> last column); rows are z, from the image column
    assert planes[0, 2, 0, 0, RES - 1] == 1
    assert planes.sum() == 3


# ---- the frustum layout ---------------------------------------------------------------------------
TAN = math.tan(math.radians(25.0))  # the canonical camera's 50 degree field of view


def canonical_points(rows, cols, depths, size):
    """World points at z-depth ``depths`` on the rays through pixel ``(rows, cols)`` (continuous,
    pixel centres at +0.5) of the canonical camera (at (0, 0, 2), looking down -z)."""
    u = 2 * cols / size - 1
    v = 1 - 2 * rows / size
    return torch.stack([u * depths * TAN, v * depths * TAN, 2.0 - depths], -1)


def test_frustum_coordinates_hand_values():
    layout = PlaneLayout(inner_resolution=64, margin=3)
    k = 64 / 69  # the image edge lands on the centre of the first margin-free texel: 64 / (64 + 6 - 1)
    assert layout.resolution == 70 and math.isclose(layout.uv_inner, k)
    pivot = layout(torch.zeros(1, 3))
    assert torch.allclose(pivot, torch.zeros(1, 3), atol=1e-7)
    # half-way to the right image edge at the pivot's depth: U = k / 2; slab ends at d = 1 and 3
    points = torch.tensor([[0.5 * 2 * TAN, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [0.0, 0.0, -1e9]])
    coords = layout(points)
    assert torch.allclose(coords[:, 0], torch.tensor([k / 2, 0, 0, 0]), atol=1e-6)
    assert torch.allclose(coords[:, 2], torch.tensor([0.0, 0.5, -0.5, -1.0]), atol=1e-6)
    # the near side is linear in depth: d = 0.5 is half-way from the slab's near end (d = 1) to the camera
    assert torch.isclose(layout(torch.tensor([[0.0, 0.0, 1.5]]))[0, 2], torch.tensor(0.75))


def test_pixel_centres_read_their_token_tile_at_every_depth():
    """The decoder writes token (i, j)'s tile at plane tile (i, j); every point on the ray through a
    pixel centre of that image patch samples exactly that tile's xy texel, near or far."""
    from vq3d_nerfstudio.stage1.decoder import place_planes

    size, grid, margin = 16, 4, 2  # 4x4 tokens of 4x4 pixels, one texel per pixel
    layout = PlaneLayout(inner_resolution=size, margin=margin)
    tile_id = torch.arange(grid * grid, dtype=torch.float32).reshape(grid, grid)
    grids = torch.zeros(1, 3, 1, size, size)
    grids[0, 0, 0] = tile_id.repeat_interleave(size // grid, 0).repeat_interleave(size // grid, 1)
    planes = place_planes(grids, margin)
    rows, cols = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    for depth in (0.4, 1.3, 2.0, 2.9, 7.0, 1e4):
        points = canonical_points(rows, cols, torch.full_like(rows, depth), size).reshape(1, -1, 3)
        xy = sample_triplanes(planes, layout(points))[0, :, 0].reshape(size, size)
        expected = tile_id[(rows // (size // grid)).long(), (cols // (size // grid)).long()]
        assert torch.allclose(xy, expected, atol=1e-4), depth


def test_any_point_in_a_pixel_stays_inside_its_token_tile():
    size, grid, margin = 64, 8, 3
    layout = PlaneLayout(inner_resolution=size, margin=margin)
    torch.manual_seed(0)
    rows, cols = torch.rand(2000) * size, torch.rand(2000) * size
    depths = torch.exp(torch.rand(2000) * 6 - 1)  # 0.37 .. 150 world units
    coords = layout(canonical_points(rows, cols, depths, size))
    texel = (coords[:, :2] + 1) / 2 * (layout.resolution - 1)  # continuous (column, row) texel position
    s = size // grid
    tile_col = (texel[:, 0] - margin + 0.5) // s
    tile_row = (size - 1 - (texel[:, 1] - margin) + 0.5) // s  # plane rows ascend with V (image up)
    assert torch.equal(tile_col, cols // s) and torch.equal(tile_row, rows // s)


def test_canonical_rays_reach_most_xy_texels():
    """March the 64x64 canonical rays: the xy texels hit are the inner 64 of 70 per axis."""
    size = 64
    layout = PlaneLayout(inner_resolution=size, margin=3)
    rows, cols = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    hit = torch.zeros(layout.resolution, layout.resolution, dtype=torch.bool)
    for depth in torch.linspace(0.3, 100.0, 50):
        coords = layout(canonical_points(rows, cols, torch.full_like(rows, float(depth)), size))
        texel = ((coords[..., :2] + 1) / 2 * (layout.resolution - 1)).round().long().reshape(-1, 2)
        hit[texel[:, 1], texel[:, 0]] = True
    fraction = hit.float().mean().item()
    assert math.isclose(fraction, (64 / 70) ** 2, rel_tol=1e-6) and fraction >= 0.8


def test_supported_novel_views_stay_inside_the_planes():
    """Orbits of +-30 degrees yaw and +-15 elevation (the GAN's range): every sample lands in the
    planes, and the scene around the pivot in the inner, image-aligned part."""
    from vq3d_nerfstudio.geometry.cameras import orbit_cameras

    layout = PlaneLayout(inner_resolution=64, margin=3)
    views = [(yaw, pitch) for yaw in (-30.0, 0.0, 30.0) for pitch in (-15.0, 15.0)]
    rays = orbit_cameras(views, 16, 2.0, 50.0).generate_rays(camera_indices=torch.arange(6)[:, None], keep_shape=False)
    ts = torch.exp(torch.linspace(math.log(0.3), math.log(1000.0), 64))
    points = rays.origins[:, None] + rays.directions[:, None] * ts[None, :, None]
    coords = layout(points)
    assert bool(torch.isfinite(coords).all()) and float(coords.abs().max()) <= 1.0
    near_pivot = (points.abs() <= 0.5).all(-1)
    assert int(near_pivot.sum()) > 100
    assert float(coords[near_pivot][:, :2].abs().max()) < layout.uv_inner


def test_frustum_map_is_continuous_and_invertible():
    torch.manual_seed(1)
    s = torch.tensor([-1 - 1e-6, -1 + 1e-6, 1 - 1e-6, 1 + 1e-6])
    c = contract_1d(s, 0.9)
    assert torch.allclose(c[:2], torch.tensor([-0.9, -0.9]), atol=1e-5) and torch.allclose(c[2:], torch.tensor([0.9, 0.9]), atol=1e-5)
    grid = torch.linspace(-50, 50, 10001)
    assert bool((contract_1d(grid, 0.5).diff() > 0).all())
    assert torch.allclose(uncontract_1d(contract_1d(grid, 0.7), 0.7), grid, rtol=1e-4, atol=1e-4)
    layout = PlaneLayout(inner_resolution=64, margin=3)
    depth = torch.exp(torch.rand(500) * 7 - 2)  # 0.14 .. 150, near side, slab and contracted far field
    points = canonical_points(torch.rand(500) * 200 - 68, torch.rand(500) * 200 - 68, depth, 64).double()
    coords = frustum_coordinates(points, 2.0, 50.0, layout.uv_inner)
    back = frustum_points(coords, 2.0, 50.0, layout.uv_inner)
    assert torch.allclose(back, points, rtol=1e-6, atol=1e-6)
    # crossing the slab boundaries moves W continuously
    edges = torch.tensor([[0.0, 0.0, 1.0 + 1e-6], [0.0, 0.0, 1.0 - 1e-6], [0.0, 0.0, -1.0 + 1e-6], [0.0, 0.0, -1.0 - 1e-6]])
    w = frustum_coordinates(edges, 2.0, 50.0, layout.uv_inner)[:, 2]
    assert torch.allclose(w[0], w[1], atol=1e-5) and torch.allclose(w[2], w[3], atol=1e-5)


def test_field_depth_input_is_the_plane_coordinates_and_their_depth_frequencies():
    from vq3d_nerfstudio.stage1.field import TriplaneField

    layout = PlaneLayout(inner_resolution=8, margin=1)
    field = TriplaneField(triplane_channels=2, hidden_dim=8, layout=layout, num_depth_frequencies=2)
    planes = torch.zeros(1, 3, 2, layout.resolution, layout.resolution)
    points = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # the pivot (W = 0) and the slab's far end (W = -0.5)
    feats = field.features(points, planes, torch.zeros(2, dtype=torch.long))
    assert feats.shape == (2, 3 * 2 + 3 + 2 * 2)
    w = torch.tensor([0.0, -0.5])
    expected = torch.stack([torch.sin(math.pi * w), torch.sin(2 * math.pi * w), torch.cos(math.pi * w), torch.cos(2 * math.pi * w)], -1)
    assert torch.allclose(feats[:, 6:9], torch.stack([torch.zeros(2), torch.zeros(2), w], -1), atol=1e-6)
    assert torch.allclose(feats[:, 9:], expected, atol=1e-6)


def test_a_decoded_margin_keeps_token_tiles_in_place_and_fills_the_rest_from_queries():
    """``margin_source="decoded"``: with an identity transformer and a head that copies each token's
    value into its whole tile, canonical rays through patch (i, j) still read token (i, j)'s value at
    every depth, and every margin texel holds the learned query's value (nothing replicated)."""
    from vq3d_nerfstudio.stage1.decoder import TriplaneDecoder

    size, grid, dim = 16, 4, 8
    s = size // grid
    decoder = TriplaneDecoder(grid, dim, 1, 1, 1, size, margin=2 * s, margin_source="decoded")
    assert decoder.ring == 2
    decoder.transformer = torch.nn.Identity()
    with torch.no_grad():
        decoder.head.weight.fill_(1.0 / dim)
        decoder.head.bias.zero_()
        decoder.refine.weight.zero_()
        decoder.refine.bias.zero_()
        decoder.margin_query.fill_(-1.0)
    tile_id = torch.arange(grid * grid, dtype=torch.float32)
    planes = decoder(tile_id[None, :, None].expand(1, grid * grid, dim)).detach()
    layout = PlaneLayout(inner_resolution=size, margin=2 * s)
    assert planes.shape == (1, 3, 1, layout.resolution, layout.resolution)
    inner = slice(2 * s, 2 * s + size)
    margin_mask = torch.ones(layout.resolution, layout.resolution, dtype=torch.bool)
    margin_mask[inner, inner] = False
    assert torch.all(planes[0, :, 0][:, margin_mask] == -1.0)
    rows, cols = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    expected = tile_id.reshape(grid, grid)[(rows // s).long(), (cols // s).long()]
    for depth in (0.4, 1.3, 2.9, 1e4):
        points = canonical_points(rows, cols, torch.full_like(rows, depth), size).reshape(1, -1, 3)
        xy = sample_triplanes(planes, layout(points))[0, :, 0].reshape(size, size)
        assert torch.allclose(xy, expected, atol=1e-4), depth


def test_a_decoded_margin_must_be_whole_token_tiles():
    from vq3d_nerfstudio.stage1.decoder import TriplaneDecoder

    with pytest.raises(ValueError, match="not a multiple of 4"):
        TriplaneDecoder(4, 8, 1, 1, 1, 16, margin=3, margin_source="decoded")

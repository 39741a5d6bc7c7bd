"""Tri-plane sampling and scene contraction, against hand-derived values."""

import pytest
import torch

from vq3d_nerfstudio.triplane import contract, sample_triplanes, sample_triplanes_by_index

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
    from vq3d_nerfstudio.triplane_decoder import align_to_image

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

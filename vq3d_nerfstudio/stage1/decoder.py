"""ViT decoder: quantized tokens -> tri-plane features (the NeRF of one image)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vq3d_nerfstudio.stage1.vit import Transformer


class ConvUpsampler(nn.Module):
    """``[B, D, h, w]`` token features -> ``[B, out_channels, h * 2^n, w * 2^n]``: n rounds of
    nearest 2x upsampling + two 3x3 convolutions (GELU), halving the width each round down to
    ``min_channels`` (the convolutional upsampler of LRM / TripoSR style decoders, instead of one
    linear head per tile: neighbouring tokens blend, and texels share weights across the grid)."""

    def __init__(self, in_dim: int, out_channels: int, num_rounds: int, min_channels: int = 32) -> None:
        super().__init__()
        layers = []
        width = in_dim
        for _ in range(num_rounds):
            nxt = max(min_channels, width // 2)
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(width, nxt, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(nxt, nxt, 3, padding=1),
                nn.GELU(),
            ]
            width = nxt
        layers.append(nn.Conv2d(width, out_channels, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TriplaneDecoder(nn.Module):
    """``[B, h*w, hidden_dim]`` tokens -> ``[B, 3, C, R + 2m, R + 2m]`` tri-planes, ``R = h * upsample``
    texels covering the canonical image and ``m = margin`` texels around them.

    A transformer mixes all tokens; then either a linear head turns each token into an
    ``upsample x upsample`` tile of all three planes (pixel shuffle, ``upsampler="linear"``) or a
    convolutional upsampler grows the token grid (``"conv"``, needs a power-of-two ``upsample``).
    Tiles are laid out so that the image's axes line up with the planes' (:func:`align_to_image`):
    token (i, j) writes plane tile (i, j) which, in the frustum layout
    (:func:`vq3d_nerfstudio.stage1.triplane.frustum_coordinates`), is exactly where image patch (i, j)
    samples the xy plane. The margin (space seen only from novel views) is either a copy of the
    edge texels (``margin_source="replicate"``) or written by the decoder (``"decoded"``, LRM-style:
    ``margin / upsample`` rings of learned query tokens around the token grid go through the same
    transformer and head, so the margin's content comes from every token, not from the nearest edge
    texel); a 3x3 convolution over the whole plane then refines seams and margin.
    """

    def __init__(
        self,
        grid_size: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        triplane_channels: int,
        triplane_resolution: int,
        margin: int = 0,
        upsampler: Literal["linear", "conv"] = "linear",
        margin_source: Literal["replicate", "decoded"] = "replicate",
    ) -> None:
        super().__init__()
        if triplane_resolution % grid_size:
            raise ValueError(f"tri-plane resolution {triplane_resolution} is not a multiple of the token grid {grid_size}")
        self.grid_size = grid_size
        self.upsample = triplane_resolution // grid_size
        self.channels = triplane_channels
        self.margin = margin
        self.upsampler = upsampler
        self.margin_source = margin_source
        if margin_source == "decoded":
            if margin % self.upsample:
                raise ValueError(
                    f"a decoded margin is whole token tiles: triplane margin {margin} is not a multiple of {self.upsample} "
                    f"(tri-plane resolution / token grid)"
                )
            self.ring = margin // self.upsample
            self.margin_query = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        elif margin_source == "replicate":
            self.ring = 0
        else:
            raise ValueError(f"margin_source must be 'replicate' or 'decoded', got {margin_source!r}")
        self.transformer = Transformer((grid_size + 2 * self.ring) ** 2, hidden_dim, num_layers, num_heads)
        if upsampler == "linear":
            self.head = nn.Linear(hidden_dim, 3 * triplane_channels * self.upsample**2)
        elif upsampler == "conv":
            rounds = self.upsample.bit_length() - 1
            if 2**rounds != self.upsample:
                raise ValueError(f"the conv upsampler needs a power-of-two ratio of tri-plane to token grid, got {self.upsample}")
            self.head = ConvUpsampler(hidden_dim, 3 * triplane_channels, rounds)
        else:
            raise ValueError(f"upsampler must be 'linear' or 'conv', got {upsampler!r}")
        self.refine = nn.Conv2d(3 * triplane_channels, 3 * triplane_channels, 3, padding=1, groups=3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        side = self.grid_size + 2 * self.ring
        if self.ring:
            tokens = surround_with_queries(tokens, self.grid_size, self.ring, self.margin_query)  # (B, side^2, D)
        x = self.transformer(tokens)  # (B, side^2, D)
        if self.upsampler == "linear":
            x = self.head(x).transpose(1, 2).reshape(batch, -1, side, side)  # (B, 3C*s*s, side, side)
            x = F.pixel_shuffle(x, self.upsample)  # (B, 3C, side*s, side*s)
        else:
            x = self.head(x.transpose(1, 2).reshape(batch, -1, side, side))  # (B, 3C, side*s, side*s)
        res = x.shape[-1]
        # a decoded margin is already there (ring * s = margin texels a side): only the replicate one is added
        x = place_planes(x.reshape(batch, 3, self.channels, res, res), 0 if self.ring else self.margin)
        res = x.shape[-1]
        x = x.reshape(batch, 3 * self.channels, res, res)
        x = x + self.refine(x)
        return x.reshape(batch, 3, self.channels, res, res)


def surround_with_queries(tokens: torch.Tensor, grid_size: int, ring: int, query: torch.Tensor) -> torch.Tensor:
    """``[B, g*g, D]`` tokens (row-major grid) -> ``[B, (g+2r)^2, D]``: the grid in the centre of a
    larger one whose outer ``ring`` rows and columns hold ``query`` (``[1, 1, D]``), row-major."""
    batch, _, dim = tokens.shape
    side = grid_size + 2 * ring
    grid = query.expand(batch, side * side, dim).reshape(batch, side, side, dim).clone()
    grid[:, ring : ring + grid_size, ring : ring + grid_size] = tokens.reshape(batch, grid_size, grid_size, dim)
    return grid.reshape(batch, side * side, dim)


def place_planes(grids: torch.Tensor, margin: int) -> torch.Tensor:
    """Token-grid layout ``[B, 3, C, R, R]`` -> tri-planes ``[B, 3, C, R + 2m, R + 2m]``:
    :func:`align_to_image`, then ``margin`` texels on each side copied from the nearest edge texel."""
    planes = align_to_image(grids)
    if not margin:
        return planes
    batch, _, channels, res, _ = planes.shape
    padded = F.pad(planes.reshape(batch, 3 * channels, res, res), (margin,) * 4, mode="replicate")
    return padded.reshape(batch, 3, channels, res + 2 * margin, res + 2 * margin)


def align_to_image(grids: torch.Tensor) -> torch.Tensor:
    """Map token-grid layout ``[B, 3, C, R, R]`` (row i = image row, top first; column j = image
    column) onto the tri-plane convention of ``triplane.py``, for the canonical camera (x right,
    y up, looking down -z; in the frustum layout U, V, W play x, y, z):

    - xy plane (rows = y, ascending): image top is +y, so rows are flipped;
    - xz plane (rows = z, ascending): image top shows the far ground (-z), already in order;
    - yz plane (columns = y, rows = z): image rows run along y (flipped), image columns along z.
    """
    xy = grids[:, 0].flip(-2)
    xz = grids[:, 1]
    yz = grids[:, 2].flip(-2).transpose(-1, -2)  # yz[c, r, col] = grid[c, R-1-col, r]
    return torch.stack([xy, xz, yz], dim=1)

"""ViT decoder: quantized tokens -> tri-plane features (the NeRF of one image)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vq3d_nerfstudio.vit import Transformer


class TriplaneDecoder(nn.Module):
    """``[B, h*w, hidden_dim]`` tokens -> ``[B, 3, C, R, R]`` tri-planes with ``R = h * upsample``.

    A transformer mixes all tokens; a linear head turns each token into an ``upsample x upsample``
    tile of all three planes (pixel shuffle); a 3x3 convolution smooths tile seams. Tiles are laid
    out so that the image's axes line up with the planes' (see :func:`align_to_image`): the token
    grid keeps its spatial meaning instead of asking attention to move content across the grid.
    """

    def __init__(
        self,
        grid_size: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        triplane_channels: int,
        triplane_resolution: int,
    ) -> None:
        super().__init__()
        if triplane_resolution % grid_size:
            raise ValueError(f"tri-plane resolution {triplane_resolution} is not a multiple of the token grid {grid_size}")
        self.grid_size = grid_size
        self.upsample = triplane_resolution // grid_size
        self.channels = triplane_channels
        self.transformer = Transformer(grid_size**2, hidden_dim, num_layers, num_heads)
        self.head = nn.Linear(hidden_dim, 3 * triplane_channels * self.upsample**2)
        self.refine = nn.Conv2d(3 * triplane_channels, 3 * triplane_channels, 3, padding=1, groups=3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        x = self.head(self.transformer(tokens))  # (B, h*w, 3C*s*s)
        x = x.transpose(1, 2).reshape(batch, -1, self.grid_size, self.grid_size)  # (B, 3C*s*s, h, w)
        x = F.pixel_shuffle(x, self.upsample)  # (B, 3C, R, R)
        x = x + self.refine(x)
        res = x.shape[-1]
        return align_to_image(x.reshape(batch, 3, self.channels, res, res))


def align_to_image(grids: torch.Tensor) -> torch.Tensor:
    """Map token-grid layout ``[B, 3, C, R, R]`` (row i = image row, top first; column j = image
    column) onto the tri-plane convention of ``triplane.py``, for the canonical camera (x right,
    y up, looking down -z):

    - xy plane (rows = y, ascending): image top is +y, so rows are flipped;
    - xz plane (rows = z, ascending): image top shows the far ground (-z), already in order;
    - yz plane (columns = y, rows = z): image rows run along y (flipped), image columns along z.
    """
    xy = grids[:, 0].flip(-2)
    xz = grids[:, 1]
    yz = grids[:, 2].flip(-2).transpose(-1, -2)  # yz[c, r, col] = grid[c, R-1-col, r]
    return torch.stack([xy, xz, yz], dim=1)

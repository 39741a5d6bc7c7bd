"""ViT encoder: image -> token grid (ViT-VQGAN's encoder, Yu et al. 2022, sec. 3.1)."""

from __future__ import annotations

import torch
from torch import nn

from vq3d_nerfstudio.stage1.vit import Transformer


class ViTEncoder(nn.Module):
    """``[B, 3, H, W]`` images in ``[0, 1]`` -> ``[B, (H/p)*(W/p), hidden_dim]`` tokens, raster order.

    Patchify with a stride-p convolution (p = ``patch_size``), add learned positions, run
    ``num_layers`` transformer blocks.
    """

    def __init__(self, image_size: int, patch_size: int, hidden_dim: int, num_layers: int, num_heads: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.grid_size = image_size // patch_size
        self.patchify = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.transformer = Transformer(self.grid_size**2, hidden_dim, num_layers, num_heads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patchify(images * 2 - 1)  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        return self.transformer(x)

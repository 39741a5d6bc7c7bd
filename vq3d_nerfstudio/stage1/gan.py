"""Adversarial training pieces: discriminators, GAN losses, R1, loss weighting.

Novel-view cameras come from :func:`vq3d_nerfstudio.geometry.cameras.sample_novel_poses`.

VQ3D's discriminator sees real input images against renders of the reconstructed NeRF from the
canonical camera AND from novel viewpoints orbiting the pivot, where no ground truth exists: that is
what keeps novel views plausible. Everything here is plain torch; the model's adversarial component
(:mod:`vq3d_nerfstudio.stage1.adversarial`) builds the discriminator and applies the losses, the
model renders the images and the trainer (``ns/trainer.py``) runs the discriminator's own optimisation step.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

GanLoss = Literal["non-saturating", "hinge"]


# ---- discriminators -------------------------------------------------------------------------------
class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1)
        self.conv2 = nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.conv1(x), 0.2)
        y = F.avg_pool2d(F.leaky_relu(self.conv2(y), 0.2), 2)
        return (y + F.avg_pool2d(self.skip(x), 2)) / math.sqrt(2)


class ResNetDiscriminator(nn.Module):
    """StyleGAN2's residual discriminator, compact: 1x1 from-RGB, residual blocks halving the
    resolution down to 4x4, a minibatch standard-deviation feature, then conv + linear to one logit
    per image. No equalised learning rate or blur kernels (small images, Adam)."""

    def __init__(self, resolution: int, in_channels: int = 3, channels: int = 64, max_channels: int = 256) -> None:
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"discriminator resolution must be a power of two >= 8, not {resolution}")
        blocks, c = [], channels
        self.from_rgb = nn.Conv2d(in_channels, c, 1)
        res = resolution
        while res > 4:
            cout = min(c * 2, max_channels)
            blocks.append(_ResBlock(c, cout))
            c, res = cout, res // 2
        self.blocks = nn.Sequential(*blocks)
        self.conv = nn.Conv2d(c + 1, c, 3, padding=1)
        self.fc = nn.Linear(c * 16, c)
        self.out = nn.Linear(c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.leaky_relu(self.from_rgb(x), 0.2))
        group = min(4, x.shape[0])
        while x.shape[0] % group:
            group -= 1
        # minibatch stddev over groups of images: lets D see a lack of variety among the fakes
        y = x.reshape(group, -1, *x.shape[1:])
        std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # [B / group]
        std = std.repeat(group)[:, None, None, None].expand(-1, 1, *x.shape[2:])
        x = F.leaky_relu(self.conv(torch.cat([x, std], 1)), 0.2)
        return self.out(F.leaky_relu(self.fc(x.flatten(1)), 0.2)).reshape(-1)


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN: strided 4x4 convolutions, one logit per overlapping patch (returned
    flattened per image, ``[B, P]``). Local texture realism rather than global layout."""

    def __init__(self, resolution: int, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        num_layers = max(1, min(num_layers, int(math.log2(resolution)) - 3))
        layers, c = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(c, c * 2, 4, 2, 1), nn.GroupNorm(8, c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        layers += [nn.Conv2d(c, c, 4, 1, 1), nn.GroupNorm(8, c), nn.LeakyReLU(0.2), nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


def build_discriminator(kind: str, resolution: int, in_channels: int, channels: int) -> nn.Module:
    if kind == "resnet":
        return ResNetDiscriminator(resolution, in_channels, channels)
    if kind == "patch":
        return PatchDiscriminator(resolution, in_channels, channels)
    raise ValueError(f"discriminator must be 'resnet' or 'patch', not {kind!r}")


# ---- losses ---------------------------------------------------------------------------------------
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: GanLoss) -> torch.Tensor:
    """Non-saturating: ``softplus(-D(real)) + softplus(D(fake))``; hinge: ``relu(1 - D(real)) +
    relu(1 + D(fake))``; each term averaged over its logits."""
    if kind == "non-saturating":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def generator_loss(fake_logits: torch.Tensor, kind: GanLoss) -> torch.Tensor:
    """Non-saturating: ``softplus(-D(fake))``; hinge: ``-D(fake)``; averaged."""
    if kind == "non-saturating":
        return F.softplus(-fake_logits).mean()
    if kind == "hinge":
        return -fake_logits.mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): ``E ||grad_x D(x)||^2`` on real images, per image summed over
    pixels and channels, averaged over the batch (differentiable w.r.t. D's parameters). Multiply by
    ``gamma / 2`` for the loss."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


def ramp_weight(step: int, start: int, ramp_steps: int) -> float:
    """0 before ``start``, then linear up to 1 over ``ramp_steps`` steps (1 at once if 0)."""
    if step < start:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - start + 1) / ramp_steps)


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance (Esser et al. 2021): ``||grad_last rec|| / (||grad_last adv|| + 1e-4)``,
    the adversarial weight that makes both losses pull the last layer equally hard (detached)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def normalize_disparity(disparity: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` -> zero mean, unit spread per image: rendered (metric) and pseudo-GT
    (relative) disparities only agree up to scale and shift, so D compares their shapes."""
    flat = disparity.flatten(1)
    mean, std = flat.mean(1), flat.std(1).clamp_min(1e-6)
    return (disparity - mean[:, None, None, None]) / std[:, None, None, None]

"""Image and depth metrics of the evaluation protocol (pure torch)."""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

PSNR_CAP = 100.0  # reported for a perfect match (MSE 0)


def psnr(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """PSNR in dB for images in [0, 1]; ``PSNR_CAP`` when they are identical."""
    mse = float(torch.mean((pred.double() - gt.double()) ** 2))
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else -10 * math.log10(mse)


def ssim(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """SSIM of two ``[H, W, 3]`` images in [0, 1] (Gaussian window of up to 7 pixels, odd, fitting the image)."""
    from pytorch_msssim import ssim as _ssim

    win = min(7, *gt.shape[:2])
    win -= 1 - win % 2
    to_batch = lambda x: x.permute(2, 0, 1)[None].double()  # noqa: E731
    return float(_ssim(to_batch(pred), to_batch(gt), data_range=1.0, win_size=win, size_average=True))


def depth_errors(pred: torch.Tensor, gt: torch.Tensor) -> Dict[str, float]:
    """AbsRel and delta < 1.25 over pixels with finite, positive ground truth."""
    mask = torch.isfinite(gt) & (gt > 0) & torch.isfinite(pred) & (pred > 0)
    if not bool(mask.any()):
        return {}
    p, g = pred[mask].double(), gt[mask].double()
    ratio = torch.maximum(p / g, g / p)
    return {"abs_rel": float(((p - g).abs() / g).mean()), "delta1": float((ratio < 1.25).double().mean())}


def depth_spread(weights: torch.Tensor, sample_z: torch.Tensor, gt: torch.Tensor) -> Optional[float]:
    """How far the rendering weights lie from the true surface: over pixels with finite, positive
    ground-truth z-depth, ``sum_i w_i |z_i - z_gt| / (z_gt sum_i w_i)``, averaged. 0 when all weight
    sits on the surface; a density smeared along the ray scores high even if its mean is right.

    Args:
        weights: ``[h, w, S]`` rendering weights of the samples.
        sample_z: ``[h, w, S]`` z-depth of the samples.
        gt: ``[h, w]`` ground-truth z-depth (same units).
    """
    mass = weights.sum(-1)
    mask = torch.isfinite(gt) & (gt > 0) & (mass > 1e-6)
    if not bool(mask.any()):
        return None
    w, z, g = weights[mask].double(), sample_z[mask].double(), gt[mask].double()[:, None]
    return float(((w * (z - g).abs()).sum(-1) / (g[:, 0] * w.sum(-1))).mean())

"""Stage-1 losses as pure functions. Weights (``*_loss_mult``) are applied in the model's
``get_loss_dict`` only.

Depth is supervised in disparity (1 / z-depth): pseudo-ground truth from monocular networks is
relative disparity, and disparity stays finite for the sky (0 at infinity).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def sample_disparity(t_mid: torch.Tensor, directions_norm: torch.Tensor) -> torch.Tensor:
    """Disparity ``1 / z`` of samples at ray distance ``t_mid``.

    nerfstudio's rays have unit directions; ``directions_norm`` is the length of the camera-space
    direction with ``z = -1``, so the z-depth of a sample is ``t / directions_norm``.

    Args:
        t_mid: ``[R, S, 1]`` sample distances along the ray (world units).
        directions_norm: ``[R, 1]``.

    Returns:
        ``[R, S, 1]`` disparity.
    """
    return directions_norm[:, None, :] / t_mid.clamp_min(1e-6)


def pointwise_depth_loss(
    weights: torch.Tensor, sample_disp: torch.Tensor, target_disp: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """VQ3D's pointwise depth loss: the expected disparity error under the rendering weights.

    ``L = sum_i w_i |d_i - d*| + (1 - sum_i w_i) |0 - d*|`` per ray: weight that no sample takes
    (the transmittance left at the far end) is treated as lying at infinity (disparity 0). It is
    zero only when all weight sits at the target disparity (VQ3D sec. 3.3 / project page figure).

    Args:
        weights: ``[R, S, 1]`` volumetric rendering weights.
        sample_disp: ``[R, S, 1]`` disparity of each sample.
        target_disp: ``[R, 1]`` target disparity.
        mask: optional ``[R, 1]`` bool, rays to include.

    Returns:
        scalar mean over (masked) rays.
    """
    leftover = (1 - weights.sum(dim=-2)).clamp_min(0)  # (R, 1)
    per_ray = (weights * (sample_disp - target_disp[:, None, :]).abs()).sum(dim=-2) + leftover * target_disp.abs()
    return _masked_mean(per_ray, mask)


def accumulated_depth_loss(
    weights: torch.Tensor, sample_disp: torch.Tensor, target_disp: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The ablation: error of the accumulated (expected) disparity, ``|sum_i w_i d_i - d*|``.

    Leftover weight counts as disparity 0, as in :func:`pointwise_depth_loss`. Any spread of weight
    whose mean is the target scores zero.
    """
    expected = (weights * sample_disp).sum(dim=-2)  # (R, 1)
    return _masked_mean((expected - target_disp).abs(), mask)


def expected_disparity(weights: torch.Tensor, sample_disp: torch.Tensor) -> torch.Tensor:
    """``[R, 1]`` rendered disparity ``sum_i w_i d_i`` (leftover weight at infinity adds 0)."""
    return (weights * sample_disp).sum(dim=-2)


def disparity_anchors(
    maps: torch.Tensor, mask: torch.Tensor, percentiles: Tuple[float, float]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-image robust low and high disparity: the ``percentiles`` (in [0, 100]) of each image's
    valid pixels.

    Args:
        maps: ``[B, ...]`` disparity maps; mask: same shape, bool, the valid pixels.

    Returns:
        ``(low [B], high [B])``; both 0 for an image without a valid pixel.
    """
    flat, valid = maps.reshape(maps.shape[0], -1), mask.reshape(mask.shape[0], -1)
    q = torch.tensor([percentiles[0] / 100.0, percentiles[1] / 100.0], dtype=flat.dtype, device=flat.device)
    out = torch.zeros(flat.shape[0], 2, dtype=flat.dtype, device=flat.device)
    for b in range(flat.shape[0]):
        values = flat[b][valid[b]]
        if values.numel():
            out[b] = torch.quantile(values, q)
    return out[:, 0], out[:, 1]


def canonical_disparity(
    disparity: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    disparity_range: Tuple[float, float],
    min_spread: float = 1e-6,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Relative pseudo-GT disparity (unknown scale and shift per image) -> disparity of the
    canonical scene: each image's robust ``low`` and ``high`` are mapped affinely onto
    ``disparity_range = (far, near)`` (world units^-1 of the canonical camera).

    The target depends on the pseudo-GT alone, never on the model's prediction, so a flat or an
    inverted NeRF cannot satisfy it (fitting the pseudo-GT to the render instead
    scores flat geometry zero). It is invariant to ``a * d + b`` (``a > 0``) applied to the
    pseudo-GT, since the anchors move with it. An image whose anchors coincide (a flat pseudo-GT)
    carries no depth information and is masked out.

    Args:
        disparity: ``[R, 1]`` per-ray pseudo-GT; low, high: ``[R]`` anchors of each ray's image.

    Returns:
        ``(target [R, 1], ok [R, 1] bool)``.
    """
    far, near = disparity_range
    spread = (high - low)[:, None]
    ok = spread > min_spread
    target = far + (disparity - low[:, None]) / torch.where(ok, spread, torch.ones_like(spread)) * (near - far)
    return torch.where(ok, target, torch.zeros_like(target)), ok


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)

"""Stage-1 losses as pure functions. Weights (``*_loss_mult``) are applied in the model's
``get_loss_dict`` only.

Depth is supervised in disparity (1 / z-depth): pseudo-ground truth from monocular networks is
relative disparity, and disparity stays finite for the sky (0 at infinity).
"""

from __future__ import annotations

from typing import Optional

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


def align_scale_shift(
    target: torch.Tensor, prediction: torch.Tensor, group: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """Least-squares ``a * target + b`` closest to ``prediction``, solved per group (image).

    For relative (scale- and shift-free) pseudo-GT disparity (MiDaS-style alignment, Ranftl et al.
    2020). The solve is detached: only the prediction carries gradients.

    Args:
        target: ``[R, 1]``; prediction: ``[R, 1]``; group: ``[R]`` long in ``[0, num_groups)``.

    Returns:
        ``[R, 1]`` aligned target.
    """
    t = target[:, 0].detach()
    p = prediction[:, 0].detach()

    def per_group(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group, values)

    n = per_group(torch.ones_like(t))
    st, sp, stt, stp = per_group(t), per_group(p), per_group(t * t), per_group(t * p)
    det = n * stt - st * st
    ok = det.abs() > 1e-8
    scale = torch.where(ok, (n * stp - st * sp) / det.where(ok, torch.ones_like(det)), torch.ones_like(det))
    shift = torch.where(ok, (sp - scale * st) / n.clamp_min(1), torch.zeros_like(det))
    return (scale[group] * t + shift[group])[:, None]


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)

"""Rendering and depth losses on hand-made rays and weight vectors."""

import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.model_components.renderers import DepthRenderer

from vq3d_nerfstudio.losses import (
    accumulated_depth_loss,
    align_scale_shift,
    expected_disparity,
    pointwise_depth_loss,
    sample_disparity,
)


def weights_at(values):
    return torch.tensor(values, dtype=torch.float32)[None, :, None]  # (1, S, 1)


DISP = weights_at([0.2, 0.4, 0.6])  # sample disparities
TARGET = torch.tensor([[0.4]])


def test_single_opaque_sample_renders_depth_at_its_t():
    bundle = RayBundle(
        origins=torch.zeros(1, 3), directions=torch.tensor([[0.0, 0.0, -1.0]]), pixel_area=torch.ones(1, 1)
    )
    bins = torch.linspace(1.0, 3.0, 9)  # 8 intervals of 0.25
    samples = bundle.get_ray_samples(bin_starts=bins[None, :-1, None], bin_ends=bins[None, 1:, None])
    density = torch.zeros(1, 8, 1)
    density[0, 5] = 1e4  # interval [2.25, 2.5] is opaque
    weights = samples.get_weights(density)
    assert torch.allclose(weights[0, :, 0], torch.eye(8)[5], atol=1e-6)
    depth = DepthRenderer(method="expected")(weights, samples)
    assert torch.isclose(depth[0, 0], torch.tensor(2.375), atol=1e-5)


def test_sample_disparity_is_directions_norm_over_t():
    t = torch.tensor([[[2.0], [4.0]]])
    # z-depth = t / |d_cam| with |d_cam| = 1.1, so 1/z = 1.1 / t
    assert torch.allclose(sample_disparity(t, torch.tensor([[1.1]])), torch.tensor([[[0.55], [0.275]]]))


def test_pointwise_loss_zero_only_when_all_weight_at_target():
    assert pointwise_depth_loss(weights_at([0, 1, 0]), DISP, TARGET) == 0
    # half the weight at 0.2, half at 0.6: 0.5 * 0.2 + 0.5 * 0.2 = 0.2
    assert torch.isclose(pointwise_depth_loss(weights_at([0.5, 0, 0.5]), DISP, TARGET), torch.tensor(0.2))
    assert pointwise_depth_loss(weights_at([0.1, 0.8, 0.1]), DISP, TARGET) > 0


def test_accumulated_loss_is_zero_for_any_spread_with_the_right_mean():
    assert accumulated_depth_loss(weights_at([0, 1, 0]), DISP, TARGET) == 0
    assert accumulated_depth_loss(weights_at([0.5, 0, 0.5]), DISP, TARGET).abs() < 1e-7
    # mean 0.2*0.25 + 0.6*0.25 + 0.4*0.5 = 0.4 again
    assert accumulated_depth_loss(weights_at([0.25, 0.5, 0.25]), DISP, TARGET).abs() < 1e-7
    assert torch.isclose(accumulated_depth_loss(weights_at([1, 0, 0]), DISP, TARGET), torch.tensor(0.2))


def test_leftover_weight_counts_as_infinitely_far():
    half = weights_at([0, 0.5, 0])
    # pointwise: 0.5 * |0.4 - 0.4| + 0.5 * |0 - 0.4| = 0.2; accumulated: |0.5 * 0.4 - 0.4| = 0.2
    assert torch.isclose(pointwise_depth_loss(half, DISP, TARGET), torch.tensor(0.2))
    assert torch.isclose(accumulated_depth_loss(half, DISP, TARGET), torch.tensor(0.2))
    # sky: target disparity 0, no weight anywhere -> no loss
    assert pointwise_depth_loss(weights_at([0, 0, 0]), DISP, torch.tensor([[0.0]])) == 0
    assert torch.isclose(expected_disparity(half, DISP), torch.tensor([[0.2]]))


def test_mask_excludes_rays():
    weights = torch.cat([weights_at([0, 1, 0]), weights_at([1, 0, 0])])
    disp = torch.cat([DISP, DISP])
    target = torch.tensor([[0.4], [0.4]])
    assert torch.isclose(pointwise_depth_loss(weights, disp, target), torch.tensor(0.1))
    assert pointwise_depth_loss(weights, disp, target, mask=torch.tensor([[True], [False]])) == 0


def test_scale_shift_alignment_recovers_each_image():
    torch.manual_seed(0)
    prediction = torch.rand(12, 1)
    group = torch.arange(3).repeat_interleave(4)
    scale, shift = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([0.1, -0.3, 1.0])
    relative = (prediction - shift[group, None]) / scale[group, None]
    aligned = align_scale_shift(relative, prediction, group, num_groups=3)
    assert torch.allclose(aligned, prediction, atol=1e-5)


def test_warmup_cosine_factor_hand_values():
    from vq3d_nerfstudio.schedulers import warmup_cosine_factor

    assert warmup_cosine_factor(0, 10, 110, 0.1) == 0.0
    assert warmup_cosine_factor(5, 10, 110, 0.1) == 0.5
    assert warmup_cosine_factor(10, 10, 110, 0.1) == 1.0
    assert abs(warmup_cosine_factor(60, 10, 110, 0.1) - 0.55) < 1e-12  # halfway: (0 + 1) / 2 * 0.9 + 0.1
    assert abs(warmup_cosine_factor(500, 10, 110, 0.1) - 0.1) < 1e-12
    assert type(warmup_cosine_factor(60, 10, 110, 0.1)) is float

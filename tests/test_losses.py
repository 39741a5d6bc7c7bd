"""Rendering and depth losses on hand-made rays and weight vectors."""

import pytest
import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.model_components.renderers import DepthRenderer

from vq3d_nerfstudio.stage1.losses import (
    accumulated_depth_loss,
    canonical_disparity,
    disparity_anchors,
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


def relative_target(pseudo, mask, group=None, percentiles=(5.0, 95.0), disparity_range=(0.0, 0.83)):
    """The model's relative-depth target for one image's rays (every pixel a ray)."""
    low, high = disparity_anchors(pseudo[None], mask[None], percentiles)
    group = torch.zeros(pseudo.numel(), dtype=torch.long) if group is None else group
    return canonical_disparity(pseudo.reshape(-1, 1), low[group], high[group], disparity_range)


def test_percentile_anchors_hand_values():
    # 0, 1, ..., 100: the 5th and 95th percentiles are 5 and 95; masked-out values are ignored
    values = torch.cat([torch.arange(101.0), torch.tensor([1e6, -1e6])])
    mask = torch.cat([torch.ones(101, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)])
    low, high = disparity_anchors(values[None], mask[None], (5.0, 95.0))
    assert torch.allclose(low, torch.tensor([5.0])) and torch.allclose(high, torch.tensor([95.0]))
    target, ok = canonical_disparity(torch.tensor([[5.0], [50.0], [95.0]]), low.expand(3), high.expand(3), (0.0, 0.9))
    assert torch.allclose(target, torch.tensor([[0.0], [0.45], [0.9]])) and bool(ok.all())


def test_relative_target_is_invariant_to_scale_and_shift_of_the_pseudo_gt():
    torch.manual_seed(0)
    pseudo = torch.rand(200)
    mask = torch.rand(200) > 0.2
    base, ok = relative_target(pseudo, mask)
    for a, b in [(3.0, -1.0), (0.01, 7.0), (250.0, 0.0)]:
        moved, ok2 = relative_target(a * pseudo + b, mask)
        assert torch.allclose(moved, base, atol=1e-4) and torch.equal(ok, ok2)


def test_relative_target_is_not_satisfied_by_flat_or_inverted_geometry():
    """Pseudo-GT = 3 * true disparity + 2; with p5 at 0 and p95 at 0.83 the target is the true
    disparity, so the true geometry scores ~0 and flat or inverted geometry clearly does not."""
    true = torch.linspace(0.0, 1.0, 1001)
    low, high = torch.quantile(true, 0.05), torch.quantile(true, 0.95)
    true = (true - low) / (high - low) * 0.83  # now p5 = 0, p95 = 0.83 exactly
    target, ok = relative_target(3 * true + 2, torch.ones_like(true, dtype=torch.bool))
    assert torch.allclose(target[:, 0], true, atol=1e-5) and bool(ok.all())
    disp = torch.stack([true, torch.full_like(true, 0.4), 0.83 - true], 1)[..., None]  # (R, 3, 1): true, flat, inverted
    onehot = lambda k: torch.nn.functional.one_hot(torch.full((len(true),), k), 3).float()[..., None]  # noqa: E731
    true_loss, flat_loss, inverted_loss = (pointwise_depth_loss(onehot(k), disp, target) for k in range(3))
    assert true_loss < 1e-5
    # t is uniform on about [-0.05, 0.88]: flat at 0.4 costs mean |t - 0.4| ~ 0.23, inverted mean |2t - 0.83| ~ 0.46
    assert flat_loss > 0.15 and inverted_loss > 0.3


def test_relative_target_masks_images_without_depth_spread():
    pseudo = torch.full((50,), 0.7)
    target, ok = relative_target(pseudo, torch.ones(50, dtype=torch.bool))
    assert not bool(ok.any())
    # masked rays count nowhere in the loss
    weights = torch.zeros(50, 2, 1)
    assert pointwise_depth_loss(weights, torch.zeros(50, 2, 1), target + 1, mask=ok) == 0


def test_warmup_cosine_factor_hand_values():
    from vq3d_nerfstudio.ns.schedulers import warmup_cosine_factor

    assert warmup_cosine_factor(0, 10, 110, 0.1) == 0.0
    assert warmup_cosine_factor(5, 10, 110, 0.1) == 0.5
    assert warmup_cosine_factor(10, 10, 110, 0.1) == 1.0
    assert abs(warmup_cosine_factor(60, 10, 110, 0.1) - 0.55) < 1e-12  # halfway: (0 + 1) / 2 * 0.9 + 0.1
    assert abs(warmup_cosine_factor(500, 10, 110, 0.1) - 0.1) < 1e-12
    assert type(warmup_cosine_factor(60, 10, 110, 0.1)) is float


@pytest.mark.parametrize("max_iterations", [12, 40])
def test_schedule_follows_max_num_iterations(synth_dir, tmp_path, max_iterations):
    """The warm-up cosine runs over the run's --max-num-iterations, not the preset's 1650 steps: the
    last step trains at the rate the formula gives one step before the end (by hand: warm-up 2, so the
    cosine has gone (N - 3) / (N - 2) of its way), and the step after it at learning_rate_alpha."""
    import math

    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny")
    config.pipeline.datamanager.data = synth_dir
    config.pipeline.datamanager.num_workers = 0
    config.output_dir, config.vis, config.timestamp = tmp_path, "tensorboard", "t"
    config.max_num_iterations = max_iterations
    for group in ("autoencoder", "field"):
        config.optimizers[group]["scheduler"].warm_up_end = 2
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    peak, alpha = config.optimizers["field"]["optimizer"].lr, 0.05
    for step in range(max_iterations - 1):  # the trainer steps the schedule after each step
        trainer.optimizers.scheduler_step_all(step)
    progress = (max_iterations - 1 - 2) / (max_iterations - 2)
    expected_last = peak * ((math.cos(math.pi * progress) + 1) / 2 * (1 - alpha) + alpha)
    for group in ("autoencoder", "field"):
        assert trainer.optimizers.optimizers[group].param_groups[0]["lr"] == pytest.approx(expected_last, rel=1e-9)
    trainer.optimizers.scheduler_step_all(max_iterations - 1)
    for group in ("autoencoder", "field"):
        assert trainer.optimizers.optimizers[group].param_groups[0]["lr"] == pytest.approx(alpha * peak, rel=1e-9)


def test_schedule_with_its_own_length_keeps_it(synth_dir, tmp_path):
    """--optimizers.field.scheduler.max-steps set: that group's cosine keeps its length (10 steps of
    the 2-step warm-up and 8 of cosine: half way at step 6, factor (1 + alpha) / 2), the other group
    follows the run (20 steps)."""
    import math

    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny")
    config.pipeline.datamanager.data = synth_dir
    config.pipeline.datamanager.num_workers = 0
    config.output_dir, config.vis, config.timestamp = tmp_path, "tensorboard", "t"
    config.max_num_iterations = 20
    for group in ("autoencoder", "field"):
        config.optimizers[group]["scheduler"].warm_up_end = 2
    config.optimizers["field"]["scheduler"].max_steps = 10
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    for step in range(6):
        trainer.optimizers.scheduler_step_all(step)
    peak = config.optimizers["field"]["optimizer"].lr
    assert trainer.optimizers.optimizers["field"].param_groups[0]["lr"] == pytest.approx(peak * 1.05 / 2, rel=1e-9)
    # the other group: 4 of its 18 cosine steps
    expected = peak * ((math.cos(math.pi * 4 / 18) + 1) / 2 * 0.95 + 0.05)
    assert trainer.optimizers.optimizers["autoencoder"].param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)

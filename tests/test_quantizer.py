"""Vector quantizer: hand-derived values and invariants."""

import pytest
import torch
import torch.nn.functional as F

from vq3d_nerfstudio.stage1.quantizer import (
    ContinuousTokens,
    FactorizedQuantizer,
    FSQConfig,
    FSQuantizer,
    NoCodesError,
    NoQuantizerConfig,
    VQConfig,
    code_perplexity,
    fsq_bound,
    fsq_codes_to_indices,
    fsq_indices_to_codes,
    kmeans_codebook,
    nearest_codes,
    reset_optimizer_rows,
    spherical_kmeans_step,
    vq_losses,
)


def test_nearest_code_is_highest_cosine():
    codebook = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    latents = F.normalize(torch.tensor([[0.9, 0.1], [0.2, 0.8], [-1.0, -0.3]]), dim=-1)
    assert nearest_codes(latents, codebook).tolist() == [0, 1, 2]


def test_vq_losses_hand_values():
    latents = torch.tensor([[1.0, 0.0]])
    codes = torch.tensor([[0.0, 1.0]])
    codebook_loss, commitment_loss = vq_losses(latents, codes, beta=0.25)
    # mean((1-0)^2, (0-1)^2) = 1
    assert torch.isclose(codebook_loss, torch.tensor(1.0))
    assert torch.isclose(commitment_loss, torch.tensor(0.25))


def test_eval_round_trip_through_indices():
    torch.manual_seed(0)
    quantizer = FactorizedQuantizer(input_dim=8, codebook_size=16, code_dim=4).eval()
    tokens = torch.randn(2, 5, 8)
    quantized, indices, _ = quantizer(tokens)
    assert indices.shape == (2, 5) and indices.dtype == torch.long
    assert torch.allclose(quantizer.get_output_from_indices(indices), quantized, atol=1e-6)


def test_straight_through_gradient_equals_identity_gradient():
    """d quantized / d tokens is the gradient of project_out(encode(tokens)), as if snapping were identity."""
    torch.manual_seed(1)
    quantizer = FactorizedQuantizer(input_dim=6, codebook_size=8, code_dim=3)
    tokens = torch.randn(1, 4, 6, requires_grad=True)
    weights = torch.randn(1, 4, 6)
    quantized, _, _ = quantizer(tokens)
    (grad_st,) = torch.autograd.grad((quantized * weights).sum(), tokens)
    tokens2 = tokens.detach().clone().requires_grad_(True)
    (grad_id,) = torch.autograd.grad((quantizer.project_out(quantizer.encode(tokens2)) * weights).sum(), tokens2)
    assert grad_st.abs().sum() > 0
    assert torch.allclose(grad_st, grad_id, atol=1e-6)


def test_zero_vq_loss_on_exact_codes():
    torch.manual_seed(2)
    # a hand-set codebook: no k-means initialisation over it on the first training forward
    quantizer = FactorizedQuantizer(input_dim=8, codebook_size=6, code_dim=4, kmeans_init=False)
    tokens = torch.randn(1, 6, 8)
    with torch.no_grad():
        quantizer.codebook.copy_(quantizer.encode(tokens)[0] * 3.0)  # any positive scale: codes are normalised
    _, indices, losses = quantizer(tokens)
    assert indices[0].tolist() == list(range(6))
    assert losses["commitment"].item() < 1e-12
    assert losses["codebook"].item() < 1e-12


def test_perplexity_bounds():
    assert torch.isclose(code_perplexity(torch.zeros(10, dtype=torch.long), 4), torch.tensor(1.0))
    assert torch.isclose(code_perplexity(torch.arange(4).repeat(3), 4), torch.tensor(4.0))


def test_dead_codes_restart_onto_current_latents():
    torch.manual_seed(3)
    quantizer = FactorizedQuantizer(input_dim=4, codebook_size=8, code_dim=4, usage_decay=0.5, dead_code_threshold=0.2)
    latents = F.normalize(torch.randn(6, 4), dim=-1)
    used = torch.tensor([0, 0, 1, 1, 1, 0])
    # usage starts at 1; codes 0 and 1 are used: EMA 0.5 + 0.5 * count; unused codes decay 1 -> 0.5 -> 0.25 -> 0.125
    assert quantizer.restart_dead_codes(latents, used) == 0
    assert quantizer.restart_dead_codes(latents, used) == 0
    assert quantizer.restart_dead_codes(latents, used) == 6
    restarted = F.normalize(quantizer.codebook[2:], dim=-1)
    # every restarted code now equals one of the latents it was given
    assert torch.allclose((restarted @ latents.t()).max(dim=1).values, torch.ones(6), atol=1e-6)
    assert torch.equal(quantizer.code_usage[2:], torch.ones(6))


def test_eval_mode_never_restarts_codes():
    quantizer = FactorizedQuantizer(input_dim=4, codebook_size=8, code_dim=4, dead_code_threshold=2.0).eval()
    before = quantizer.codebook.detach().clone()
    quantizer(torch.randn(1, 3, 4))
    assert torch.equal(before, quantizer.codebook)


# --- codebook learning: k-means initialisation ------------------------------------------------------


def _clusters_around_axes(eps: float = 0.01) -> torch.Tensor:
    """12 unit latents in 3 tight clusters: around each axis e_i, e_i +/- eps e_j for both other axes j.
    Each cluster's points sum to a multiple of e_i, so its spherical mean is exactly e_i."""
    eye = torch.eye(3)
    points = [eye[i] + sign * eps * eye[j] for i in range(3) for j in range(3) if j != i for sign in (1.0, -1.0)]
    return F.normalize(torch.stack(points), dim=-1)


def test_spherical_kmeans_step_hand_values():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    x3 = F.normalize(torch.tensor([0.1, -1.0]), dim=0)
    latents = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([0.6, 0.8]), x3])
    # cosines: x1 -> (1, 0, -1): c0; x2 -> (0.6, 0.8, -0.6): c1; x3 -> (0.0995, -0.995, -0.0995): c0; c2 wins none
    new = spherical_kmeans_step(latents, centroids)
    assert torch.allclose(new[0], F.normalize(torch.tensor([1.0, 0.0]) + x3, dim=0), atol=1e-6)
    assert torch.allclose(new[1], torch.tensor([0.6, 0.8]), atol=1e-6)
    assert torch.equal(new[2], centroids[2])  # empty cluster keeps its centroid


def test_kmeans_codebook_finds_the_cluster_directions():
    latents = _clusters_around_axes()
    for seed in range(3):  # k-means++ seeds one centroid per well-separated cluster, whatever the draw
        codes = kmeans_codebook(latents, 3, num_iters=3, generator=torch.Generator().manual_seed(seed))
        assert codes.shape == (3, 3)
        order = codes.abs().argmax(dim=1).argsort()
        assert torch.allclose(codes[order], torch.eye(3), atol=1e-6)


def test_kmeans_codebook_with_fewer_latents_than_codes_copies_every_latent():
    latents = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)
    codes = kmeans_codebook(latents, 5, num_iters=3, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (5, 3)
    assert torch.allclose(codes.norm(dim=-1), torch.ones(5), atol=1e-6)
    similarity = codes @ latents.t()  # (5, 2)
    assert (similarity.max(dim=1).values > 0.99).all()  # every code is a latent plus a little noise
    assert (similarity.max(dim=0).values > 0.99).all()  # every latent has a code
    assert torch.unique(codes, dim=0).shape[0] == 5  # the noise makes repeated latents distinct codes


def _identity_quantizer(**kwargs) -> FactorizedQuantizer:
    """A 3 -> 3 quantizer whose project_in is the identity, so its latents are normalize(tokens)."""
    quantizer = FactorizedQuantizer(input_dim=3, codebook_size=3, code_dim=3, **kwargs)
    with torch.no_grad():
        quantizer.project_in.weight.copy_(torch.eye(3))
        quantizer.project_in.bias.zero_()
    return quantizer


def test_first_training_forward_initialises_the_codebook_once():
    torch.manual_seed(4)
    quantizer = _identity_quantizer(dead_code_fraction=0.0)
    assert not quantizer.initialized
    tokens = _clusters_around_axes()[None] * 5.0  # (1, 12, 3); the latents are the clusters
    quantizer.eval()(tokens)
    assert not quantizer.initialized  # evaluation never initialises
    quantizer.quantize(tokens)
    assert not quantizer.initialized  # nor does inference
    _, indices, _ = quantizer.train()(tokens)
    assert quantizer.initialized and quantizer.last_restarted.all()
    codebook = F.normalize(quantizer.codebook.detach(), dim=-1)
    assert torch.allclose(codebook[codebook.abs().argmax(dim=1).argsort()], torch.eye(3), atol=1e-6)
    # every cluster has its own code: all three codes in use
    assert torch.isclose(code_perplexity(indices, 3), torch.tensor(3.0))
    assert indices[0].reshape(3, 4).unique(dim=1).shape[1] == 1
    before = quantizer.codebook.detach().clone()
    quantizer(torch.randn(1, 12, 3))
    assert torch.equal(quantizer.codebook, before) and not quantizer.last_restarted.any()


def test_initialized_flag_is_saved_and_legacy_checkpoints_count_as_initialised():
    torch.manual_seed(5)
    trained = _identity_quantizer(dead_code_fraction=0.0)
    trained(torch.randn(1, 12, 3))
    state = trained.state_dict()
    assert "initialized" in state and "last_restarted" not in state
    for saved in (state, {k: v for k, v in state.items() if k != "initialized"}):  # a pre-k-means checkpoint
        resumed = _identity_quantizer(dead_code_fraction=0.0)
        resumed.load_state_dict(saved)
        assert resumed.initialized
        resumed(torch.randn(1, 12, 3))  # a training step: no second k-means
        assert torch.equal(resumed.codebook, trained.codebook)


def test_kmeans_init_can_be_turned_off():
    torch.manual_seed(6)
    quantizer = _identity_quantizer(kmeans_init=False, dead_code_fraction=0.0)
    before = quantizer.codebook.detach().clone()
    quantizer(torch.randn(1, 12, 3))
    assert torch.equal(quantizer.codebook, before) and quantizer.initialized


# --- codebook learning: dead codes relative to the expected usage -----------------------------------


def test_dead_code_threshold_scales_with_latents_per_code():
    """Codes 2, 3 are never picked; codes 0, 1 share the N latents. Expected count N / K; threshold
    0.5 * N / K; the EMA (decay 0.5) of an unused code starts at N / K and halves each step, so it
    falls below the threshold (strictly) on the second step, whatever N is."""
    for n in (8, 80):
        quantizer = FactorizedQuantizer(input_dim=4, codebook_size=4, code_dim=4, usage_decay=0.5,
                                        dead_code_fraction=0.5, kmeans_init=False)
        latents = F.normalize(torch.randn(n, 4), dim=-1)
        used = torch.arange(n) % 2
        expected = n / 4
        assert quantizer.restart_dead_codes(latents, used, True) == 0
        # usage: used codes 0.5 * N/4 + 0.5 * N/2 = 3N/8; unused 0.5 * N/4 = N/8 = threshold, not below it
        assert torch.allclose(quantizer.code_usage, torch.tensor([3, 3, 1, 1]) * n / 8)
        quantizer.last_restarted.zero_()
        assert quantizer.restart_dead_codes(latents, used) == 2
        assert quantizer.last_restarted.tolist() == [False, False, True, True]
        # a restarted code starts again at the expected count (at least one pick)
        assert torch.allclose(quantizer.code_usage[2:], torch.full((2,), max(1.0, expected)))


def test_fixed_dead_fraction_matches_the_old_threshold_at_one_latent_per_code():
    """With N = K the relative rule (0.03 * N/K = 0.03) is the old absolute threshold 0.03."""
    relative = FactorizedQuantizer(input_dim=4, codebook_size=8, code_dim=4, usage_decay=0.5, kmeans_init=False)
    absolute = FactorizedQuantizer(input_dim=4, codebook_size=8, code_dim=4, usage_decay=0.5, kmeans_init=False,
                                   dead_code_threshold=0.03)
    latents = F.normalize(torch.randn(8, 4), dim=-1)
    used = torch.zeros(8, dtype=torch.long)
    # unused usage 1 -> 0.5 -> ... -> 2^-5 = 0.03125 -> 2^-6 = 0.0156 < 0.03: dead on the 6th step
    counts_relative = [relative.restart_dead_codes(latents, used) for _ in range(6)]
    counts_absolute = [absolute.restart_dead_codes(latents, used) for _ in range(6)]
    assert counts_relative == counts_absolute == [0, 0, 0, 0, 0, 7]


def test_zero_dead_fraction_disables_restarts():
    torch.manual_seed(7)
    quantizer = _identity_quantizer(dead_code_fraction=0.0, kmeans_init=False)
    usage = quantizer.code_usage.clone()
    for _ in range(3):
        quantizer(torch.randn(1, 1, 3))
    assert torch.equal(quantizer.code_usage, usage) and not quantizer.last_restarted.any()


def test_last_restarted_marks_only_the_last_training_forward():
    torch.manual_seed(8)
    quantizer = FactorizedQuantizer(input_dim=4, codebook_size=8, code_dim=4, kmeans_init=False,
                                    dead_code_threshold=2.0)  # every code dead in a training step
    quantizer(torch.randn(1, 3, 4))
    assert quantizer.last_restarted.all()
    quantizer.dead_code_threshold = 0.0
    quantizer(torch.randn(1, 3, 4))
    assert not quantizer.last_restarted.any()


def test_reset_optimizer_rows_zeroes_adam_moments_of_the_masked_rows():
    param = torch.nn.Parameter(torch.zeros(4, 3))
    optimizer = torch.optim.Adam([param], lr=0.1, betas=(0.9, 0.999))
    mask = torch.tensor([False, True, False, True])
    reset_optimizer_rows(optimizer, param, mask)  # no state before the first step: nothing to do
    grad = torch.arange(12.0).reshape(4, 3) + 1
    param.grad = grad.clone()
    optimizer.step()
    reset_optimizer_rows(optimizer, param, mask)
    state = optimizer.state[param]
    # one Adam step from zero moments: m = (1 - beta1) g, v = (1 - beta2) g^2
    assert torch.allclose(state["exp_avg"][~mask], 0.1 * grad[~mask])
    assert torch.allclose(state["exp_avg_sq"][~mask], 0.001 * grad[~mask] ** 2)
    assert torch.equal(state["exp_avg"][mask], torch.zeros(2, 3))
    assert torch.equal(state["exp_avg_sq"][mask], torch.zeros(2, 3))


def test_kmeans_init_under_ddp_takes_rank_zeros_codebook(monkeypatch):
    """With collectives faked as two ranks holding the same picks (all_reduce doubles the counts) and
    rank 0's codebook arriving by broadcast, every rank keeps rank 0's codes and the global usage.
    (tests/test_shard_training.py runs the real thing over gloo.)"""
    import vq3d_nerfstudio.stage1.quantizer as quantizer_module

    torch.manual_seed(13)
    rank0_codebook = F.normalize(torch.randn(8, 4), dim=-1)
    sources = []

    def broadcast(tensor, src):
        sources.append(src)
        tensor.copy_(rank0_codebook)

    monkeypatch.setattr(quantizer_module.dist, "is_available", lambda: True)
    monkeypatch.setattr(quantizer_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(quantizer_module.dist, "broadcast", broadcast)
    monkeypatch.setattr(quantizer_module.dist, "all_reduce", lambda tensor: tensor.mul_(2))
    quantizer = FactorizedQuantizer(input_dim=4, codebook_size=8, code_dim=4, usage_decay=0.5)
    tokens = torch.randn(1, 12, 4)
    _, indices, _ = quantizer(tokens)
    assert sources == [0] and torch.equal(quantizer.codebook.detach(), rank0_codebook)
    assert torch.equal(indices, nearest_codes(quantizer.encode(tokens), rank0_codebook))
    # 24 latents over both ranks, 8 codes: usage starts at 3, then 0.5 * 3 + 0.5 * (2 * local count)
    expected_usage = 1.5 + torch.bincount(indices.reshape(-1), minlength=8).float()
    assert torch.allclose(quantizer.code_usage, expected_usage)


# --- finite scalar quantization ---------------------------------------------------------------------


def test_fsq_bound_maps_zero_to_zero_and_rounds_to_exactly_the_levels():
    z = torch.linspace(-30.0, 30.0, 2001)[:, None]
    for level in (2, 3, 4, 5, 8):
        levels = torch.tensor([level])
        assert torch.allclose(fsq_bound(torch.zeros(1, 1), levels), torch.zeros(1, 1), atol=1e-6)
        bounded = fsq_bound(z, levels)
        assert (bounded[1:] >= bounded[:-1]).all()  # monotonic
        # even L: integer grid {-L/2, ..., L/2 - 1}; odd L: {-(L-1)/2, ..., (L-1)/2}
        low = -(level // 2)
        high = level // 2 - 1 if level % 2 == 0 else (level - 1) // 2
        assert bounded.min() > low - 0.5 and bounded.max() < high + 0.5
        assert torch.round(bounded).unique().tolist() == list(range(low, high + 1))


def test_fsq_indices_by_hand_for_levels_3_2():
    levels = torch.tensor([3, 2])
    # channel 0 (L=3, h=1): {-1, 0, 1} -> digits 0..2; channel 1 (L=2, h=1): {-1, 0} -> digits 0, 1
    # index = digit0 + 3 * digit1
    points = torch.tensor([[-1.0, -1.0], [0.0, -1.0], [1.0, -1.0], [-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    assert fsq_codes_to_indices(points, levels).tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(fsq_indices_to_codes(torch.arange(6), levels), points)
    # off-grid values snap to the nearest level, values past the ends to the ends:
    # (0.4, -0.6) -> levels (0, -1) -> digits (1, 0) -> 1; (7, 3) -> (1, 0) -> (2, 1) -> 5; (-7, -3) -> 0
    assert fsq_codes_to_indices(torch.tensor([[0.4, -0.6], [7.0, 3.0], [-7.0, -3.0]]), levels).tolist() == [1, 5, 0]


def test_fsq_grid_enumeration_is_a_bijection():
    levels = torch.tensor([4, 3, 2])
    half = torch.tensor([2.0, 1.0, 1.0])
    grid = torch.cartesian_prod(*[(torch.arange(int(n)) - h) / h for n, h in zip(levels, half)])  # (24, 3)
    indices = fsq_codes_to_indices(grid, levels)
    assert sorted(indices.tolist()) == list(range(24))
    assert torch.equal(fsq_indices_to_codes(indices, levels), grid)
    # even L = 4 normalises to {-1, -0.5, 0, 0.5}: within [-1, 1]
    assert grid[:, 0].unique().tolist() == [-1.0, -0.5, 0.0, 0.5]


def test_fsq_eval_round_trip_through_indices():
    torch.manual_seed(9)
    quantizer = FSQuantizer(input_dim=8, levels=(5, 4, 3)).eval()
    assert quantizer.codebook_size == 60
    tokens = torch.randn(2, 7, 8) * 3
    quantized, indices, _ = quantizer(tokens)
    assert indices.shape == (2, 7) and indices.dtype == torch.long
    assert int(indices.min()) >= 0 and int(indices.max()) < 60
    assert torch.allclose(quantizer.get_output_from_indices(indices), quantized, atol=1e-6)
    assert torch.equal(quantizer.snap(quantizer.encode(tokens)), indices)
    quantized2, indices2 = quantizer.quantize(tokens)
    assert torch.equal(indices2, indices) and torch.allclose(quantized2, quantized, atol=1e-6)


def test_fsq_codes_are_grid_points_nearest_the_encoding():
    torch.manual_seed(10)
    quantizer = FSQuantizer(input_dim=6, levels=(4, 5))
    latents = quantizer.encode(torch.randn(1, 50, 6) * 3)
    codes = quantizer.get_codes_from_indices(quantizer.snap(latents))
    # per channel, the grid step is 1/h: the nearest level is within half a step
    assert ((codes - latents).abs() <= torch.tensor([0.25, 0.25]) + 1e-6).all()


def test_fsq_straight_through_gradient_equals_bounded_path_gradient():
    torch.manual_seed(11)
    quantizer = FSQuantizer(input_dim=6, levels=(8, 5, 5))
    tokens = torch.randn(1, 4, 6, requires_grad=True)
    weights = torch.randn(1, 4, 6)
    quantized, _, _ = quantizer(tokens)
    (grad_st,) = torch.autograd.grad((quantized * weights).sum(), tokens)
    tokens2 = tokens.detach().clone().requires_grad_(True)
    (grad_bounded,) = torch.autograd.grad((quantizer.project_out(quantizer.encode(tokens2)) * weights).sum(), tokens2)
    assert grad_st.abs().sum() > 0
    assert torch.allclose(grad_st, grad_bounded, atol=1e-6)


def test_fsq_losses_are_zero():
    quantizer = FSQuantizer(input_dim=4, levels=(3, 3))
    tokens = torch.randn(1, 5, 4)
    _, _, losses = quantizer(tokens)
    assert set(losses) == {"codebook", "commitment"}
    assert all(v.item() == 0.0 and v.device == tokens.device for v in losses.values())


def test_fsq_rejects_levels_below_two():
    with pytest.raises(ValueError):
        FSQuantizer(input_dim=4, levels=(3, 1))


# --- FSQ with several codes per token ---------------------------------------------------------------


def test_one_fsq_group_is_the_single_code_quantizer_bit_for_bit():
    """fsq_groups 1 keeps the one-code model exactly: the same parameters, and the forward written out
    from the pure functions (project_in, bound, divide by L // 2, round with a straight-through
    gradient, project_out) gives bit-identical outputs, indices and gradients."""
    torch.manual_seed(20)
    quantizer = FSQuantizer(input_dim=8, levels=(8, 5, 5), groups=1)
    assert [tuple(p.shape) for p in quantizer.parameters()] == [(3, 8), (3,), (8, 3), (8,)]
    tokens = torch.randn(2, 6, 8, requires_grad=True)
    quantized, indices, _ = quantizer(tokens)
    levels = torch.tensor([8, 5, 5])
    half = (levels // 2).float()
    latents = fsq_bound(quantizer.project_in(tokens), levels) / half
    straight = latents + (torch.round(latents * half) / half - latents).detach()
    reference = quantizer.project_out(straight)
    assert torch.equal(quantized, reference)
    assert torch.equal(indices, fsq_codes_to_indices(latents.detach(), levels)) and indices.shape == (2, 6)
    weights = torch.randn(2, 6, 8)
    (grad,) = torch.autograd.grad((quantized * weights).sum(), tokens)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), tokens)
    assert torch.equal(grad, grad_reference)


def test_fsq_groups_give_a_code_per_group_and_round_trip_from_indices():
    torch.manual_seed(21)
    quantizer = FSQuantizer(input_dim=8, levels=(4, 3), groups=3).eval()
    assert quantizer.codebook_size == 12 and quantizer.code_dim == 2
    assert quantizer.project_in.out_features == 6 and quantizer.project_out.in_features == 6
    tokens = torch.randn(2, 5, 8) * 3
    quantized, indices, _ = quantizer(tokens)
    assert indices.shape == (2, 5, 3) and quantized.shape == (2, 5, 8)
    assert int(indices.min()) >= 0 and int(indices.max()) < 12
    # group g's index is FSQ of project_in's channels 2g, 2g+1 alone
    channels = quantizer.project_in(tokens)
    for g in range(3):
        alone = fsq_bound(channels[..., 2 * g : 2 * g + 2], torch.tensor([4, 3])) / torch.tensor([2.0, 1.0])
        assert torch.equal(fsq_codes_to_indices(alone, torch.tensor([4, 3])), indices[..., g])
    assert torch.allclose(quantizer.get_output_from_indices(indices), quantized, atol=1e-6)
    quantized2, indices2 = quantizer.quantize(tokens)
    assert torch.equal(indices2, indices) and torch.allclose(quantized2, quantized, atol=1e-6)
    # a group's code changes the output through its own columns of project_out only
    other = indices.clone()
    other[..., 1] = (other[..., 1] + 1) % 12
    moved = quantizer.get_output_from_indices(other) - quantized
    codes_delta = quantizer.get_codes_from_indices(other) - quantizer.get_codes_from_indices(indices)
    assert torch.allclose(moved, codes_delta[..., 1, :] @ quantizer.project_out.weight[:, 2:4].T, atol=1e-6)


def test_fsq_needs_at_least_one_group():
    with pytest.raises(ValueError, match="groups must be >= 1"):
        FSQuantizer(input_dim=8, levels=(3, 3), groups=0)


def test_no_quantizer_passes_tokens_through_and_has_no_codes():
    quantizer = NoQuantizerConfig().setup(8)
    assert isinstance(quantizer, ContinuousTokens) and not quantizer.has_codes and quantizer.codebook_size == 0
    assert FSQConfig(levels=(4, 3)).setup(8).has_codes and VQConfig(size=12, code_dim=4).setup(8).has_codes
    tokens = torch.randn(2, 5, 8, requires_grad=True)
    quantized, indices, losses = quantizer(tokens)
    assert quantized is tokens and indices is None and all(float(v) == 0 for v in losses.values())
    assert quantizer.output_from_codes(quantizer.encode(tokens)) is tokens
    for method in (quantizer.snap, quantizer.get_codes_from_indices, quantizer.get_output_from_indices):
        with pytest.raises(NoCodesError, match="continuous tokens"):
            method(tokens)


# --- configs ----------------------------------------------------------------------------------------


def test_quantizer_configs_build_their_modules_and_derive_the_codebook_size():
    vq_config = VQConfig(size=16, code_dim=4, commitment_beta=0.5, use_kmeans_init=False, dead_code_fraction=0.1)
    vq = vq_config.setup(8)
    assert isinstance(vq, FactorizedQuantizer) and (vq.codebook_size, vq.code_dim, vq.beta) == (16, 4, 0.5)
    assert (vq_config.codebook_size, vq_config.groups, vq_config.has_codes) == (16, 1, True)
    fsq_config = FSQConfig(levels=(4, 3), groups=3)
    fsq = fsq_config.setup(8)
    assert isinstance(fsq, FSQuantizer) and (fsq.codebook_size, fsq.code_dim, fsq.groups) == (12, 2, 3)
    assert (fsq_config.codebook_size, fsq_config.groups) == (4 * 3, 3)
    fsq_config.levels = (5, 5, 2)  # derived, not stored: it follows the levels
    assert fsq_config.codebook_size == 50
    none = NoQuantizerConfig()
    assert (none.codebook_size, none.groups, none.has_codes) == (0, 1, False)


@pytest.mark.parametrize("state, expected", [
    ({"quantizer": "fsq", "fsq_levels": (4, 3), "fsq_groups": 2, "codebook_size": 12, "code_dim": 32},
     FSQConfig(levels=(4, 3), groups=2)),
    ({"quantizer": "vq", "codebook_size": 64, "code_dim": 8, "commitment_beta": 0.5, "codebook_kmeans_init": False,
      "dead_code_fraction": 0.06, "fsq_levels": (8, 5, 5, 5), "fsq_groups": 1},
     VQConfig(size=64, code_dim=8, commitment_beta=0.5, use_kmeans_init=False, dead_code_fraction=0.06)),
    ({"quantizer": "none", "codebook_size": 0, "fsq_groups": 1}, NoQuantizerConfig()),
])
def test_a_model_config_saved_with_flat_quantizer_fields_loads_nested(state, expected):
    """Runs saved before the nested config (``quantizer: fsq`` beside ``fsq_levels``, ...) load with
    the same quantizer, and the flat fields are gone."""
    from vq3d_nerfstudio.stage1.model import Vq3dModelConfig

    config = Vq3dModelConfig.__new__(Vq3dModelConfig)
    config.__setstate__({"image_size": 32, **state})
    assert config.quantizer == expected and config.image_size == 32
    assert not {"codebook_size", "fsq_levels", "fsq_groups", "code_dim"} & set(vars(config))


def test_the_quantizer_is_a_subcommand_of_ns_train():
    """`ns-train vq3d-tiny fsq-quantizer --pipeline.model.quantizer.groups 4` keeps the preset's levels
    and sets the groups; `no-quantizer` and `vq-quantizer` switch the kind."""
    import tyro
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion

    def parse(*args):
        return tyro.cli(AnnotatedBaseConfigUnion, args=["vq3d-tiny", *args]).pipeline.model.quantizer

    assert parse() == FSQConfig(levels=(8, 8, 8, 6, 5), groups=1)
    assert parse("fsq-quantizer", "--pipeline.model.quantizer.groups", "4") == FSQConfig(levels=(8, 8, 8, 6, 5), groups=4)
    assert parse("--max-num-iterations", "3", "no-quantizer") == NoQuantizerConfig()
    assert parse("vq-quantizer", "--pipeline.model.quantizer.size", "256").codebook_size == 256


@pytest.mark.parametrize("kind", ["vq", "fsq"])
def test_both_quantizers_share_the_interface(kind):
    torch.manual_seed(12)
    quantizer = (VQConfig(size=12, code_dim=4) if kind == "vq" else FSQConfig(levels=(4, 3))).setup(8)
    tokens = torch.randn(2, 5, 8)
    quantized, indices, losses = quantizer.train()(tokens)
    assert quantized.shape == (2, 5, 8) and indices.shape == (2, 5) and set(losses) == {"codebook", "commitment"}
    quantizer.eval()
    quantized, indices, _ = quantizer(tokens)
    latents = quantizer.encode(tokens)
    assert torch.equal(quantizer.snap(latents), indices)
    assert torch.allclose(quantizer.output_from_codes(quantizer.get_codes_from_indices(indices)), quantized, atol=1e-6)
    assert torch.allclose(quantizer.get_output_from_indices(indices), quantized, atol=1e-6)

"""Vector quantizer: hand-derived values and invariants."""

import torch
import torch.nn.functional as F

from vq3d_nerfstudio.quantizer import FactorizedQuantizer, code_perplexity, nearest_codes, vq_losses


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
    quantizer = FactorizedQuantizer(input_dim=8, codebook_size=6, code_dim=4)
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

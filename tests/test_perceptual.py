"""LPIPS from local weights: agrees with torchmetrics' own loader, and fails clearly without them."""

import pytest
import torch
import torchvision

from vq3d_nerfstudio.stage1.perceptual import LPIPS, LPIPSUnavailable, default_weights_path, load_lpips_if_available


@pytest.fixture(scope="module")
def alexnet_weights(tmp_path_factory):
    """A randomly initialised AlexNet state dict (no ImageNet weights on this machine)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hub") / "alexnet-random.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


def test_identical_images_score_zero_and_different_ones_do_not(alexnet_weights):
    lpips = LPIPS("alex", alexnet_weights)
    torch.manual_seed(1)
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    assert torch.allclose(lpips(a, a), torch.zeros(2), atol=1e-7)
    assert (lpips(a, b) > 0).all()


def test_matches_torchmetrics_loading_the_same_backbone_from_the_hub_cache(alexnet_weights, tmp_path, monkeypatch):
    """Reference: torchmetrics' LPIPS, which reads the backbone from torch hub's cache itself."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    cached = default_weights_path("alex")
    assert cached.parent == tmp_path / "checkpoints"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(alexnet_weights.read_bytes())
    reference = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="mean")
    ours = LPIPS("alex")  # default: the hub cache path
    torch.manual_seed(2)
    a, b = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    assert float(ours(a, b).mean()) == pytest.approx(float(reference(a, b)), rel=1e-5)


def test_gradients_reach_the_input_not_the_network(alexnet_weights):
    lpips = LPIPS("alex", alexnet_weights)
    a = torch.rand(1, 3, 32, 32, requires_grad=True)
    lpips(a, torch.rand(1, 3, 32, 32)).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training  # stays in eval mode (no dropout) when a model calls .train()


def test_missing_or_wrong_weights_are_one_clear_error(tmp_path, alexnet_weights):
    missing = tmp_path / "nope.pth"
    with pytest.raises(LPIPSUnavailable, match="nope.pth.*download https://"):
        LPIPS("alex", missing)
    metric, why = load_lpips_if_available("alex", missing)
    assert metric is None and "nope.pth" in why
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(LPIPSUnavailable, match="garbage.pth"):
        LPIPS("alex", garbage)
    with pytest.raises(LPIPSUnavailable, match="does not hold vgg16"):
        LPIPS("vgg", alexnet_weights)

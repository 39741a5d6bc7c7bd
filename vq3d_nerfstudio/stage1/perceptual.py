"""LPIPS (Zhang et al. 2018) with locally stored weights, for evaluation and the perceptual loss.

LPIPS is an ImageNet backbone (AlexNet or VGG16 from torchvision) plus small linear heads. The heads
ship inside torchmetrics; the backbone weights are torchvision's, normally downloaded into the torch
hub cache on first use. Here the backbone is read from a file the user names, or from the place
torchvision caches it (downloaded there first only when the caller asks, e.g. for the training loss),
through the project's one weights loader (:func:`~vq3d_nerfstudio.files.load_weights`: nothing in
the file is run), and a missing or wrong file is one clear error that says where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from vq3d_nerfstudio.files import WeightsUnavailable, load_weights

# LPIPS net name -> (torchvision constructor, torchvision weights enum)
_BACKBONES = {"alex": ("alexnet", "AlexNet_Weights"), "vgg": ("vgg16", "VGG16_Weights")}


class LPIPSUnavailable(WeightsUnavailable):
    """The backbone weights LPIPS needs are not on this machine (or the file does not hold them)."""


def default_weights_path(net: str = "alex") -> Path:
    """Where torchvision caches the ImageNet backbone for ``net`` (``$TORCH_HOME/hub/checkpoints``)."""
    import torchvision

    weights = getattr(torchvision.models, _BACKBONES[net][1]).DEFAULT
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def weights_url(net: str = "alex") -> str:
    import torchvision

    return getattr(torchvision.models, _BACKBONES[net][1]).DEFAULT.url


class LPIPS(nn.Module):
    """``lpips(a, b)`` for ``[B, 3, H, W]`` images in [0, 1] -> ``[B]`` distances (0 for identical
    images). Parameters are frozen; gradients flow to the inputs, so it serves as a loss."""

    def __init__(self, net: str = "alex", weights: Optional[Path] = None, download: bool = False) -> None:
        super().__init__()
        if net not in _BACKBONES:
            raise ValueError(f"LPIPS net must be one of {sorted(_BACKBONES)}, not {net!r}")
        path = Path(weights) if weights is not None else default_weights_path(net)
        state = load_weights(
            path, f"LPIPS needs the ImageNet {_BACKBONES[net][0]} weights", weights_url(net),
            download=weights is None and download, error=LPIPSUnavailable,
        )
        import torchvision
        from torchmetrics.functional.image.lpips import _LPIPS

        backbone = getattr(torchvision.models, _BACKBONES[net][0])(weights=None)
        try:
            backbone.load_state_dict(state)
        except RuntimeError as err:
            raise LPIPSUnavailable(f"{path}: does not hold {_BACKBONES[net][0]} weights ({err})") from err
        # Random backbone, then ImageNet features copied in: the heads load from torchmetrics' own file.
        self.lpips = _LPIPS(pretrained=True, net=net, pnet_rand=True, pnet_tune=False)
        features = backbone.features
        for slice_module in (m for name, m in self.lpips.net.named_children() if name.startswith("slice")):
            for index, layer in slice_module.named_children():
                layer.load_state_dict(features[int(index)].state_dict())
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # frozen network: no dropout, ever

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lpips(a, b, normalize=True).reshape(-1)


def load_lpips_if_available(net: str = "alex", weights: Optional[Path] = None) -> "tuple[Optional[LPIPS], str]":
    """``(metric, "")`` when the weights are here, else ``(None, reason)`` for an optional metric."""
    try:
        return LPIPS(net, weights), ""
    except LPIPSUnavailable as err:
        return None, str(err)

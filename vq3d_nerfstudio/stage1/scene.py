"""The scene a model shows for rays without ``batch_idx`` (the viewer, ``ns-render``, ``ns-export``).

Training rays name their input image; these rays do not, so the model keeps one shown scene: an input
image, a code grid (a stage-2 sample) or given tri-planes (an interpolation, an edit), optionally
with an object placed in it. The tri-planes of an image or a code grid are derived on first use and
cached in ``planes`` until the weights change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from vq3d_nerfstudio.stage1.baked import BakedField
from vq3d_nerfstudio.stage1.edits import Placement


@dataclass
class ShownScene:
    """At most one of ``image`` / ``indices`` is set; ``planes`` alone means given tri-planes."""

    image: Optional[torch.Tensor] = None
    """``[1, 3, S, S]`` input image in [0, 1]."""
    indices: Optional[torch.Tensor] = None
    """``[1, h, w]`` code indices."""
    planes: Optional[torch.Tensor] = None
    """``[1, 3, C, R, R]`` tri-planes: given, or derived from ``image`` / ``indices`` and cached."""
    composition: Optional[Placement] = None
    """An object placed in the scene."""
    key: Optional[Tuple[str, object]] = None
    """What the scene is, e.g. ``("train", 3)``, ``("upload", 0)``, ``("sample", 2)``; None: unnamed."""
    encode_seconds: Optional[float] = None
    """How long deriving ``planes`` took (encode and decode, or decode alone), once derived."""
    baked: Optional[BakedField] = None
    """The scene's field baked for inference (``Vq3dModelConfig.inference_field``), with the
    ``planes`` it was baked from: current only while those are still ``planes``."""
    baked_object: Optional[BakedField] = None
    """The placed object's field baked the same way (from ``composition.planes``)."""

    @property
    def is_empty(self) -> bool:
        return self.image is None and self.indices is None and self.planes is None

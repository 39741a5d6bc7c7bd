"""Frames and videos of a model's current scene: render a list of cameras, colour disparity, write MP4s."""

from __future__ import annotations

from typing import List, Tuple

import torch
from nerfstudio.cameras.cameras import Cameras


def render_frames(model, cameras: Cameras, on_frame=None) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Render every camera of the model's current scene: ``(rgb [H, W, 3] in [0, 1], disparity
    [H, W, 1])`` per camera, on the CPU. ``on_frame()`` is called after each (progress bars)."""
    rgb, disparity = [], []
    for i in range(cameras.shape[0]):
        out = model.get_outputs_for_camera(cameras[i : i + 1])
        rgb.append(out["rgb"].clamp(0, 1).cpu())
        disparity.append(out["disparity"].cpu())
        if on_frame is not None:
            on_frame()
    return rgb, disparity


def colorize_disparity(disparity: List[torch.Tensor]) -> List[torch.Tensor]:
    """Turbo-coloured disparity frames, normalised by the largest value over all frames (so the
    colours mean the same depth in every frame)."""
    from nerfstudio.utils import colormaps

    top = float(torch.stack(disparity).max().clamp_min(1e-6))
    return [colormaps.apply_colormap(d / top) for d in disparity]


def to_uint8(image: torch.Tensor):
    """``[H, W, C]`` in [0, 1] -> uint8 numpy."""
    return (image.numpy() * 255 + 0.5).clip(0, 255).astype("uint8")


def write_video(path, frames: List[torch.Tensor], fps: int) -> None:
    """MP4 (H.264 via imageio-ffmpeg's bundled ffmpeg) of ``[H, W, 3]`` frames in [0, 1]."""
    import imageio.v2 as imageio

    imageio.mimwrite(str(path), [to_uint8(f) for f in frames], fps=fps, macro_block_size=1)

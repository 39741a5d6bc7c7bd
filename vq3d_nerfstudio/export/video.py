"""Frames and videos of a model's current scene: render a list of cameras, colour disparity, write MP4s."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import List, Tuple

import torch
from nerfstudio.cameras.cameras import Cameras

from vq3d_nerfstudio.files import atomic_path, write_atomic


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


def write_image(path, image) -> None:
    """An image file (format from ``path``'s extension: PNG, JPEG, ...) of an ``[H, W, C]`` uint8
    array, written atomically (:func:`~vq3d_nerfstudio.files.atomic_path`): a full disk raises
    :class:`~vq3d_nerfstudio.files.DiskFullError` and leaves no partial file."""
    import imageio.v3 as iio

    path = Path(path)
    write_atomic(path, iio.imwrite("<bytes>", image, extension=path.suffix))


def write_video(path, frames: List[torch.Tensor], fps: int) -> None:
    """MP4 (H.264, yuv420p, CRF 25: imageio's defaults) of ``[H, W, 3]`` frames in [0, 1], through
    imageio-ffmpeg's bundled ffmpeg, written atomically. ffmpeg is run here rather than through
    ``imageio.mimwrite``, which ignores ffmpeg's exit status: a failed encode (a full disk) raises
    (:class:`~vq3d_nerfstudio.files.DiskFullError` for a full disk) and leaves no partial or empty file."""
    import imageio_ffmpeg

    path = Path(path)
    data = [to_uint8(f) for f in frames]
    height, width = data[0].shape[:2]
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
        "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p",
        "-crf", "25", "-f", "mp4",
    ]
    with atomic_path(path) as tmp:
        encoder = subprocess.Popen(command + [str(tmp)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for frame in data:
                encoder.stdin.write(frame.tobytes())
        except BrokenPipeError:  # ffmpeg stopped early: its exit status and log say why
            pass
        log = encoder.communicate()[1].decode("utf-8", "replace").strip()
        if encoder.returncode != 0 or tmp.stat().st_size == 0:
            reason = log.splitlines()[-1] if log else f"exit status {encoder.returncode}, empty file"
            if "No space left on device" in log:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            raise OSError(errno.EIO, f"ffmpeg could not write the video ({reason})", str(path))

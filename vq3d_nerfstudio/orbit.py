"""Orbit cameras around the pivot (the canonical camera's look-at point) as nerfstudio Cameras."""

from __future__ import annotations

import math
from typing import List, Tuple

import torch
from nerfstudio.cameras.cameras import Cameras

from vq3d_nerfstudio.data import synth
from vq3d_nerfstudio.data.dataparser import square_pinhole_cameras


def orbit_camera_to_world(yaw_deg: float, elevation_deg: float, distance: float) -> torch.Tensor:
    """``[3, 4]`` OpenGL camera-to-world looking at the pivot (origin), world +y up; yaw 0,
    elevation 0 is the canonical camera at ``(0, 0, distance)``; positive yaw moves the camera
    towards +x, positive elevation above the pivot. The same cameras ``vq3d synth`` renders."""
    return torch.from_numpy(synth.orbit_camera_to_world(yaw_deg, elevation_deg, distance)[:3]).float()


def orbit_path(num_frames: int, max_yaw_deg: float, max_elevation_deg: float) -> List[Tuple[float, float]]:
    """A closed loop of (yaw, elevation): yaw swings ``+-max_yaw`` while elevation bobs ``+-max_el``."""
    return [
        (max_yaw_deg * math.sin(2 * math.pi * i / num_frames), max_elevation_deg * math.sin(4 * math.pi * i / num_frames))
        for i in range(num_frames)
    ]


def orbit_cameras(poses: List[Tuple[float, float]], image_size: int, distance: float, fov_deg: float) -> Cameras:
    """Square pinhole cameras (``fov_deg`` horizontal FOV) at the given (yaw, elevation) poses."""
    c2w = torch.stack([orbit_camera_to_world(yaw, el, distance) for yaw, el in poses])
    return square_pinhole_cameras(c2w, image_size, fov_deg)


def dolly_path(num_frames: int, start: float, end: float) -> List[Tuple[float, float, float]]:
    """(yaw, elevation, distance) poses moving straight in from ``start`` to ``end`` along the
    canonical axis and back out (a smooth cosine in-and-out)."""
    return [
        (0.0, 0.0, end + (start - end) * (0.5 + 0.5 * math.cos(2 * math.pi * i / num_frames)))
        for i in range(num_frames)
    ]


def camera_path_dict(
    poses: List[Tuple[float, ...]], image_size: int, distance: float, fov_deg: float, seconds: float
) -> dict:
    """A camera path in the JSON layout nerfstudio's viewer writes and ``ns-render camera-path``
    reads (square images, so the vertical FOV it stores equals the horizontal one). Poses are
    (yaw, elevation) at ``distance``, or (yaw, elevation, distance)."""
    frames = []
    for pose in poses:
        yaw, el = pose[:2]
        c2w = torch.eye(4)
        c2w[:3] = orbit_camera_to_world(yaw, el, pose[2] if len(pose) > 2 else distance)
        frames.append({"camera_to_world": [round(v, 7) for v in c2w.reshape(-1).tolist()], "fov": fov_deg, "aspect": 1.0})
    return {
        "camera_type": "perspective",
        "render_height": image_size,
        "render_width": image_size,
        "seconds": seconds,
        "camera_path": frames,
    }


if __name__ == "__main__":
    # Regenerates the camera paths shipped in configs/camera_paths/.
    import json
    from pathlib import Path

    out = Path(__file__).resolve().parents[1] / "configs" / "camera_paths"
    out.mkdir(parents=True, exist_ok=True)
    path = camera_path_dict(orbit_path(48, 20.0, 8.0), 64, 2.0, 50.0, seconds=2.0)
    (out / "orbit.json").write_text(json.dumps(path, indent=1) + "\n")
    dolly = camera_path_dict(dolly_path(48, 2.0, 1.4), 64, 2.0, 50.0, seconds=2.0)
    (out / "dolly_in.json").write_text(json.dumps(dolly, indent=1) + "\n")
    print(f"wrote {out / 'orbit.json'} and {out / 'dolly_in.json'}")


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

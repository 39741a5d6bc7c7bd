"""Camera poses as torch tensors and nerfstudio ``Cameras``: the canonical camera, square pinholes,
orbits, camera-path files and random novel views."""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.model_components.ray_generators import RayGenerator

from vq3d_nerfstudio.geometry.poses import CanonicalCamera, dolly_path, focal_length, orbit_matrix, orbit_path


def ray_generator(cameras: Cameras) -> RayGenerator:
    """nerfstudio's ``RayGenerator`` for ``cameras``, on the cameras' device. It keeps a table of pixel
    coordinates that it makes on the CPU; until the module is moved, pixel indices on a GPU fail."""
    return RayGenerator(cameras).to(cameras.device)


def canonical_camera_to_world(distance: float) -> torch.Tensor:
    """``[3, 4]`` camera-to-world of the canonical camera: identity rotation, at ``(0, 0, distance)``."""
    c2w = torch.eye(4)[:3]
    c2w[2, 3] = distance
    return c2w


def pinhole_cameras(
    camera_to_worlds: torch.Tensor, fx: float, fy: float, cx: float, cy: float, width: int, height: int
) -> Cameras:
    """Pinhole cameras sharing one set of intrinsics (pixels) at ``[N, 3, 4]`` OpenGL poses."""
    num = camera_to_worlds.shape[0]
    return Cameras(
        camera_to_worlds=camera_to_worlds,
        fx=torch.full((num, 1), float(fx)),
        fy=torch.full((num, 1), float(fy)),
        cx=torch.full((num, 1), float(cx)),
        cy=torch.full((num, 1), float(cy)),
        width=torch.full((num, 1), int(width), dtype=torch.long),
        height=torch.full((num, 1), int(height), dtype=torch.long),
        camera_type=CameraType.PERSPECTIVE,
    )


def square_pinhole_cameras(camera_to_worlds: torch.Tensor, image_size: int, fov_deg: float) -> Cameras:
    """Square pinhole cameras with ``fov_deg`` horizontal field of view at ``[N, 3, 4]`` poses."""
    focal = focal_length(image_size, fov_deg)
    return pinhole_cameras(camera_to_worlds, focal, focal, image_size / 2, image_size / 2, image_size, image_size)


def canonical_cameras(num: int, image_size: int, distance: float, fov_deg: float) -> Cameras:
    """``num`` identical canonical cameras (the pose is broadcast, not copied)."""
    return square_pinhole_cameras(canonical_camera_to_world(distance)[None].expand(num, 3, 4), image_size, fov_deg)


def orbit_camera_to_world(yaw_deg: float, elevation_deg: float, distance: float) -> torch.Tensor:
    """``[3, 4]`` OpenGL camera-to-world looking at the pivot (origin), world +y up; yaw 0,
    elevation 0 is the canonical camera at ``(0, 0, distance)``; positive yaw moves the camera
    towards +x, positive elevation above the pivot. The same cameras ``vq3d synth`` renders."""
    return torch.from_numpy(orbit_matrix(yaw_deg, elevation_deg, distance)[:3]).float()


def orbit_cameras(poses: List[Tuple[float, float]], image_size: int, distance: float, fov_deg: float) -> Cameras:
    """Square pinhole cameras (``fov_deg`` horizontal FOV) at the given (yaw, elevation) poses."""
    c2w = torch.stack([orbit_camera_to_world(yaw, el, distance) for yaw, el in poses])
    return square_pinhole_cameras(c2w, image_size, fov_deg)


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


def sample_novel_poses(
    num: int,
    distance: float,
    max_yaw_deg: float,
    max_elevation_deg: float,
    radius_jitter: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``[num, 3, 4]`` OpenGL camera-to-worlds orbiting the pivot (origin), looking at it.

    Yaw and elevation are uniform in ``[-max, max]`` degrees; the distance is uniform in
    ``distance * [1 - radius_jitter, 1 + radius_jitter]``. Yaw 0, elevation 0 at ``distance`` is
    the canonical camera.
    """
    u = torch.rand(num, 3, generator=generator, dtype=torch.float64) * 2 - 1
    poses = [
        orbit_matrix(float(max_yaw_deg * a), float(max_elevation_deg * b), float(distance * (1 + radius_jitter * c)))
        for a, b, c in u.tolist()
    ]
    return torch.from_numpy(np.stack(poses)[:, :3]).float()


def orbit_rays(
    num_rays: int,
    image_size: int,
    distance: float,
    fov_deg: float,
    max_yaw_deg: float,
    max_elevation_deg: float,
    device: Union[str, torch.device] = "cpu",
    num_cameras: int = 64,
):
    """``num_rays`` rays at random pixels of ``num_cameras`` random cameras orbiting the pivot at
    ``distance`` (yaw and elevation uniform within the given ranges; :func:`sample_novel_poses`),
    no ``batch_idx``: what ns-export and point clouds sample the shown scene with."""
    poses = sample_novel_poses(num_cameras, distance, max_yaw_deg, max_elevation_deg)
    cameras = square_pinhole_cameras(poses, image_size, fov_deg).to(device)
    index = torch.stack(
        [
            torch.randint(0, num_cameras, (num_rays,)),
            torch.randint(0, image_size, (num_rays,)),
            torch.randint(0, image_size, (num_rays,)),
        ],
        dim=-1,
    ).to(device)
    return ray_generator(cameras)(index)


if __name__ == "__main__":
    # Regenerates the camera paths shipped in configs/camera_paths/.
    import json
    from pathlib import Path

    out = Path(__file__).resolve().parents[2] / "configs" / "camera_paths"
    out.mkdir(parents=True, exist_ok=True)
    camera = CanonicalCamera()
    path = camera_path_dict(orbit_path(48, 20.0, 8.0), 64, camera.distance, camera.fov_deg, seconds=2.0)
    (out / "orbit.json").write_text(json.dumps(path, indent=1) + "\n")
    dolly = camera_path_dict(dolly_path(48, camera.distance, 1.4), 64, camera.distance, camera.fov_deg, seconds=2.0)
    (out / "dolly_in.json").write_text(json.dumps(dolly, indent=1) + "\n")
    print(f"wrote {out / 'orbit.json'} and {out / 'dolly_in.json'}")

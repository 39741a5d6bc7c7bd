"""Camera poses in plain numpy (no torch, no nerfstudio): the canonical camera, and poses around it;
see the package docstring for the convention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tyro
from typing_extensions import Annotated

from vq3d_nerfstudio.checks import PositiveFloat, ranged


def focal_length(resolution: int, fov_deg: float) -> float:
    """Focal length in pixels of a ``resolution``-wide pinhole with horizontal FOV ``fov_deg``."""
    return (resolution / 2.0) / math.tan(math.radians(fov_deg) / 2.0)


@dataclass(frozen=True)
class CanonicalCamera:
    """The camera every input image is seen by: at ``(0, 0, distance)`` with identity rotation
    (OpenGL: looking down -z at the pivot, the origin), a square pinhole with ``fov_deg`` horizontal
    (= vertical) field of view; novel views orbit the pivot at ``distance``.

    One object: the dataparser config and the model config each hold one (they must be equal; the
    pipeline checks), a model package keeps it in ``config.json``, and everything derived from it
    (focal length, intrinsics, pose) is computed here. ``vq3d synth`` renders the default one.
    The old flags ``--camera-distance`` / ``--fov-deg`` still set it."""

    distance: Annotated[PositiveFloat, tyro.conf.arg(aliases=("--camera-distance",))] = 2.0
    """Distance of the canonical camera from the pivot (world units). Change only together with the data."""
    fov_deg: Annotated[ranged(float, 0, 180, low_open=True, high_open=True), tyro.conf.arg(aliases=("--fov-deg",))] = 50.0
    """Horizontal (= vertical: square images) field of view of the canonical camera, degrees."""

    @property
    def tan_half_fov(self) -> float:
        """``tan(fov / 2)``: half the image's width at depth 1 (world units)."""
        return math.tan(math.radians(self.fov_deg) / 2.0)

    @property
    def position(self) -> Tuple[float, float, float]:
        """Where the camera sits, world units; it looks at the pivot, the origin."""
        return (0.0, 0.0, float(self.distance))

    def focal_length(self, size: int) -> float:
        """Focal length in pixels of a ``size`` x ``size`` image: ``(size / 2) / tan(fov / 2)``."""
        return focal_length(size, self.fov_deg)

    def intrinsics(self, size: int) -> dict:
        """nerfstudio-style intrinsics (``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h``; pixels) of a
        ``size`` x ``size`` image, principal point at the centre."""
        f = self.focal_length(size)
        return {"fl_x": f, "fl_y": f, "cx": size / 2.0, "cy": size / 2.0, "w": int(size), "h": int(size)}

    def camera_to_world(self) -> np.ndarray:
        """``[4, 4]`` float64 OpenGL camera-to-world: identity rotation, translation :attr:`position`."""
        c2w = np.eye(4, dtype=np.float64)
        c2w[:3, 3] = self.position
        return c2w

    def describe(self) -> str:
        """``distance 2, field of view 50 degrees``: for messages and model cards."""
        return f"distance {self.distance:g}, field of view {self.fov_deg:g} degrees"


def look_at(
    position: Sequence[float],
    target: Sequence[float] = (0.0, 0.0, 0.0),
    up: Sequence[float] = (0.0, 1.0, 0.0),
) -> np.ndarray:
    """OpenGL camera-to-world 4x4 (float64) for a camera at ``position`` looking at ``target``."""
    pos = np.asarray(position, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - pos
    norm = np.linalg.norm(forward)
    if norm < 1e-12:
        raise ValueError("camera position coincides with the look-at target")
    forward = forward / norm
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    rnorm = np.linalg.norm(right)
    if rnorm < 1e-9:
        raise ValueError("camera viewing direction is parallel to the up vector")
    right = right / rnorm
    cam_up = np.cross(right, forward)
    c2w = np.eye(4, dtype=np.float64)
    c2w[:3, 0] = right
    c2w[:3, 1] = cam_up
    c2w[:3, 2] = -forward
    c2w[:3, 3] = pos
    return c2w


def orbit_matrix(
    yaw_deg: float, elevation_deg: float, distance: float = CanonicalCamera.distance
) -> np.ndarray:
    """OpenGL camera-to-world 4x4 (float64) of an orbit camera looking at the origin.

    The camera sits at ``distance * (cos(el) sin(yaw), sin(el), cos(el) cos(yaw))``
    with world +y as "up"; yaw 0, elevation 0 gives the canonical camera at
    ``(0, 0, distance)`` with identity rotation.
    """
    yaw = math.radians(yaw_deg)
    el = math.radians(elevation_deg)
    pos = distance * np.array(
        [math.cos(el) * math.sin(yaw), math.sin(el), math.cos(el) * math.cos(yaw)]
    )
    if yaw_deg == 0.0 and elevation_deg == 0.0:
        return CanonicalCamera(distance).camera_to_world()  # exact: no rounding noise in the rotation
    return look_at(pos)


def orbit_path(num_frames: int, max_yaw_deg: float, max_elevation_deg: float) -> List[Tuple[float, float]]:
    """A closed loop of (yaw, elevation): yaw swings ``+-max_yaw`` while elevation bobs ``+-max_el``."""
    return [
        (max_yaw_deg * math.sin(2 * math.pi * i / num_frames), max_elevation_deg * math.sin(4 * math.pi * i / num_frames))
        for i in range(num_frames)
    ]


def dolly_path(num_frames: int, start: float, end: float) -> List[Tuple[float, float, float]]:
    """(yaw, elevation, distance) poses moving straight in from ``start`` to ``end`` along the
    canonical axis and back out (a smooth cosine in-and-out)."""
    return [
        (0.0, 0.0, end + (start - end) * (0.5 + 0.5 * math.cos(2 * math.pi * i / num_frames)))
        for i in range(num_frames)
    ]


POSE_TOLERANCE = 1e-3
"""How far a camera-to-world rotation may be from orthonormal (largest entry of ``R^T R - I``):
JSON files written in single precision are off by ~1e-7; a scaled or sheared matrix by far more."""


def pose_problem(pose: np.ndarray) -> Optional[str]:
    """Why ``pose`` is not a rigid camera-to-world matrix (a ``[4, 4]`` of finite numbers, rotation
    orthonormal within :data:`POSE_TOLERANCE` with determinant +1, bottom row ``0 0 0 1``), or ``None``."""
    if pose.shape != (4, 4):
        return "is not a 4x4 matrix of numbers"
    if not np.isfinite(pose).all():
        return "holds NaN or inf"
    if np.abs(pose[3] - np.array([0.0, 0.0, 0.0, 1.0])).max() > POSE_TOLERANCE:
        return f"has bottom row {pose[3].tolist()}, not [0, 0, 0, 1]"
    rotation = pose[:3, :3]
    error = float(np.abs(rotation.T @ rotation - np.eye(3)).max())
    if error > POSE_TOLERANCE:
        return f"has a rotation that is not orthonormal (|R^T R - I| up to {error:.3g})"
    if np.linalg.det(rotation) < 0:
        return "has a mirrored rotation (determinant -1)"
    return None


def canonical_alignment(
    c2w0: np.ndarray, distance: float, pivot: Optional[np.ndarray] = None, median_depth: Optional[float] = None
) -> Tuple[np.ndarray, float]:
    """World -> canonical map ``x -> s * (inv(c2w0) x) + (0, 0, distance)``.

    Returns:
        ``(world_to_canonical_rigid [4, 4], scale s)``; the rigid part is ``inv(c2w0)`` followed by
        the translation applied after scaling (see :func:`align_pose`).
    """
    reference = np.linalg.norm(c2w0[:3, 3] - pivot) if pivot is not None else median_depth
    if reference is None or not reference > 0:
        raise ValueError("need a pivot or a positive median depth of frame 0 to set the scale")
    return np.linalg.inv(c2w0), distance / float(reference)


def align_pose(c2w: np.ndarray, world_to_cam0: np.ndarray, scale: float, distance: float) -> np.ndarray:
    """A camera-to-world pose expressed in the canonical frame (rotation kept, position mapped)."""
    out = world_to_cam0 @ c2w
    out[:3, 3] = out[:3, 3] * scale + np.array([0.0, 0.0, distance])
    return out


def view_offset_deg(c2w0: np.ndarray, c2w: np.ndarray) -> float:
    """Angle between two cameras' optical axes, degrees."""
    a, b = -c2w0[:3, 2], -c2w[:3, 2]
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))

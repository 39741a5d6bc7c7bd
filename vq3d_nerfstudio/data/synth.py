"""Procedural synthetic scenes with exact depth, written in nerfstudio format.

Pure numpy (plus Pillow for PNG encoding); deliberately does not import torch or
nerfstudio so that it imports fast and can run in lightweight worker processes.

Conventions
-----------
* World: y is up. The ground is the plane ``y = GROUND_Y = -0.5``.
* Cameras follow the nerfstudio / OpenGL convention: camera x right, y up, looking
  down -z. ``transform_matrix`` / ``c2w`` is the 4x4 camera-to-world matrix.
* Canonical camera: the default :class:`~vq3d_nerfstudio.geometry.poses.CanonicalCamera`
  (:data:`CAMERA`), at ``(0, 0, distance)`` looking at the origin (the
  pivot), pinhole, ``fov_deg`` horizontal field of view, square R x R
  images with ``fl_x = fl_y = (R / 2) / tan(fov / 2)`` and ``cx = cy = R / 2``.
  Pixel (row i, column j) has its centre ray along, in camera coordinates,
  ``((j + 0.5 - cx) / fl_x, -(i + 0.5 - cy) / fl_y, -1)``.
* Depth maps are float32 *z-depth* (distance along the viewing axis, i.e. ``-z`` in
  camera coordinates, not ray length) in world units, ``inf`` where the ray hits
  nothing (sky).
* Foreground masks (``mask_path``, nerfstudio's convention: one-channel PNG, nonzero
  pixels count) are 255 on the objects and 0 on the ground and the sky. nerfstudio's own
  methods read ``mask_path`` as the pixels to train on; ``vq3d eval`` reads it as the
  foreground to score apart.

Scene family (see :func:`sample_scene`)
---------------------------------------
Checkerboard ground, two-colour vertical sky gradient, 1-4 objects (spheres,
y-rotated boxes, vertical capped cylinders) resting on the ground, each solid or
with horizontal stripes, Lambertian shading ``albedo * (AMBIENT + DIFFUSE *
max(0, n . l))`` from one directional light above, no shadows; the sky is unshaded.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, List, Optional, Tuple, Union

import numpy as np

from vq3d_nerfstudio.files import disk_full_as_error, write_atomic
from vq3d_nerfstudio.geometry.poses import CanonicalCamera, orbit_matrix

__all__ = [
    "AMBIENT",
    "DIFFUSE",
    "GROUND_Y",
    "SYNTH_VERSION",
    "VIEW_OFFSETS_DEG",
    "Box",
    "Cylinder",
    "Material",
    "Sphere",
    "SynthScene",
    "camera_directions",
    "render_view",
    "render_view_with_foreground",
    "sample_scene",
    "scene_dir_name",
    "scene_rng",
    "write_scene",
    "write_scenes",
]

# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------

SYNTH_VERSION = 2
"""Bumped whenever the generated content for a given (seed, index) changes (2: foreground masks)."""

GROUND_Y = -0.5
AMBIENT = 0.35
DIFFUSE = 0.65

CAMERA = CanonicalCamera()
"""The canonical camera the scenes are rendered from (view 0) and orbit around: the default one,
which the dataparser and the model hold by default."""

VIEW_OFFSETS_DEG: Tuple[Tuple[float, float], ...] = (
    (0.0, 0.0),
    (-20.0, 0.0),
    (-10.0, 0.0),
    (10.0, 0.0),
    (20.0, 0.0),
    (0.0, 10.0),
    (0.0, -10.0),
)
"""The (yaw, elevation) pairs in degrees of the views, in order; view 0 is canonical."""

_EPS = 1e-9

Vec3 = Tuple[float, float, float]
Color = Tuple[float, float, float]


# --------------------------------------------------------------------------------------
# Cameras
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _camera_directions_cached(resolution: int) -> np.ndarray:
    f = CAMERA.focal_length(resolution)
    c = resolution / 2.0
    coords = np.arange(resolution, dtype=np.float64) + 0.5 - c
    jj, ii = np.meshgrid(coords, coords, indexing="xy")  # jj varies along columns
    dirs = np.stack([jj / f, -ii / f, -np.ones_like(jj)], axis=-1).reshape(-1, 3)
    dirs.setflags(write=False)
    return dirs


def camera_directions(resolution: int) -> np.ndarray:
    """(R*R, 3) per-pixel ray directions in camera coordinates, row-major, z = -1."""
    return _camera_directions_cached(int(resolution))


# --------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------


def _rot_y(angle_deg: float) -> np.ndarray:
    """Rotation about +y (local -> world): maps local +x to (cos, 0, -sin)."""
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


@dataclass
class Material:
    """Solid colour, or horizontal stripes when ``stripe_color`` is set.

    Stripes alternate with world y: band ``floor((y - GROUND_Y) / (stripe_period / 2))``
    is ``color`` when even and ``stripe_color`` when odd (``stripe_period`` is one full
    two-band cycle).
    """

    color: Color
    stripe_color: Optional[Color] = None
    stripe_period: float = 0.2

    def albedo(self, points: np.ndarray) -> np.ndarray:
        base = np.asarray(self.color, dtype=np.float64)
        if self.stripe_color is None:
            return np.broadcast_to(base, points.shape).copy()
        band = np.floor((points[:, 1] - GROUND_Y) / (0.5 * self.stripe_period)).astype(np.int64)
        odd = (band % 2) == 1
        other = np.asarray(self.stripe_color, dtype=np.float64)
        return np.where(odd[:, None], other[None, :], base[None, :])


@dataclass
class Sphere:
    center: Vec3
    radius: float
    material: Material
    kind: ClassVar[str] = "sphere"

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Ray parameter of the first hit (``inf`` for a miss) for rays ``origin + t * dirs``."""
        oc = origin - np.asarray(self.center, dtype=np.float64)
        a = np.einsum("ij,ij->i", dirs, dirs)
        half_b = dirs @ oc
        c = float(oc @ oc) - self.radius**2
        disc = half_b * half_b - a * c
        hit = disc >= 0.0
        sq = np.sqrt(np.where(hit, disc, 0.0))
        t0 = (-half_b - sq) / a
        t1 = (-half_b + sq) / a
        t = np.where(t0 > _EPS, t0, t1)
        return np.where(hit & (t > _EPS), t, np.inf)

    def normals(self, points: np.ndarray) -> np.ndarray:
        n = points - np.asarray(self.center, dtype=np.float64)
        return n / np.linalg.norm(n, axis=1, keepdims=True)


@dataclass
class Box:
    """Box with half extents (local x, y, z), rotated about +y by ``yaw_deg`` (see ``_rot_y``)."""

    center: Vec3
    half_extents: Vec3
    yaw_deg: float
    material: Material
    kind: ClassVar[str] = "box"

    def _to_local(self, vectors: np.ndarray) -> np.ndarray:
        return vectors @ _rot_y(self.yaw_deg)  # row-vector form of R^T v

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        h = np.asarray(self.half_extents, dtype=np.float64)
        o = self._to_local((origin - np.asarray(self.center, dtype=np.float64))[None, :])[0]
        d = self._to_local(dirs)
        d = np.where(np.abs(d) < 1e-15, 1e-15, d)
        inv = 1.0 / d
        ta = (-h - o) * inv
        tb = (h - o) * inv
        t_near = np.minimum(ta, tb).max(axis=1)
        t_far = np.maximum(ta, tb).min(axis=1)
        hit = (t_far >= t_near) & (t_far > _EPS)
        t = np.where(t_near > _EPS, t_near, t_far)
        return np.where(hit, t, np.inf)

    def normals(self, points: np.ndarray) -> np.ndarray:
        h = np.asarray(self.half_extents, dtype=np.float64)
        p = self._to_local(points - np.asarray(self.center, dtype=np.float64))
        axis = np.argmax(np.abs(p) / h, axis=1)
        n = np.zeros_like(p)
        rows = np.arange(len(p))
        n[rows, axis] = np.sign(p[rows, axis])
        return n @ _rot_y(self.yaw_deg).T


@dataclass
class Cylinder:
    """Vertical capped cylinder; ``center`` is the centre of its volume."""

    center: Vec3
    radius: float
    height: float
    material: Material
    kind: ClassVar[str] = "cylinder"

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        cx, cy, cz = (float(v) for v in self.center)
        y_lo, y_hi = cy - 0.5 * self.height, cy + 0.5 * self.height
        r2 = self.radius**2
        ox, oy, oz = origin[0] - cx, origin[1], origin[2] - cz
        dx, dy, dz = dirs[:, 0], dirs[:, 1], dirs[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            # Side wall (entering hit only; a camera outside the solid never sees the inside).
            a = dx * dx + dz * dz
            half_b = ox * dx + oz * dz
            c = ox * ox + oz * oz - r2
            disc = half_b * half_b - a * c
            ok = (disc >= 0.0) & (a > 1e-15)
            t_side = (-half_b - np.sqrt(np.where(ok, disc, 0.0))) / np.where(ok, a, 1.0)
            y_side = oy + t_side * dy
            side_ok = ok & (t_side > _EPS) & (y_side >= y_lo) & (y_side <= y_hi)
            t = np.where(side_ok, t_side, np.inf)
            # Caps.
            safe_dy = np.where(np.abs(dy) > 1e-15, dy, 1e-15)
            for y_cap in (y_hi, y_lo):
                tc = (y_cap - oy) / safe_dy
                px = ox + tc * dx
                pz = oz + tc * dz
                cap_ok = (tc > _EPS) & (px * px + pz * pz <= r2)
                t = np.where(cap_ok & (tc < t), tc, t)
        return t

    def normals(self, points: np.ndarray) -> np.ndarray:
        cx, cy, cz = (float(v) for v in self.center)
        y_lo, y_hi = cy - 0.5 * self.height, cy + 0.5 * self.height
        tol = 1e-7
        n = np.zeros_like(points)
        n[:, 0] = points[:, 0] - cx
        n[:, 2] = points[:, 2] - cz
        norm = np.linalg.norm(n, axis=1, keepdims=True)
        n = n / np.maximum(norm, 1e-12)
        top = np.abs(points[:, 1] - y_hi) < tol
        bottom = np.abs(points[:, 1] - y_lo) < tol
        n[top] = (0.0, 1.0, 0.0)
        n[bottom] = (0.0, -1.0, 0.0)
        return n


Primitive = Union[Sphere, Box, Cylinder]


@dataclass
class SynthScene:
    """Random parameters of one scene. All colours are RGB in [0, 1].

    * ground: checkerboard on ``y = GROUND_Y`` with squares of side ``checker_size``,
      rotated about +y by ``checker_angle_deg``: with local coordinates
      ``(u, v) = ((R_y^T p).x, (R_y^T p).z)`` the square ``floor(u/s) + floor(v/s)``
      even is ``ground_colors[0]``, odd is ``ground_colors[1]``.
    * sky: ``sky_colors = (bottom, top)`` blended with ``w = clip(0.5 + 0.5 * d_y, 0, 1)``
      where ``d_y`` is the y component of the *unit* ray direction:
      ``(1 - w) * bottom + w * top``.
    * light: ``light_dir`` points from surfaces towards the light (normalised on use).
    """

    ground_colors: Tuple[Color, Color] = ((0.8, 0.8, 0.8), (0.3, 0.3, 0.3))
    checker_size: float = 0.25
    checker_angle_deg: float = 0.0
    sky_colors: Tuple[Color, Color] = ((0.85, 0.9, 1.0), (0.35, 0.55, 0.9))
    light_dir: Vec3 = (0.0, 1.0, 0.0)
    objects: List[Primitive] = field(default_factory=list)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator used for scene ``index`` of a run with ``seed`` (independent of num_scenes)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _color(rng: np.random.Generator) -> Color:
    return tuple(float(v) for v in rng.uniform(0.05, 0.95, size=3))  # type: ignore[return-value]


def sample_scene(rng: np.random.Generator) -> SynthScene:
    """Draw one random scene (the draw order is part of the format: see SYNTH_VERSION)."""
    ground_colors = (_color(rng), _color(rng))
    checker_size = float(rng.uniform(0.15, 0.5))
    checker_angle = float(rng.uniform(0.0, 180.0))
    sky_colors = (_color(rng), _color(rng))
    light_az = math.radians(float(rng.uniform(0.0, 360.0)))
    light_el = math.radians(float(rng.uniform(30.0, 80.0)))
    light_dir = (
        math.cos(light_el) * math.sin(light_az),
        math.sin(light_el),
        math.cos(light_el) * math.cos(light_az),
    )

    num_objects = int(rng.integers(1, 5))
    centres: List[Tuple[float, float]] = []
    for _ in range(num_objects):
        for _attempt in range(1000):
            x, z = (float(v) for v in rng.uniform(-0.8, 0.8, size=2))
            if all((x - px) ** 2 + (z - pz) ** 2 >= 0.3**2 for px, pz in centres):
                centres.append((x, z))
                break

    objects: List[Primitive] = []
    for x, z in centres:
        kind = int(rng.integers(0, 3))
        if kind == 0:
            radius = float(rng.uniform(0.15, 0.45))
            geom = ("sphere", radius)
        elif kind == 1:
            half = tuple(float(v) for v in rng.uniform(0.12, 0.35, size=3))
            yaw = float(rng.uniform(0.0, 90.0))
            geom = ("box", half, yaw)
        else:
            radius = float(rng.uniform(0.12, 0.3))
            height = float(rng.uniform(0.3, 0.9))
            geom = ("cylinder", radius, height)
        color = _color(rng)
        if rng.random() < 0.5:
            material = Material(color, _color(rng), float(rng.uniform(0.1, 0.3)))
        else:
            material = Material(color)
        if geom[0] == "sphere":
            objects.append(Sphere((x, GROUND_Y + geom[1], z), geom[1], material))
        elif geom[0] == "box":
            half = geom[1]
            objects.append(Box((x, GROUND_Y + half[1], z), half, geom[2], material))
        else:
            objects.append(Cylinder((x, GROUND_Y + 0.5 * geom[2], z), geom[1], geom[2], material))

    return SynthScene(
        ground_colors=ground_colors,
        checker_size=checker_size,
        checker_angle_deg=checker_angle,
        sky_colors=sky_colors,
        light_dir=light_dir,
        objects=objects,
    )


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def _ground_albedo(scene: SynthScene, points: np.ndarray) -> np.ndarray:
    local = points @ _rot_y(scene.checker_angle_deg)
    s = scene.checker_size
    parity = (np.floor(local[:, 0] / s).astype(np.int64) + np.floor(local[:, 2] / s).astype(np.int64)) % 2
    c0 = np.asarray(scene.ground_colors[0], dtype=np.float64)
    c1 = np.asarray(scene.ground_colors[1], dtype=np.float64)
    return np.where(parity[:, None] == 0, c0[None, :], c1[None, :])


def render_view(scene: SynthScene, c2w: np.ndarray, resolution: int) -> Tuple[np.ndarray, np.ndarray]:
    """Ray-trace one view (one ray per pixel centre, canonical intrinsics).

    Returns ``(rgb, depth)``: rgb float32 (R, R, 3) in [0, 1] and z-depth float32 (R, R)
    with ``inf`` for sky pixels.
    """
    rgb, depth, _ = render_view_with_foreground(scene, c2w, resolution)
    return rgb, depth


def render_view_with_foreground(scene: SynthScene, c2w: np.ndarray, resolution: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`render_view` plus a bool (R, R) mask of the pixels whose ray first hits an object
    (not the ground, not the sky)."""
    c2w = np.asarray(c2w, dtype=np.float64)
    rot = c2w[:3, :3]
    origin = c2w[:3, 3].copy()
    # World directions with unit camera-space z component, so the ray parameter t of a
    # hit is exactly its z-depth.
    dirs = camera_directions(resolution) @ rot.T
    n_pix = dirs.shape[0]

    t_best = np.full(n_pix, np.inf)
    hit_id = np.full(n_pix, -1, dtype=np.int64)  # -1 sky, 0 ground, k >= 1 object k-1

    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(dirs[:, 1] < 0.0, (GROUND_Y - origin[1]) / dirs[:, 1], np.inf)
    t_ground = np.where(t_ground > _EPS, t_ground, np.inf)
    closer = t_ground < t_best
    t_best[closer] = t_ground[closer]
    hit_id[closer] = 0
    for k, obj in enumerate(scene.objects):
        t = obj.intersect(origin, dirs)
        closer = t < t_best
        t_best[closer] = t[closer]
        hit_id[closer] = k + 1

    light = np.asarray(scene.light_dir, dtype=np.float64)
    light = light / np.linalg.norm(light)

    rgb = np.empty((n_pix, 3), dtype=np.float64)
    sky = hit_id < 0
    if sky.any():
        d = dirs[sky]
        w = np.clip(0.5 + 0.5 * d[:, 1] / np.linalg.norm(d, axis=1), 0.0, 1.0)[:, None]
        bottom = np.asarray(scene.sky_colors[0], dtype=np.float64)
        top = np.asarray(scene.sky_colors[1], dtype=np.float64)
        rgb[sky] = (1.0 - w) * bottom + w * top
    ground = hit_id == 0
    if ground.any():
        pts = origin + t_best[ground, None] * dirs[ground]
        rgb[ground] = _ground_albedo(scene, pts) * (AMBIENT + DIFFUSE * max(0.0, float(light[1])))
    for k, obj in enumerate(scene.objects):
        sel = hit_id == k + 1
        if not sel.any():
            continue
        pts = origin + t_best[sel, None] * dirs[sel]
        ndotl = np.maximum(obj.normals(pts) @ light, 0.0)
        rgb[sel] = obj.material.albedo(pts) * (AMBIENT + DIFFUSE * ndotl)[:, None]

    rgb = np.clip(rgb, 0.0, 1.0).astype(np.float32).reshape(resolution, resolution, 3)
    depth = t_best.astype(np.float32).reshape(resolution, resolution)
    return rgb, depth, (hit_id >= 1).reshape(resolution, resolution)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def scene_dir_name(index: int) -> str:
    return f"scene_{index:05d}"


#: Scene classes for class-conditional stage 2: the kind of the object nearest the canonical camera.
SCENE_CLASSES = ("box", "cylinder", "sphere")


def scene_class(scene: SynthScene) -> str:
    """``'sphere'``, ``'box'`` or ``'cylinder'``: the kind of the object whose centre is nearest the
    canonical camera (the most visible one)."""
    camera = np.array(CAMERA.position)
    nearest = min(scene.objects, key=lambda obj: float(np.linalg.norm(np.asarray(obj.center) - camera)))
    return {Sphere: "sphere", Box: "box", Cylinder: "cylinder"}[type(nearest)]


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_scene(scene_dir: Union[str, Path], index: int, seed: int, resolution: int, num_views: int) -> Path:
    """Render scene ``index`` of ``seed`` into ``scene_dir`` (written in place, not atomic)."""
    from PIL import Image  # local import: keeps module import light

    scene_dir = Path(scene_dir)
    (scene_dir / "images").mkdir(parents=True, exist_ok=True)
    (scene_dir / "depths").mkdir(parents=True, exist_ok=True)
    (scene_dir / "masks").mkdir(parents=True, exist_ok=True)
    scene = sample_scene(scene_rng(seed, index))
    frames = []
    for k, (yaw, el) in enumerate(VIEW_OFFSETS_DEG[:num_views]):
        c2w = orbit_matrix(yaw, el, CAMERA.distance)
        rgb, depth, foreground = render_view_with_foreground(scene, c2w, resolution)
        image_rel = f"images/frame_{k:05d}.png"
        depth_rel = f"depths/frame_{k:05d}.npy"
        mask_rel = f"masks/frame_{k:05d}.png"
        Image.fromarray(_to_uint8(rgb), mode="RGB").save(scene_dir / image_rel, format="PNG")
        np.save(scene_dir / depth_rel, depth)
        Image.fromarray(foreground.astype(np.uint8) * 255, mode="L").save(scene_dir / mask_rel, format="PNG")
        frames.append(
            {
                "file_path": image_rel,
                "depth_file_path": depth_rel,
                "mask_path": mask_rel,
                "transform_matrix": [[float(v) for v in row] for row in c2w],
                "yaw_deg": float(yaw),
                "elevation_deg": float(el),
            }
        )
    transforms = {
        **CAMERA.intrinsics(resolution),
        "camera_model": "OPENCV",
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "pivot": [0.0, 0.0, 0.0],
        "depth_kind": "z-depth",
        "synth_version": SYNTH_VERSION,
        "seed": int(seed),
        "scene_index": int(index),
        "class_name": scene_class(scene),
        "frames": frames,
    }
    # transforms.json is written last: its presence marks a complete scene.
    with open(scene_dir / "transforms.json", "w", encoding="utf-8") as fh:
        json.dump(transforms, fh, indent=2)
    return scene_dir


def _tmp_prefix(index: int) -> str:
    return f".{scene_dir_name(index)}.tmp-"


def _write_scene_task(args: Tuple[str, int, int, int, int]) -> int:
    out_dir, index, seed, resolution, num_views = args
    out = Path(out_dir)
    final = out / scene_dir_name(index)
    tmp = out / f"{_tmp_prefix(index)}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with disk_full_as_error(final):
            write_scene(tmp, index, seed, resolution, num_views)
    except BaseException:  # a full disk: no half-written scene folder stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # an incomplete folder (no transforms.json) left by someone else
        shutil.rmtree(final)
    os.rename(tmp, final)
    return index


def _validate(num_scenes: int, resolution: int, num_views: int, seed: int) -> None:
    if int(num_scenes) < 1:
        raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
    if int(resolution) < 8:
        raise ValueError(f"resolution must be >= 8, got {resolution}")
    if not 1 <= int(num_views) <= len(VIEW_OFFSETS_DEG):
        raise ValueError(f"num_views must be between 1 and {len(VIEW_OFFSETS_DEG)}, got {num_views}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def _write_meta(out_dir: Path, num_scenes: int, resolution: int, num_views: int, seed: int) -> None:
    meta_path = out_dir / "synth_meta.json"
    meta = {
        "version": SYNTH_VERSION,
        "num_scenes": int(num_scenes),
        "resolution": int(resolution),
        "num_views": int(num_views),
        "seed": int(seed),
    }
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            mismatched = [k for k in ("version", "resolution", "num_views", "seed") if old.get(k) != meta[k]]
            if mismatched:
                details = ", ".join(f"{k}: existing {old.get(k)!r} vs requested {meta[k]!r}" for k in mismatched)
                raise ValueError(
                    f"{out_dir} already holds synthetic scenes generated with different settings "
                    f"({details}); use another output directory or delete it"
                )
    write_atomic(meta_path, json.dumps(meta, indent=2).encode("utf-8"))


def write_scenes(
    out_dir: Union[str, Path],
    num_scenes: int,
    resolution: int = 64,
    num_views: int = 7,
    seed: int = 0,
    num_workers: Optional[int] = None,
    progress: bool = True,
) -> List[Path]:
    """Write ``num_scenes`` scene folders ``out_dir/scene_XXXXX`` plus ``out_dir/synth_meta.json``.

    Scene ``i`` depends only on ``(seed, i)``. Resumable: scene folders whose
    ``transforms.json`` exists are skipped; each scene is written to a hidden temporary
    folder and renamed into place, so an interrupted run never leaves a half-written
    ``scene_XXXXX``. Raises ``ValueError`` for invalid arguments, or when ``out_dir``
    holds scenes from different settings (resolution, num_views, seed or version).

    Returns the paths of all ``num_scenes`` scene folders, in index order.
    """
    _validate(num_scenes, resolution, num_views, seed)
    num_scenes, resolution, num_views, seed = int(num_scenes), int(resolution), int(num_views), int(seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    _write_meta(out, num_scenes, resolution, num_views, seed)

    # Remove leftovers of interrupted runs.
    for stale in out.glob(".scene_*.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)

    paths = [out / scene_dir_name(i) for i in range(num_scenes)]
    todo = [i for i, p in enumerate(paths) if not (p / "transforms.json").is_file()]
    tasks = [(str(out), i, seed, resolution, num_views) for i in todo]

    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1)
    num_workers = max(1, min(int(num_workers), len(tasks))) if tasks else 1

    pool = None
    if num_workers > 1:
        # Create the pool before any progress-bar thread starts (fork safety).
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        pool = ctx.Pool(num_workers)
    try:
        if pool is not None:
            chunksize = max(1, min(16, len(tasks) // (num_workers * 8)))
            results = pool.imap_unordered(_write_scene_task, tasks, chunksize=chunksize)
        else:
            results = map(_write_scene_task, tasks)
        if progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            with Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            ) as bar:
                task_id = bar.add_task("synth scenes", total=num_scenes, completed=num_scenes - len(tasks))
                for _ in results:
                    bar.advance(task_id)
        else:
            for _ in results:
                pass
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        if pool is not None:
            pool.terminate()
            for stale in out.glob(".scene_*.tmp-*"):  # scenes the terminated workers were writing
                shutil.rmtree(stale, ignore_errors=True)
    return paths

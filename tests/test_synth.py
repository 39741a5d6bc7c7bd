"""Tests for the procedural scene generator (vq3d_nerfstudio.data.synth) and its CLI.

Expected values are derived by hand from the conventions (canonical camera at (0, 0, 2),
50 deg horizontal FOV, pixel centre rays, ground at y = -0.5, z-depth), not copied from
the code's output.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vq3d_nerfstudio.data.synth import (
    CAMERA,
    VIEW_OFFSETS_DEG,
    Box,
    Cylinder,
    Material,
    Sphere,
    SynthScene,
    render_view,
    sample_scene,
    scene_rng,
    write_scenes,
)
from vq3d_nerfstudio.geometry.poses import focal_length, orbit_matrix

REPO_ROOT = Path(__file__).resolve().parents[1]
TAN25 = math.tan(math.radians(25.0))
AMB, DIF = 0.35, 0.65
RED = (0.9, 0.2, 0.1)
BLUE = (0.1, 0.3, 0.8)


def hand_focal(resolution: int) -> float:
    return (resolution / 2.0) / TAN25


def empty_scene(**kwargs) -> SynthScene:
    base = dict(
        ground_colors=((0.8, 0.6, 0.4), (0.2, 0.4, 0.6)),
        checker_size=10.0,
        checker_angle_deg=0.0,
        sky_colors=((1.0, 0.8, 0.6), (0.2, 0.4, 1.0)),
        light_dir=(0.0, 1.0, 0.0),
        objects=[],
    )
    base.update(kwargs)
    return SynthScene(**base)


CANONICAL = np.eye(4)
CANONICAL[2, 3] = 2.0


# --------------------------------------------------------------------------------------
# Constants and cameras
# --------------------------------------------------------------------------------------


def test_constants():
    assert VIEW_OFFSETS_DEG == (
        (0.0, 0.0),
        (-20.0, 0.0),
        (-10.0, 0.0),
        (10.0, 0.0),
        (20.0, 0.0),
        (0.0, 10.0),
        (0.0, -10.0),
    )
    assert (CAMERA.distance, CAMERA.fov_deg) == (2.0, 50.0)  # DESIGN.md's convention
    # 32 / tan(25 deg) = 32 / 0.46630765815 = 68.6242...
    assert CAMERA.focal_length(64) == pytest.approx(68.62422, abs=1e-4)
    assert focal_length(64, 90.0) == pytest.approx(32.0)


def test_camera_matrices():
    for yaw, el in VIEW_OFFSETS_DEG:
        c2w = orbit_matrix(yaw, el)
        assert c2w.shape == (4, 4)
        np.testing.assert_allclose(c2w[3], [0, 0, 0, 1], atol=0)
        rot, pos = c2w[:3, :3], c2w[:3, 3]
        assert np.linalg.norm(pos) == pytest.approx(2.0)
        np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-12)
        assert np.linalg.det(rot) == pytest.approx(1.0)
        # Position formula 2 * (cos el sin yaw, sin el, cos el cos yaw).
        y, e = math.radians(yaw), math.radians(el)
        np.testing.assert_allclose(
            pos, 2 * np.array([math.cos(e) * math.sin(y), math.sin(e), math.cos(e) * math.cos(y)]), atol=1e-12
        )
        # The origin is straight ahead (camera -z) and so projects to the image centre.
        origin_cam = rot.T @ (np.zeros(3) - pos)
        np.testing.assert_allclose(origin_cam, [0.0, 0.0, -2.0], atol=1e-12)
        # "Up" is world +y: camera x axis is horizontal and camera y points upwards.
        assert abs(rot[1, 0]) < 1e-12
        assert rot[1, 1] > 0
    np.testing.assert_array_equal(orbit_matrix(0.0, 0.0), CANONICAL)
    assert orbit_matrix(20.0, 0.0)[0, 3] > 0
    assert orbit_matrix(-20.0, 0.0)[0, 3] < 0
    assert orbit_matrix(0.0, 10.0)[1, 3] > 0
    assert orbit_matrix(0.0, -10.0)[1, 3] < 0
    np.testing.assert_allclose(orbit_matrix(0.0, 0.0, distance=3.0)[:3, 3], [0, 0, 3])


# --------------------------------------------------------------------------------------
# Rendering of hand-built scenes (odd resolution: pixel (16, 16) is exactly on the axis)
# --------------------------------------------------------------------------------------

R = 33
C = 16  # centre pixel index; its centre ray is exactly (0, 0, -1)


def test_empty_scene_sky_and_ground():
    light = (0.0, 0.8, 0.6)
    scene = empty_scene(light_dir=light)
    rgb, depth = render_view(scene, CANONICAL, R)
    assert rgb.shape == (R, R, 3) and rgb.dtype == np.float32
    assert depth.shape == (R, R) and depth.dtype == np.float32
    # Rows 0..16 look at or above the horizon (camera y = 0 > -0.5): sky, depth inf.
    assert np.all(np.isinf(depth[: C + 1]))
    assert np.all(np.isfinite(depth[C + 1 :]))
    f = hand_focal(R)
    # Bottom row: camera-space y = -(32.5 - 16.5) / f = -16 / f. A level camera at height
    # 0.5 above the ground sees the ground at z-depth 0.5 / (16 / f) = f / 32 along the
    # whole row (z-depth, not ray length, so it is constant across the row).
    np.testing.assert_allclose(depth[R - 1], f / 32.0, rtol=1e-6)
    # Row 20: z-depth 0.5 * f / 4.
    np.testing.assert_allclose(depth[20], 0.5 * f / 4.0, rtol=1e-6)
    # Bottom row, column 20: hit x = (f/32) * (4/f) = 0.125 > 0, z = 2 - f/32 = 0.894 > 0,
    # so it is in checker square (0, 0) of side 10 -> colour 0. Column 12 has x = -0.125
    # -> square (-1, 0) -> colour 1. Ground normal +y: factor 0.35 + 0.65 * l_y.
    factor = AMB + DIF * 0.8
    np.testing.assert_allclose(rgb[R - 1, 20], np.array(scene.ground_colors[0]) * factor, atol=1e-6)
    np.testing.assert_allclose(rgb[R - 1, 12], np.array(scene.ground_colors[1]) * factor, atol=1e-6)
    # The centre ray is horizontal: sky with blend weight 0.5 + 0.5 * 0 = 0.5.
    bottom, top = np.array(scene.sky_colors[0]), np.array(scene.sky_colors[1])
    np.testing.assert_allclose(rgb[C, C], 0.5 * (bottom + top), atol=1e-6)
    # Top-left pixel: direction (-16/f, 16/f, -1); weight 0.5 + 0.5 * y / |d|.
    d = np.array([-16 / f, 16 / f, -1.0])
    w = 0.5 + 0.5 * d[1] / np.linalg.norm(d)
    np.testing.assert_allclose(rgb[0, 0], (1 - w) * bottom + w * top, atol=1e-6)
    # The sky is not shaded: changing the light leaves sky pixels alone.
    rgb2, _ = render_view(empty_scene(light_dir=(0.3, 0.2, 0.1)), CANONICAL, R)
    np.testing.assert_array_equal(rgb2[: C + 1], rgb[: C + 1])


def test_ground_light_below_horizon_gives_ambient_only():
    scene = empty_scene(light_dir=(1.0, -0.5, 0.0))
    rgb, _ = render_view(scene, CANONICAL, R)
    np.testing.assert_allclose(rgb[R - 1, 20], np.array(scene.ground_colors[0]) * AMB, atol=1e-6)


def test_checker_rotation_and_size():
    # Bottom row, column 20 hits (x, z) = (0.125, 2 - f/32). Rotating the checkerboard by
    # 45 deg: local x = cos45 * x - sin45 * z < 0 and local z = sin45 * x + cos45 * z > 0,
    # so the point is in square (-1, 0) -> colour 1.
    f = hand_focal(R)
    x, z = 0.125, 2 - f / 32
    assert math.cos(math.pi / 4) * x - math.sin(math.pi / 4) * z < 0
    scene = empty_scene(checker_angle_deg=45.0)
    rgb, _ = render_view(scene, CANONICAL, R)
    np.testing.assert_allclose(rgb[R - 1, 20], np.array(scene.ground_colors[1]) * (AMB + DIF), atol=1e-6)
    # Square size 0.1 (angle 0): x = 0.125 -> floor 1, z = 0.8942 -> floor 8: odd -> colour 1.
    scene = empty_scene(checker_size=0.1)
    rgb, _ = render_view(scene, CANONICAL, R)
    assert math.floor(x / 0.1) + math.floor(z / 0.1) == 9
    np.testing.assert_allclose(rgb[R - 1, 20], np.array(scene.ground_colors[1]) * (AMB + DIF), atol=1e-6)


def test_sphere_on_axis():
    r = 0.4
    # Resting on the ground: centre (0, -0.5 + r, 0) = (0, -0.1, 0). The centre ray
    # (y = 0, along -z from z = 2) meets the sphere where x = 0, y = 0, z^2 + 0.1^2 = r^2,
    # i.e. z = sqrt(0.15): z-depth 2 - sqrt(0.15). Normal (0, 0.1, sqrt(0.15)) / 0.4.
    scene = empty_scene(objects=[Sphere((0.0, -0.5 + r, 0.0), r, Material(RED))])
    rgb, depth = render_view(scene, CANONICAL, R)
    assert depth[C, C] == pytest.approx(2.0 - math.sqrt(0.15), abs=1e-6)
    n_dot_l = 0.1 / 0.4  # light straight up
    np.testing.assert_allclose(rgb[C, C], np.array(RED) * (AMB + DIF * n_dot_l), atol=1e-6)
    # The sphere's top is at y = 0.3; its silhouette subtends at most atan(0.4 / 2) ~ 11.5
    # deg from the centre, while the top row is 23.3 deg above the axis: still sky.
    assert np.all(np.isinf(depth[0]))
    # The sphere is symmetric about x = 0: the depth map is mirror-symmetric in columns.
    np.testing.assert_allclose(depth, depth[:, ::-1], rtol=1e-6)


def test_sphere_depth_off_axis_pixel():
    # Pixel (row 16, column 20): camera direction (4/f, 0, -1). Sphere of radius 0.5 centred at
    # the origin (floating; fine for the renderer). Ray p = (0, 0, 2) + t (a, 0, -1), with
    # a = 4 / f: |p|^2 = r^2 -> (1 + a^2) t^2 - 4 t + 4 - r^2 = 0; z-depth = t.
    f = hand_focal(R)
    a = 4.0 / f
    r = 0.5
    qa, qb, qc = 1 + a * a, -4.0, 4.0 - r * r
    t = (-qb - math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)
    scene = empty_scene(objects=[Sphere((0.0, 0.0, 0.0), r, Material(BLUE))])
    _, depth = render_view(scene, CANONICAL, R)
    assert depth[C, 20] == pytest.approx(t, rel=1e-6)


def test_box_axis_aligned_and_rotated():
    h = 0.3
    light = (0.0, 0.6, 0.8)
    # Box centre (0, -0.2, 0): spans y in [-0.5, 0.1], front face z = 0.3 -> depth 1.7,
    # normal +z, n . l = 0.8.
    scene = empty_scene(light_dir=light, objects=[Box((0.0, -0.5 + h, 0.0), (h, h, h), 0.0, Material(RED))])
    rgb, depth = render_view(scene, CANONICAL, R)
    assert depth[C, C] == pytest.approx(1.7, abs=1e-6)
    np.testing.assert_allclose(rgb[C, C], np.array(RED) * (AMB + DIF * 0.8), atol=1e-6)
    # Rotated by 45 deg about y the front is a vertical edge at z = 0.3 * sqrt(2); both
    # adjacent faces have normals (+-sqrt(.5), 0, sqrt(.5)) so n . l = 0.8 * sqrt(0.5).
    scene = empty_scene(light_dir=light, objects=[Box((0.0, -0.5 + h, 0.0), (h, h, h), 45.0, Material(RED))])
    rgb, depth = render_view(scene, CANONICAL, R)
    assert depth[C, C] == pytest.approx(2.0 - h * math.sqrt(2.0), abs=1e-6)
    np.testing.assert_allclose(rgb[C, C], np.array(RED) * (AMB + DIF * 0.8 * math.sqrt(0.5)), atol=1e-6)
    # A box seen from the side (yaw +90): camera at (2, 0, 0) sees the +x face at x = 0.3.
    # Half extents (0.3, 0.3, 0.1): the +x face is 0.3 away from the centre.
    box = Box((0.0, -0.2, 0.0), (0.3, 0.3, 0.1), 0.0, Material(RED))
    _, depth = render_view(empty_scene(objects=[box]), orbit_matrix(90.0, 0.0), R)
    assert depth[C, C] == pytest.approx(1.7, abs=1e-6)


def test_cylinder_side_cap_and_stripes():
    radius, height = 0.3, 0.8
    centre = (0.0, -0.5 + height / 2, 0.0)  # spans y in [-0.5, 0.3]
    light = (0.0, 0.6, 0.8)
    # Stripes: period 0.3 -> bands of 0.15 from y = -0.5. The centre ray hits the side at
    # y = 0: (0 + 0.5) / 0.15 = 3.33 -> band 3 (odd) -> stripe colour. Normal +z.
    mat = Material(RED, stripe_color=BLUE, stripe_period=0.3)
    scene = empty_scene(light_dir=light, objects=[Cylinder(centre, radius, height, mat)])
    rgb, depth = render_view(scene, CANONICAL, R)
    assert depth[C, C] == pytest.approx(2.0 - radius, abs=1e-6)
    np.testing.assert_allclose(rgb[C, C], np.array(BLUE) * (AMB + DIF * 0.8), atol=1e-6)

    # Looking straight down from (0, 2, 0): camera x = world x, camera y = world -z,
    # camera z = world +y. The centre ray hits the top cap (y = 0.3) at z-depth 1.7 with
    # normal +y; everything else is ground at z-depth exactly 2.5.
    down = np.eye(4)
    down[:3, :3] = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    down[:3, 3] = (0.0, 2.0, 0.0)
    solid = Cylinder(centre, radius, height, Material(RED))
    rgb, depth = render_view(empty_scene(light_dir=light, objects=[solid]), down, R)
    assert depth[C, C] == pytest.approx(1.7, abs=1e-6)
    np.testing.assert_allclose(rgb[C, C], np.array(RED) * (AMB + DIF * 0.6), atol=1e-6)
    f = hand_focal(R)
    u = (np.arange(R) + 0.5 - R / 2) / f
    # A pixel sees the cap iff its ray at depth 1.7 is within the radius (the side wall
    # is invisible from directly above).
    on_cap = (u[None, :] ** 2 + u[:, None] ** 2) * 1.7**2 <= radius**2
    assert 0 < on_cap.sum() < R * R
    np.testing.assert_allclose(depth[on_cap], 1.7, atol=1e-6)
    np.testing.assert_allclose(depth[~on_cap], 2.5, atol=1e-6)


def test_nearest_object_wins():
    # Two spheres on the axis: the nearer one (centre z = 0.5) occludes the other.
    far = Sphere((0.0, 0.0, -0.5), 0.3, Material(BLUE))
    near = Sphere((0.0, 0.0, 0.5), 0.2, Material(RED))
    for objects in ([far, near], [near, far]):
        _, depth = render_view(empty_scene(objects=objects), CANONICAL, R)
        assert depth[C, C] == pytest.approx(2.0 - 0.5 - 0.2, abs=1e-6)


def _camera_looking_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """OpenGL c2w at ``position`` whose optical axis passes exactly through ``target``."""
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, position
    return c2w


def test_multiview_depth_consistency():
    """Back-project view 0 with its z-depth, project into the other views, and check the
    depth seen there. To avoid any interpolation error, the depth "seen from view k at X"
    is measured exactly: a camera at view k's centre with its (odd-resolution, hence
    on-axis) centre pixel aimed at X, whose z-depth there is the distance to the first
    surface along the ray through X. A visible point must be hit at its own distance; an
    occluded one in front of it; nothing may ever be seen *behind* a surface point."""
    res = 48
    f = hand_focal(res)
    c = res / 2
    j, i = np.meshgrid(np.arange(res), np.arange(res))
    rng = np.random.default_rng(1234)
    checked = 0
    for index in range(3):
        scene = sample_scene(scene_rng(0, index))
        c2w0 = orbit_matrix(*VIEW_OFFSETS_DEG[0])
        _, depth0 = render_view(scene, c2w0, res)
        valid = np.isfinite(depth0) & (depth0 < 6.0)
        z = depth0[valid].astype(np.float64)
        cam = np.stack([(j[valid] + 0.5 - c) / f * z, -(i[valid] + 0.5 - c) / f * z, -z], -1)
        world = cam @ c2w0[:3, :3].T + c2w0[:3, 3]
        # Every back-projected point is on the ground or above it.
        assert world[:, 1].min() > -0.5 - 1e-5
        for yaw, el in VIEW_OFFSETS_DEG[1:]:
            c2w1 = orbit_matrix(yaw, el)
            # Project into view k; keep the points inside its image.
            cam1 = (world - c2w1[:3, 3]) @ c2w1[:3, :3]
            z1 = -cam1[:, 2]
            col = cam1[:, 0] / z1 * f + c
            row = -cam1[:, 1] / z1 * f + c
            inside = np.flatnonzero((z1 > 0) & (col >= 0) & (col < res) & (row >= 0) & (row < res))
            assert len(inside) > 0.5 * len(world)
            sample = rng.choice(inside, size=min(120, len(inside)), replace=False)
            visible = 0
            for idx in sample:
                point = world[idx]
                probe = _camera_looking_at(c2w1[:3, 3], point)
                _, d = render_view(scene, probe, 9)
                dist = np.linalg.norm(point - c2w1[:3, 3])
                seen = float(d[4, 4])
                assert seen <= dist * (1 + 1e-4), (index, yaw, el, seen, dist)
                visible += abs(seen - dist) <= 1e-4 * dist
            assert visible > 0.5 * len(sample), (index, yaw, el, visible)
            checked += 1
    assert checked == 18


def test_render_all_rays_vectorised_speed():
    import time

    scene = sample_scene(scene_rng(0, 3))
    start = time.perf_counter()
    for yaw, el in VIEW_OFFSETS_DEG:
        render_view(scene, orbit_matrix(yaw, el), 64)
    assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------------------
# Scene sampling
# --------------------------------------------------------------------------------------


def _bottom_y(obj) -> float:
    if isinstance(obj, Sphere):
        return obj.center[1] - obj.radius
    if isinstance(obj, Box):
        return obj.center[1] - obj.half_extents[1]
    return obj.center[1] - obj.height / 2


def test_sample_scene_ranges_and_determinism():
    kinds = set()
    counts = set()
    striped = 0
    for index in range(200):
        scene = sample_scene(scene_rng(7, index))
        assert scene == sample_scene(scene_rng(7, index))
        assert 0.15 <= scene.checker_size <= 0.5
        light = np.asarray(scene.light_dir)
        assert np.linalg.norm(light) == pytest.approx(1.0)
        assert math.radians(30) - 1e-9 <= math.asin(light[1]) <= math.radians(80) + 1e-9
        for colors in (scene.ground_colors, scene.sky_colors):
            assert len(colors) == 2
            assert all(0.0 <= v <= 1.0 for col in colors for v in col)
        assert len(scene.objects) in (1, 2, 3, 4)
        counts.add(len(scene.objects))
        xz = []
        for obj in scene.objects:
            kinds.add(type(obj).__name__)
            assert _bottom_y(obj) == pytest.approx(-0.5, abs=1e-12)
            assert -0.8 <= obj.center[0] <= 0.8 and -0.8 <= obj.center[2] <= 0.8
            xz.append((obj.center[0], obj.center[2]))
            if isinstance(obj, Sphere):
                assert 0.15 <= obj.radius <= 0.45
            elif isinstance(obj, Box):
                assert all(0.12 <= h <= 0.35 for h in obj.half_extents)
            else:
                assert 0.12 <= obj.radius <= 0.3 and 0.3 <= obj.height <= 0.9
            if obj.material.stripe_color is not None:
                striped += 1
                assert 0.1 <= obj.material.stripe_period <= 0.3
        for a in range(len(xz)):
            for b in range(a + 1, len(xz)):
                assert math.dist(xz[a], xz[b]) >= 0.3
    assert kinds == {"Sphere", "Box", "Cylinder"}
    assert counts == {1, 2, 3, 4}
    assert striped > 0
    assert sample_scene(scene_rng(7, 0)) != sample_scene(scene_rng(8, 0))


# --------------------------------------------------------------------------------------
# Writing, determinism, resumability
# --------------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_scenes_layout_and_contents(tmp_path):
    out = tmp_path / "out"
    paths = write_scenes(out, num_scenes=2, resolution=16, num_views=7, seed=3, num_workers=1, progress=False)
    assert paths == [out / "scene_00000", out / "scene_00001"]
    meta = json.loads((out / "synth_meta.json").read_text())
    assert meta["num_scenes"] == 2 and meta["resolution"] == 16
    assert meta["num_views"] == 7 and meta["seed"] == 3
    assert isinstance(meta["version"], int)
    assert sorted(p.name for p in out.iterdir()) == ["scene_00000", "scene_00001", "synth_meta.json"]
    for index, scene_dir in enumerate(paths):
        tf = json.loads((scene_dir / "transforms.json").read_text())
        assert tf["fl_x"] == pytest.approx(8.0 / TAN25) and tf["fl_y"] == pytest.approx(8.0 / TAN25)
        assert tf["cx"] == 8.0 and tf["cy"] == 8.0 and tf["w"] == 16 and tf["h"] == 16
        assert tf["camera_model"] == "OPENCV"
        assert tf["pivot"] == [0, 0, 0]
        assert tf["depth_kind"] == "z-depth"
        assert len(tf["frames"]) == 7
        scene = sample_scene(scene_rng(3, index))
        for k, frame in enumerate(tf["frames"]):
            assert frame["file_path"] == f"images/frame_{k:05d}.png"
            assert frame["depth_file_path"] == f"depths/frame_{k:05d}.npy"
            assert (frame["yaw_deg"], frame["elevation_deg"]) == VIEW_OFFSETS_DEG[k]
            c2w = np.array(frame["transform_matrix"])
            np.testing.assert_allclose(c2w, orbit_matrix(*VIEW_OFFSETS_DEG[k]), atol=1e-12)
            img = Image.open(scene_dir / frame["file_path"])
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (16, 16)
            depth = np.load(scene_dir / frame["depth_file_path"])
            assert depth.dtype == np.float32 and depth.shape == (16, 16)
            rgb_ref, depth_ref = render_view(scene, c2w, 16)
            np.testing.assert_array_equal(depth, depth_ref)
            assert np.abs(np.asarray(img, dtype=np.float64) / 255.0 - rgb_ref).max() <= 0.5 / 255 + 1e-6
        # Canonical view: the bottom row looks down at the ground (or an object): finite.
        depth0 = np.load(scene_dir / "depths/frame_00000.npy")
        assert np.all(np.isfinite(depth0[-1]))


def test_determinism_and_independence_of_num_scenes(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    c = tmp_path / "c"
    write_scenes(a, num_scenes=2, resolution=16, num_views=3, seed=11, num_workers=1, progress=False)
    write_scenes(b, num_scenes=4, resolution=16, num_views=3, seed=11, num_workers=2, progress=False)
    write_scenes(c, num_scenes=2, resolution=16, num_views=3, seed=12, num_workers=1, progress=False)
    snap_a, snap_b = _snapshot(a / "scene_00001"), _snapshot(b / "scene_00001")
    assert snap_a and snap_a == snap_b
    assert _snapshot(a / "scene_00000") == _snapshot(b / "scene_00000")
    assert _snapshot(a / "scene_00000") != _snapshot(c / "scene_00000")
    assert len(list((b / "scene_00003" / "images").iterdir())) == 3


def test_resumable(tmp_path):
    out = tmp_path / "out"
    write_scenes(out, num_scenes=3, resolution=16, num_views=2, seed=0, num_workers=1, progress=False)
    before = _snapshot(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    import shutil

    shutil.rmtree(out / "scene_00001")
    # Leftovers of an interrupted run: a hidden temp folder, and a scene folder without
    # transforms.json (never produced by write_scenes itself, but must be redone).
    (out / ".scene_00001.tmp-12345" / "images").mkdir(parents=True)
    (out / "scene_00002" / "transforms.json").unlink()
    write_scenes(out, num_scenes=3, resolution=16, num_views=2, seed=0, num_workers=1, progress=False)
    assert _snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    for p, mtime in mtimes.items():
        if p.parent.parent.name == "scene_00000" or p.parent.name == "scene_00000":
            assert p.stat().st_mtime_ns == mtime, p


def test_write_scenes_rejects_bad_arguments_and_mismatched_dir(tmp_path):
    with pytest.raises(ValueError, match="num_views"):
        write_scenes(tmp_path / "x", num_scenes=1, resolution=16, num_views=8, progress=False)
    with pytest.raises(ValueError, match="num_views"):
        write_scenes(tmp_path / "x", num_scenes=1, resolution=16, num_views=0, progress=False)
    with pytest.raises(ValueError, match="resolution"):
        write_scenes(tmp_path / "x", num_scenes=1, resolution=4, progress=False)
    with pytest.raises(ValueError, match="num_scenes"):
        write_scenes(tmp_path / "x", num_scenes=0, resolution=16, progress=False)
    out = tmp_path / "out"
    write_scenes(out, num_scenes=1, resolution=16, num_views=1, seed=0, num_workers=1, progress=False)
    with pytest.raises(ValueError, match=re.escape(str(out))):
        write_scenes(out, num_scenes=1, resolution=24, num_views=1, seed=0, num_workers=1, progress=False)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "vq3d_nerfstudio.scripts.synth", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_scenes(tmp_path):
    out = tmp_path / "cli"
    proc = _run_cli(str(out), "--num-scenes", "3", "--resolution", "16", "--num-views", "2")
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["scene_00000", "scene_00001", "scene_00002", "synth_meta.json"]
    for i in range(3):
        tf = json.loads((out / f"scene_{i:05d}" / "transforms.json").read_text())
        assert len(tf["frames"]) == 2 and tf["w"] == 16
        assert len(list((out / f"scene_{i:05d}" / "images").iterdir())) == 2
        assert len(list((out / f"scene_{i:05d}" / "depths").iterdir())) == 2


@pytest.mark.parametrize(
    "args, word",
    [
        (["--num-views", "9"], "num-views"),
        (["--num-views", "0"], "num-views"),
        (["--resolution", "4"], "resolution"),
        (["--num-scenes", "0"], "num-scenes"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, args, word):
    out = tmp_path / "bad"
    proc = _run_cli(str(out), *args)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert word in lines[0]
    assert not out.exists()


def test_synth_module_imports_without_torch():
    code = (
        "import sys, vq3d_nerfstudio.data.synth; "
        "bad = [m for m in ('torch', 'nerfstudio') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_scene_class_is_the_kind_of_the_object_nearest_the_camera():
    from vq3d_nerfstudio.data.synth import Cylinder, scene_class

    sphere_front = Sphere((0.0, -0.3, 0.6), 0.2, Material(RED))  # 1.4 from the camera at (0, 0, 2)
    box_back = Box((0.0, -0.3, -0.6), (0.2, 0.2, 0.2), 0.0, Material(RED))  # 2.6 away
    cylinder_side = Cylinder((0.8, -0.2, 0.2), 0.2, 0.6, Material(RED))  # sqrt(0.64 + 0.04 + 3.24) = 1.98
    assert scene_class(empty_scene(objects=[box_back, sphere_front, cylinder_side])) == "sphere"
    assert scene_class(empty_scene(objects=[box_back, cylinder_side])) == "cylinder"
    assert scene_class(empty_scene(objects=[box_back])) == "box"


def test_dataparser_reads_synth_classes(tmp_path):
    from vq3d_nerfstudio.data.folders import scan_image_folder
    from vq3d_nerfstudio.data.synth import sample_scene, scene_class, scene_rng

    write_scenes(tmp_path, num_scenes=6, resolution=8, num_views=1, seed=0, num_workers=1, progress=False)
    records, names, _ = scan_image_folder(tmp_path)
    expected = [scene_class(sample_scene(scene_rng(0, i))) for i in range(6)]
    assert names == sorted(set(expected))
    assert [names[r.class_id] for r in records] == expected

"""The canonical camera is one object (issue 28): its derived values, the check that the data's and
the model's agree, old flags and old runs, and its numbers written once in the package."""

import ast
import inspect
import math
import re
from pathlib import Path

import numpy as np
import pytest
import tyro

from vq3d_nerfstudio.data.dataparser import Vq3dImagesDataParserConfig
from vq3d_nerfstudio.errors import Vq3dError
from vq3d_nerfstudio.geometry import cameras, poses
from vq3d_nerfstudio.geometry.poses import CanonicalCamera

PACKAGE = Path(__file__).resolve().parents[1] / "vq3d_nerfstudio"


def test_derived_values_match_a_hand_derivation():
    """DESIGN.md: at (0, 0, 2) with identity rotation, 50 degrees horizontal FOV, square images.
    A 90 degree camera of 64 px has focal 32 / tan(45 deg) = 32 exactly; 50 degrees gives
    32 / tan(25 deg) = 32 / 0.46630765815 = 68.6242..."""
    camera = CanonicalCamera()
    assert (camera.distance, camera.fov_deg) == (2.0, 50.0)
    assert camera.tan_half_fov == pytest.approx(0.46630765815)
    assert camera.focal_length(64) == pytest.approx(68.62422, abs=1e-4)
    wide = CanonicalCamera(distance=3.0, fov_deg=90.0)
    assert wide.focal_length(64) == pytest.approx(32.0)
    assert wide.intrinsics(64) == pytest.approx({"fl_x": 32.0, "fl_y": 32.0, "cx": 32.0, "cy": 32.0, "w": 64, "h": 64})
    assert wide.position == (0.0, 0.0, 3.0)
    np.testing.assert_array_equal(wide.camera_to_world(), [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 3], [0, 0, 0, 1]])
    np.testing.assert_array_equal(poses.orbit_matrix(0.0, 0.0, 3.0), wide.camera_to_world())


def test_a_point_on_the_image_edge_projects_there():
    """The frustum layout and the pinhole agree: a point at depth d and x = d tan(fov / 2) sits on
    the right image edge, pixel column ``size`` (``cx + f x / d = size / 2 + size / 2``)."""
    camera = CanonicalCamera(distance=2.5, fov_deg=40.0)
    depth, size = 1.7, 48
    x = depth * math.tan(math.radians(20.0))
    assert size / 2 + camera.focal_length(size) * x / depth == pytest.approx(size)


def test_the_old_dataparser_flags_still_set_it():
    """`vq3d-images --camera-distance / --fov-deg` (the flags before the camera was one object) and
    the new `--canonical-camera.distance / .fov-deg` set the same field."""
    old = tyro.cli(Vq3dImagesDataParserConfig, args=["--camera-distance", "2.5", "--fov-deg", "40"])
    new = tyro.cli(Vq3dImagesDataParserConfig, args=["--canonical-camera.distance", "2.5", "--canonical-camera.fov-deg", "40"])
    assert old.canonical_camera == new.canonical_camera == CanonicalCamera(2.5, 40.0)


def _pipeline_config(data_camera, model_camera):
    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny")
    config.pipeline.datamanager.dataparser.canonical_camera = data_camera
    config.pipeline.model.canonical_camera = model_camera
    return config


def test_the_data_and_the_model_must_hold_the_same_camera():
    from vq3d_nerfstudio.ns.pipeline import check_canonical_cameras

    check_canonical_cameras(_pipeline_config(CanonicalCamera(2.5), CanonicalCamera(2.5)).pipeline)
    with pytest.raises(Vq3dError) as err:
        check_canonical_cameras(_pipeline_config(CanonicalCamera(2.5), CanonicalCamera()).pipeline)
    line = str(err.value)
    assert "(distance 2.5, field of view 50 degrees) is not the model's (distance 2," in line and "\n" not in line
    assert "--pipeline.model.canonical-camera.distance" in line and "vq3d-images --canonical-camera.distance" in line


def test_a_run_saved_when_the_camera_was_two_dataparser_fields_loads_with_it():
    """A config.yml from before: the dataparser held camera_distance / fov_deg, the model no camera
    (it read the data's). nerfstudio loads config.yml with yaml.Loader, as here."""
    import yaml

    from vq3d_nerfstudio.ns.pipeline import check_canonical_cameras

    text = yaml.dump(_pipeline_config(CanonicalCamera(2.5, 40.0), CanonicalCamera(2.5, 40.0)))
    block = re.compile(r"^( *)canonical_camera: !!python/object:\S+CanonicalCamera\n +distance: 2.5\n +fov_deg: 40.0\n", re.M)
    assert len(block.findall(text)) == 2  # the model's, the dataparser's
    parser_indent = max(block.findall(text), key=len)  # the dataparser sits deeper than the model
    old = block.sub(lambda m: f"{m[1]}camera_distance: 2.5\n{m[1]}fov_deg: 40.0\n" if m[1] == parser_indent else "", text)
    assert "canonical_camera" not in old

    loaded = yaml.load(old, Loader=yaml.Loader)
    parser = loaded.pipeline.datamanager.dataparser
    assert parser.canonical_camera == CanonicalCamera(2.5, 40.0) and not hasattr(parser, "camera_distance")
    assert loaded.pipeline.model.canonical_camera == CanonicalCamera(2.5, 40.0)
    check_canonical_cameras(loaded.pipeline)


# ---- the numbers once ------------------------------------------------------------------------------------
CANONICAL_NUMBERS = {2, 50}
"""The canonical camera's distance and field of view (DESIGN.md): 2.0 and 50 degrees."""
CAMERA_FUNCTIONS = {
    name: inspect.signature(fn)
    for module in (poses, cameras)
    for name, fn in vars(module).items()
    if inspect.isfunction(fn) and fn.__module__ == module.__name__
}
"""Functions that take a distance or a field of view: their positional arguments are named through
the signature."""


def _is_camera_name(name: str) -> bool:
    return "distance" in name.lower() or "fov" in name.lower()


def _number(node: ast.AST):
    return node.value if isinstance(node, ast.Constant) and type(node.value) in (int, float) else None


def camera_numbers(source: str) -> list:
    """``(line, name)`` of every place ``source`` gives a distance or a field of view one of the
    canonical numbers: an assignment or field default, a parameter default, a keyword or positional
    argument of such a parameter, a dict entry, a ``.get(key, default)``."""
    hits = []

    def hit(name, value, node):
        if _is_camera_name(name) and _number(value) in CANONICAL_NUMBERS:
            hits.append((node.lineno, name))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            hit(node.target.id, node.value, node)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
                hit(name, node.value, node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args.posonlyargs + node.args.args
            for arg, default in zip(args[len(args) - len(node.args.defaults):], node.args.defaults):
                hit(arg.arg, default, node)
            for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults):
                if default is not None:
                    hit(arg.arg, default, node)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    hit(key.value, value, node)
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg:
                    hit(keyword.arg, keyword.value, node)
            callee = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if callee == "get" and len(node.args) == 2 and isinstance(node.args[0], ast.Constant):
                hit(str(node.args[0].value), node.args[1], node)
            if callee in CAMERA_FUNCTIONS:
                for param, value in zip(CAMERA_FUNCTIONS[callee].parameters, node.args):
                    hit(param, value, node)
    return hits


def test_the_scan_finds_each_way_of_restating_the_numbers():
    """What the package held before the camera was one object, in each form the scan must catch."""
    restated = """
CANONICAL_DISTANCE = 2.0
def focal_length(resolution, fov_deg=50.0): ...
class Placement:
    camera_distance: float = 2.0
    fov_deg: float = 50
distance = float(metadata.get("camera_distance", 2.0))
layout = PlaneLayout(camera_distance=2.0, fov_deg=50.0)
metadata = {"camera_distance": 2.0}
path = camera_path_dict(orbit_path(48, 20.0, 8.0), 64, 2.0, 50.0, seconds=2.0)
"""
    assert sorted(camera_numbers(restated)) == [
        (2, "CANONICAL_DISTANCE"), (3, "fov_deg"), (5, "camera_distance"), (6, "fov_deg"), (7, "camera_distance"),
        (8, "camera_distance"), (8, "fov_deg"), (9, "camera_distance"), (10, "distance"), (10, "fov_deg"),
    ]
    # numbers that are not the camera's, or not the canonical ones, are not flagged
    assert camera_numbers("background_radius = 50.0\nseconds = 2.0\nf(distance=2.5, fov_deg=40.0)\n") == []


def test_the_canonical_numbers_appear_once_in_the_package():
    """Only CanonicalCamera's own field defaults give a distance or a field of view 2 or 50."""
    found = [
        (path.relative_to(PACKAGE).as_posix(), name)
        for path in sorted(PACKAGE.rglob("*.py"))
        for _, name in camera_numbers(path.read_text())
    ]
    assert found == [("geometry/poses.py", "distance"), ("geometry/poses.py", "fov_deg")]

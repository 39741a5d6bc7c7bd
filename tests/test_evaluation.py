"""The multi-view evaluation protocol against scenes where the answer is known."""

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from vq3d_nerfstudio.data import synth
from vq3d_nerfstudio.data.scenes import load_scene
from vq3d_nerfstudio.errors import DatasetError
from vq3d_nerfstudio.evaluation.metrics import PSNR_CAP, depth_spread, psnr
from vq3d_nerfstudio.evaluation.protocol import evaluate_scene, summarize
from vq3d_nerfstudio.geometry.poses import orbit_matrix, view_offset_deg


def load_rgb(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


def oracle_for(transforms_path):
    """A 'model' that renders the true synthetic scene from whatever canonical poses it is given."""
    meta = json.loads(transforms_path.read_text())
    scene = synth.sample_scene(synth.scene_rng(meta["seed"], meta["scene_index"]))

    def render(image, poses, intrinsics):
        outs = []
        for pose in poses:
            rgb, depth = synth.render_view(scene, pose, int(intrinsics["w"]))
            rgb8 = np.clip(rgb, 0, 1) * 255 + 0.5
            outs.append({"rgb": torch.from_numpy(rgb8.astype(np.uint8).astype(np.float32) / 255), "z_depth": torch.from_numpy(depth)})
        return outs

    return render


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalscenes")
    synth.write_scenes(out, num_scenes=2, resolution=24, num_views=5, seed=1, num_workers=1, progress=False)
    return sorted(out.glob("*/transforms.json"))


def test_ground_truth_model_scores_perfectly(scenes):
    for path in scenes:
        result = evaluate_scene(load_scene(path), oracle_for(path), 2.0, load_rgb, load_rgb)
        assert result["scale"] == pytest.approx(1.0)
        for view in result["views"]:
            assert view["psnr"] == PSNR_CAP and view["ssim"] == pytest.approx(1.0)
            assert view["abs_rel"] < 1e-5 and view["delta1"] == 1.0
        # the 'nothing moves' floor is a real, finite score for the novel views
        assert all(v["still_psnr"] < 40 for v in result["views"][1:])
        offsets = [v["offset_deg"] for v in result["views"]]
        assert offsets == pytest.approx([0, 20, 10, 10, 20], abs=1e-4)


def test_alignment_undoes_a_moved_and_scaled_world(scenes, tmp_path):
    """Rotate, translate and scale the whole capture: the protocol maps it back to canonical."""
    source = scenes[0]
    meta = json.loads(source.read_text())
    angle, k, t = math.radians(37), 3.5, np.array([1.0, -2.0, 0.5])
    rot = np.array([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    rot = rot @ np.array([[1, 0, 0], [0, math.cos(0.3), -math.sin(0.3)], [0, math.sin(0.3), math.cos(0.3)]])
    moved = tmp_path / source.parent.name
    (moved / "depths").mkdir(parents=True)
    (moved / "images").mkdir()
    for frame in meta["frames"]:
        c2w = np.asarray(frame["transform_matrix"])
        new = np.eye(4)
        new[:3, :3] = rot @ c2w[:3, :3]
        new[:3, 3] = k * (rot @ c2w[:3, 3]) + t
        frame["transform_matrix"] = new.tolist()
        np.save(moved / frame["depth_file_path"], np.load(source.parent / frame["depth_file_path"]) * k)
        (moved / frame["file_path"]).write_bytes((source.parent / frame["file_path"]).read_bytes())
    meta["pivot"] = (k * (rot @ np.zeros(3)) + t).tolist()
    (moved / "transforms.json").write_text(json.dumps(meta))
    result = evaluate_scene(load_scene(moved / "transforms.json"), oracle_for(source), 2.0, load_rgb, load_rgb)
    assert result["scale"] == pytest.approx(1 / k)
    assert all(v["psnr"] > 45 for v in result["views"])
    assert all(v["abs_rel"] < 1e-4 for v in result["views"])


def test_shifted_image_scores_the_hand_computed_psnr(tmp_path):
    gray = np.full((8, 8, 3), 128, np.uint8)
    (tmp_path / "images").mkdir()
    frames = []
    for i, yaw in enumerate((0.0, 10.0)):
        Image.fromarray(gray).save(tmp_path / "images" / f"{i}.png")
        frames.append({"file_path": f"images/{i}.png", "transform_matrix": orbit_matrix(yaw, 0).tolist()})
    transforms = {"fl_x": 8.0, "fl_y": 8.0, "cx": 4.0, "cy": 4.0, "w": 8, "h": 8, "pivot": [0, 0, 0], "frames": frames}
    (tmp_path / "transforms.json").write_text(json.dumps(transforms))

    def shifted(image, poses, intrinsics):
        return [{"rgb": torch.full((8, 8, 3), 128 / 255 + 0.1), "z_depth": torch.ones(8, 8)} for _ in poses]

    result = evaluate_scene(load_scene(tmp_path / "transforms.json"), shifted, 2.0, load_rgb, load_rgb)
    # MSE = 0.1^2 = 0.01 -> PSNR = -10 log10(0.01) = 20 dB; no depth files -> no depth metrics
    assert [v["psnr"] for v in result["views"]] == pytest.approx([20.0, 20.0])
    # SSIM of constants a, b: luminance term (2ab + C1) / (a^2 + b^2 + C1), contrast/structure terms 1
    a, b, c1 = 128 / 255 + 0.1, 128 / 255, 0.01**2
    assert result["views"][1]["ssim"] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)
    assert result["views"][1]["still_psnr"] == PSNR_CAP and "abs_rel" not in result["views"][1]
    summary = summarize([result])
    assert set(summary) == {"0", "10"} and summary["10"]["psnr"] == pytest.approx(20.0)


def test_psnr_and_offset_hand_values():
    assert psnr(torch.zeros(4), torch.full((4,), 0.1)) == pytest.approx(20.0)
    assert view_offset_deg(orbit_matrix(0, 0), orbit_matrix(-20, 0)) == pytest.approx(20)


def test_invalid_scenes_name_the_file(tmp_path):
    bad = tmp_path / "transforms.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="transforms.json: cannot read"):
        load_scene(bad)
    bad.write_text(json.dumps({"fl_x": 1, "fl_y": 1, "cx": 1, "cy": 1, "w": 2, "h": 2, "frames": [{"file_path": "a.png", "transform_matrix": np.eye(4).tolist()}]}))
    with pytest.raises(DatasetError, match="at least one novel view"):
        load_scene(bad)
    bad.write_text(json.dumps({"w": 2, "frames": []}))
    with pytest.raises(DatasetError, match="missing fl_x"):
        load_scene(bad)


def test_depth_spread_hand_values():
    gt = torch.tensor([[2.0, float("inf")]])
    # pixel 0: half the weight 10% in front of the surface, half 10% behind -> 0.1; pixel 1 has no depth
    z = torch.tensor([[[1.8, 2.2, 5.0], [1.0, 2.0, 3.0]]])
    w = torch.tensor([[[0.3, 0.3, 0.0], [0.2, 0.2, 0.2]]])
    assert depth_spread(w, z, gt) == pytest.approx(0.1)
    on_surface = torch.tensor([[[0.0, 0.9, 0.0], [1.0, 0.0, 0.0]]])
    assert depth_spread(on_surface, torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]]), gt) == 0.0
    assert depth_spread(w, z, torch.full((1, 2), float("nan"))) is None


def test_lpips_and_spread_join_the_views(scenes):
    """With an LPIPS callable and per-sample weights, every view gets them; the oracle scores 0."""
    path = scenes[0]
    oracle = oracle_for(path)

    def render(image, poses, intrinsics):
        outs = oracle(image, poses, intrinsics)
        for out in outs:  # all weight on one sample at the true depth
            out["weights"] = torch.ones(*out["z_depth"].shape, 1)
            out["sample_z"] = out["z_depth"][..., None].double()
        return outs

    mean_abs = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3))  # noqa: E731 - a stand-in perceptual distance
    result = evaluate_scene(load_scene(path), render, 2.0, load_rgb, load_rgb, lpips=mean_abs)
    for view in result["views"]:
        assert view["lpips"] == pytest.approx(0.0, abs=1e-7)
        assert view["depth_spread"] == pytest.approx(0.0, abs=1e-6)
    input_gt = load_rgb(load_scene(path).images[0])
    for view, image in zip(result["views"][1:], load_scene(path).images[1:]):
        assert view["still_lpips"] == pytest.approx(float((input_gt - load_rgb(image)).abs().mean()), rel=1e-5)


def test_bad_frames_and_depth_name_the_file(scenes, tmp_path):
    import shutil

    def fresh(name):
        scene = tmp_path / name
        shutil.copytree(scenes[0].parent, scene)
        return scene / "transforms.json", json.loads((scene / "transforms.json").read_text())

    path, meta = fresh("missing depth")
    (path.parent / meta["frames"][1]["depth_file_path"]).unlink()
    with pytest.raises(DatasetError, match=r"\.npy: listed in .*transforms\.json \(frame 1\) but missing"):
        load_scene(path)
    path, meta = fresh("wrong size")  # a ground-truth frame that is not w x h
    frame = path.parent / meta["frames"][2]["file_path"]
    Image.open(frame).resize((10, 7)).save(frame)
    with pytest.raises(DatasetError, match=rf"{frame.name}: is 10x7 but its transforms.json says w=24, h=24"):
        evaluate_scene(load_scene(path), oracle_for(path), 2.0, load_rgb, load_rgb)
    path, meta = fresh("bool depth")
    depth = path.parent / meta["frames"][0]["depth_file_path"]
    np.save(depth, np.ones((24, 24), bool))
    with pytest.raises(DatasetError, match=rf"{depth.name}: depth has dtype bool"):
        evaluate_scene(load_scene(path), oracle_for(path), 2.0, load_rgb, load_rgb)
    path, meta = fresh("bad json types")
    meta["w"] = "wide"
    path.write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="intrinsics or pivot are not numbers"):
        load_scene(path)


def test_degenerate_camera_matrices_are_refused_naming_the_frame(scenes, tmp_path):
    """Every pose must be a rigid camera-to-world matrix; an all-zero one would otherwise give a NaN
    view angle, scored as a 0-degree view (frame 0 included: the same refusal, not a pivot question)."""
    import shutil

    rigid = orbit_matrix(10, 0)
    off = rigid.copy()
    off[:3, :3] += 1e-5  # single-precision JSON rounding is within the tolerance
    scaled = rigid.copy()
    scaled[:3, :3] *= 2  # R^T R = 4 I: |R^T R - I| = 3
    mirrored = rigid.copy()
    mirrored[:3, 0] *= -1
    cases = [
        (1, np.zeros((4, 4)), r"has bottom row \[0\.0, 0\.0, 0\.0, 0\.0\], not \[0, 0, 0, 1\]"),
        (0, np.zeros((4, 4)), r"has bottom row"),
        (2, scaled, r"has a rotation that is not orthonormal \(\|R\^T R - I\| up to 3\)"),
        (1, mirrored, r"has a mirrored rotation \(determinant -1\)"),
        (1, np.full((4, 4), np.nan), r"holds NaN or inf"),
        (1, [[1, 0], [0, 1]], r"is not a 4x4 matrix of numbers"),
    ]
    for i, (frame, matrix, reason) in enumerate(cases):
        scene = tmp_path / f"scene {i}"
        shutil.copytree(scenes[0].parent, scene)
        meta = json.loads((scene / "transforms.json").read_text())
        meta["frames"][frame]["transform_matrix"] = np.asarray(matrix).tolist()
        (scene / "transforms.json").write_text(json.dumps(meta))
        name = re.escape(meta["frames"][frame]["file_path"])
        with pytest.raises(DatasetError, match=rf"transforms\.json: frame {frame} \({name}\) transform_matrix {reason}.*; write a rigid"):
            load_scene(scene / "transforms.json")
    meta["frames"][1]["transform_matrix"] = off.tolist()
    (scene / "transforms.json").write_text(json.dumps(meta))
    assert load_scene(scene / "transforms.json").camera_to_worlds.shape == (5, 4, 4)


def test_frame_0_at_the_pivot_is_a_dataset_error(tmp_path):
    (tmp_path / "images").mkdir()
    frames = []
    for i, yaw in enumerate((0.0, 10.0)):
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tmp_path / "images" / f"{i}.png")
        frames.append({"file_path": f"images/{i}.png", "transform_matrix": orbit_matrix(yaw, 0).tolist()})
    camera0 = orbit_matrix(0.0, 0)[:3, 3].tolist()
    transforms = {"fl_x": 8.0, "fl_y": 8.0, "cx": 4.0, "cy": 4.0, "w": 8, "h": 8, "pivot": camera0, "frames": frames}
    (tmp_path / "transforms.json").write_text(json.dumps(transforms))
    with pytest.raises(DatasetError, match=r"0\.png: frame 0's camera sits at the pivot"):
        evaluate_scene(load_scene(tmp_path / "transforms.json"), None, 2.0, load_rgb, load_rgb)


def test_eval_depth_without_a_valid_pixel_is_a_bad_file(scenes, tmp_path):
    import shutil

    scene = tmp_path / "negative depth"
    shutil.copytree(scenes[0].parent, scene)
    meta = json.loads((scene / "transforms.json").read_text())
    depth = scene / meta["frames"][2]["depth_file_path"]
    np.save(depth, -np.load(depth))  # OpenGL camera-space z
    with pytest.raises(DatasetError, match=rf"{re.escape(depth.name)}: depth has no valid pixel .*OpenGL camera-space z"):
        evaluate_scene(load_scene(scene / "transforms.json"), oracle_for(scenes[0]), 2.0, load_rgb, load_rgb)

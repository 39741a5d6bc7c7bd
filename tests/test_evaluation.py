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
    for sub in ("depths", "images", "masks"):
        (moved / sub).mkdir(parents=True)
    for frame in meta["frames"]:
        (moved / frame["mask_path"]).write_bytes((source.parent / frame["mask_path"]).read_bytes())
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
    # what one image allows does not depend on where the world is
    original = evaluate_scene(load_scene(source), oracle_for(source), 2.0, load_rgb, load_rgb)
    for a, b in zip(result["views"][1:], original["views"][1:]):
        assert a["ceiling_psnr"] == pytest.approx(b["ceiling_psnr"], abs=1e-3) and a["covisible_fraction"] == b["covisible_fraction"]


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


# ---- what one image allows: the perfect-geometry ceiling, co-visibility, foreground -----------------

K16 = {"fl_x": 8.0, "fl_y": 8.0, "cx": 8.0, "cy": 8.0}


def test_the_warp_is_exact_when_the_novel_camera_is_the_input_camera():
    """Warping an image into its own camera gives it back, every pixel co-visible, sky included."""
    from vq3d_nerfstudio.evaluation.warp import covisible_warp

    rng = np.random.default_rng(0)
    image = rng.random((16, 16, 3))
    depth = rng.uniform(1.0, 5.0, (16, 16))
    depth[:3] = np.inf  # sky rows: points at infinity
    c2w = orbit_matrix(15.0, 5.0)
    warped, covisible = covisible_warp(image, depth, c2w, depth, c2w, K16)
    assert covisible.all()
    np.testing.assert_allclose(warped, image, atol=1e-9)


def test_a_two_plane_scene_has_the_hand_derived_covisible_mask():
    """Input camera at the origin looking down -z; a 1x1 square at z-depth 2 (x, y in [-0.5, 0.5])
    in front of a wall at z-depth 4; f = 8, c = 8, 16x16 pixels. Pixel centre (col j): x = (j + 0.5 - 8) / 8
    * depth, so the square covers columns and rows 6..9 of the input. The novel camera moves 1 to the
    right: a wall pixel j lands on input column j + 2 (8 * 1 / 4 px), a square pixel on j + 4, so the
    square sits on novel columns 2..5. Not co-visible: wall pixels that land behind the square in the
    input (rows 6..9, columns 6 and 7: disoccluded) and those landing outside it (columns 14, 15)."""
    from vq3d_nerfstudio.evaluation.warp import covisible_warp

    input_depth = np.full((16, 16), 4.0)
    input_depth[6:10, 6:10] = 2.0
    novel_depth = np.full((16, 16), 4.0)
    novel_depth[6:10, 2:6] = 2.0
    input_c2w, novel_c2w = np.eye(4), np.eye(4)
    novel_c2w[0, 3] = 1.0
    image = np.random.default_rng(1).random((16, 16, 3))
    warped, covisible = covisible_warp(image, input_depth, input_c2w, novel_depth, novel_c2w, K16)
    expected = np.ones((16, 16), bool)
    expected[6:10, 6:8] = False
    expected[:, 14:] = False
    np.testing.assert_array_equal(covisible, expected)
    # co-visible pixels carry the input's colour from where they land; the others stay where they were
    np.testing.assert_allclose(warped[0, 3], image[0, 5])  # wall: 2 px
    np.testing.assert_allclose(warped[7, 3], image[7, 7])  # square: 4 px
    np.testing.assert_allclose(warped[7, 6], image[7, 6])  # disoccluded: unmoved
    np.testing.assert_allclose(warped[2, 15], image[2, 15])  # outside the input's frame: unmoved


def write_posed_scene(folder, images, depths, poses, masks=None, size=16):
    """A transforms.json scene of the given frames (uint8 images, z-depth arrays, c2w poses, masks)."""
    for sub in ("images", "depths", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    frames = []
    for i, (image, depth, pose) in enumerate(zip(images, depths, poses)):
        Image.fromarray(image).save(folder / "images" / f"{i}.png")
        np.save(folder / "depths" / f"{i}.npy", depth.astype(np.float32))
        frame = {"file_path": f"images/{i}.png", "depth_file_path": f"depths/{i}.npy", "transform_matrix": pose.tolist()}
        if masks is not None:
            Image.fromarray(masks[i].astype(np.uint8) * 255).save(folder / "masks" / f"{i}.png")
            frame["mask_path"] = f"masks/{i}.png"
        frames.append(frame)
    transforms = {**K16, "w": size, "h": size, "pivot": [0, 0, -3.0], "frames": frames}
    (folder / "transforms.json").write_text(json.dumps(transforms))
    return folder / "transforms.json"


def test_the_ceiling_of_a_novel_view_at_the_input_camera_is_perfect_and_the_gap_needs_one(tmp_path):
    """A 'novel' frame at the input camera: the warped input is the frame itself (PSNR cap), and with
    the floor at the cap too there is no gap to gain. A moved frame has a finite ceiling above its
    floor, and a model scoring the ceiling gains all of the gap (1), the floor none (0)."""
    rng = np.random.default_rng(2)
    image = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
    depth = np.full((16, 16), 3.0)
    path = write_posed_scene(tmp_path / "same", [image, image], [depth, depth], [np.eye(4), np.eye(4)])
    still = lambda image, poses, k: [{"rgb": load_rgb(tmp_path / "same" / "images" / "0.png"), "z_depth": torch.full((16, 16), 3.0)}] * len(poses)  # noqa: E731
    view = evaluate_scene(load_scene(path), still, 3.0, load_rgb, load_rgb)["views"][1]
    assert view["ceiling_psnr"] == PSNR_CAP and view["covisible_fraction"] == 1.0 and view["covisible_psnr"] == PSNR_CAP
    assert "gap_gained" not in summarize([{"views": [view]}])["0"]

    rows = [{"offset_deg": 10, "psnr": p, "still_psnr": 16.0, "ceiling_psnr": 20.0} for p in (16.0, 20.0, 18.0)]
    assert [summarize([{"views": [r]}])["10"]["gap_gained"] for r in rows] == pytest.approx([0.0, 1.0, 0.5])
    # a ratio of the views' means: (18 - 16) / (20 - 16) over all three
    assert summarize([{"views": rows}])["10"]["gap_gained"] == pytest.approx(0.5)


def test_foreground_scores_read_the_masks(tmp_path):
    """A model right on the masked foreground (colour and depth) and wrong elsewhere scores the PSNR
    cap and delta 1 there, and the hand-computed figures on the whole image: 3/4 of the pixels off by
    0.2 -> MSE 0.03 -> 15.23 dB."""
    image = np.full((16, 16, 3), 100, np.uint8)
    depth = np.full((16, 16), 3.0)
    mask = np.zeros((16, 16), bool)
    mask[:, :4] = True  # a quarter
    path = write_posed_scene(tmp_path / "s", [image, image], [depth, depth], [np.eye(4), np.eye(4)], [mask, mask])
    truth = torch.full((16, 16, 3), 100 / 255)

    def half_right(image, poses, k):
        rgb, z = truth.clone(), torch.full((16, 16), 3.0)
        rgb[:, 4:] += 0.2
        z[:, 4:] = 9.0
        return [{"rgb": rgb, "z_depth": z} for _ in poses]

    for view in evaluate_scene(load_scene(path), half_right, 3.0, load_rgb, load_rgb)["views"]:
        assert view["fg_psnr"] == PSNR_CAP and view["fg_delta1"] == 1.0 and view["fg_abs_rel"] == pytest.approx(0.0)
        assert view["psnr"] == pytest.approx(-10 * math.log10(0.75 * 0.04), rel=1e-4) and view["delta1"] == 0.25
    bad = tmp_path / "s" / "masks" / "1.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad)
    with pytest.raises(DatasetError, match=re.escape(str(bad)) + ".*8x8.*16x16"):
        evaluate_scene(load_scene(path), half_right, 3.0, load_rgb, load_rgb)


def test_synth_masks_are_the_pixels_above_the_ground(scenes):
    """`vq3d synth`'s masks (nerfstudio's mask_path, nonzero = foreground) are exactly the pixels whose
    3D point (unprojected from the z-depth) is off the ground plane y = -0.5 and not sky."""
    from vq3d_nerfstudio.evaluation.warp import _pixel_rays

    some_object = False
    for path in scenes:
        scene = load_scene(path)
        assert len(scene.masks) == len(scene.images)
        for mask_file, depth_file, c2w in zip(scene.masks, scene.depths, scene.camera_to_worlds):
            mask = np.asarray(Image.open(mask_file)) > 0
            depth = np.load(depth_file).astype(np.float64)
            rays = _pixel_rays(*depth.shape, {k: scene.intrinsics[k] for k in ("fl_x", "fl_y", "cx", "cy")})
            y = c2w[1, 3] + np.where(np.isfinite(depth), depth, 0.0) * (rays @ c2w[:3, :3].T)[..., 1]
            clear = ~np.isfinite(depth) | (np.abs(y - synth.GROUND_Y) > 1e-3)  # not where objects touch the ground
            np.testing.assert_array_equal(mask[clear], (np.isfinite(depth) & (y > synth.GROUND_Y))[clear])
            some_object |= bool(mask.any())
    assert some_object

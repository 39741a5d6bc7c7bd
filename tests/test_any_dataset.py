"""Any nerfstudio dataset in (issue 15): nerfstudio's own dataparsers as sources of single images,
multi-view supervision from posed views, and nerfstudio's reduced training config."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, cli, run
from nerfstudio_reduced_config import set_reduced_config
from PIL import Image

from vq3d_nerfstudio.data.synth import write_scenes
from vq3d_nerfstudio.ns.method_configs import build_trainer_config


def look_at(centre, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """``[4, 4]`` OpenGL camera-to-world at ``centre`` looking at ``target`` (x right, y up, -z forward)."""
    centre, target, up = (np.asarray(v, dtype=np.float64) for v in (centre, target, up))
    back = centre - target
    back /= np.linalg.norm(back)
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, np.cross(back, right), back, centre
    return c2w


def write_blender_scene(root: Path, size: int = 16, views: int = 3) -> Path:
    """A Blender-layout scene (``transforms_{train,val,test}.json``, RGBA ``<file_path>.png``) on a
    ring of radius 4 around the origin, 40 degrees horizontal field of view."""
    rng = np.random.default_rng(0)
    for split, count in (("train", views), ("val", 1), ("test", 1)):
        frames = []
        for i in range(count):
            angle = 2 * math.pi * (i + (0.5 if split != "train" else 0.0)) / views
            rgba = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
            rgba[..., 3] = 255
            (root / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgba, mode="RGBA").save(root / split / f"r_{i}.png")
            c2w = look_at((4 * math.sin(angle), 0.5, 4 * math.cos(angle)))
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": math.radians(40), "frames": frames}))
    return root


@pytest.mark.parametrize("method", ["vq3d-tiny", "vq3d"])
def test_nerfstudio_reduced_config_trains(method, tmp_path, monkeypatch):
    from nerfstudio.scripts.train import train_loop

    # nerfstudio's own function, verbatim: it reads tests/data/lego_test under the working directory.
    write_blender_scene(tmp_path / "tests" / "data" / "lego_test")
    monkeypatch.chdir(tmp_path)
    config = set_reduced_config(build_trainer_config(method), tmp_path)
    # vq3d's LPIPS needs torchvision's VGG16 weights, which this offline machine lacks.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights"))
    config.pipeline.model.perceptual_if_missing = "skip"
    seen = []
    from vq3d_nerfstudio.data.datamanager import Vq3dDataManager

    original = Vq3dDataManager.next_train
    monkeypatch.setattr(Vq3dDataManager, "next_train", lambda self, step: seen.append(original(self, step)) or seen[-1])
    train_loop(local_rank=0, world_size=0, config=config)
    assert list((config.get_base_dir() / "nerfstudio_models").glob("step-000000001.ckpt"))
    assert len(seen) == 2  # 2 steps of 1 image (its 4 rays), the Blender images resized to the model's size
    for ray_bundle, batch in seen:
        assert len(ray_bundle) == 4 and batch["image"].shape == (4, 3)
        size = config.pipeline.model.image_size
        assert batch["input_images"].shape == (1, 3, size, size)


def write_posed_scene(scene: Path, poses, size=(64, 64), intrinsics=None, depths=None, color=None) -> Path:
    """A scene folder (`vq3d synth` layout: ``transforms.json`` + ``images/``, optional ``depths/``),
    pivot at the origin. ``color(view, rows, cols) -> [H, W, 3]`` uint8 paints each view."""
    width, height = size
    fx, fy, cx, cy = intrinsics or (40.0, 40.0, width / 2, height / 2)
    rows, cols = np.mgrid[0:height, 0:width]
    frames = []
    for k, c2w in enumerate(poses):
        (scene / "images").mkdir(parents=True, exist_ok=True)
        pixels = color(k, rows, cols) if color else np.full((height, width, 3), 40 * k, dtype=np.uint8)
        Image.fromarray(pixels.astype(np.uint8)).save(scene / "images" / f"{k}.png")
        frame = {"file_path": f"images/{k}.png", "transform_matrix": np.asarray(c2w).tolist()}
        if depths is not None:
            (scene / "depths").mkdir(exist_ok=True)
            np.save(scene / "depths" / f"{k}.npy", np.full((height, width), depths[k], dtype=np.float32))
            frame["depth_file_path"] = f"depths/{k}.npy"
        frames.append(frame)
    meta = {"fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": width, "h": height, "pivot": [0.0, 0.0, 0.0],
            "depth_kind": "z-depth", "frames": frames}
    (scene / "transforms.json").write_text(json.dumps(meta))
    return scene


def pose(right, up, back, centre) -> np.ndarray:
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, back, centre
    return c2w


def multiview_datamanager(data: Path, **overrides):
    from vq3d_nerfstudio.data.datamanager import Vq3dDataManagerConfig
    from vq3d_nerfstudio.data.dataparser import Vq3dImagesDataParserConfig

    options = dict(images_per_batch=2, rays_per_image=32, num_workers=0, use_multiview_supervision=True, multiview_views=2)
    options.update(overrides)
    parser = Vq3dImagesDataParserConfig(data=data, eval_fraction=0.0)
    return Vq3dDataManagerConfig(dataparser=parser, **options).setup(device="cpu", test_mode="val")


def test_relative_camera_of_a_supervising_view_by_hand(tmp_path):
    """Input camera 4 units above the pivot looking down (camera x = world x, camera y = world -z),
    a second camera 4 units along +x looking at the pivot (camera x = world -z, y = world y).
    Mapping the input onto the canonical camera (identity at (0, 0, 2)) and scaling by 2 / 4:
    the second view is at R0^T (c1 - c0) / 2 + (0, 0, 2) = (4, 0, -4) / 2 + (0, 0, 2) = (2, 0, 0),
    with rotation R0^T R1 whose columns are (x0.x1, y0.x1, z0.x1) = (0, 1, 0), (0, 0, 1), (1, 0, 0).
    The 64x48 images are cropped to the centre 48x48 and resized to 64: fx 40 -> 40 * 64/48,
    cx 32 -> (32 - 8) * 64/48 = 32, cy 24 -> 24 * 64/48 = 32. Depth z = 4 and 3 world units become
    disparity 1 / (4 / 2) = 0.5 and 1 / (3 / 2) = 2/3 in the canonical frame."""
    input_pose = pose((1, 0, 0), (0, 0, -1), (0, 1, 0), (0, 4, 0))
    other = pose((0, 0, -1), (0, 1, 0), (1, 0, 0), (4, 0, 0))
    write_posed_scene(tmp_path / "data" / "scene_0", [input_pose, other], size=(64, 48), intrinsics=(40.0, 40.0, 32.0, 24.0),
                      depths=[4.0, 3.0])
    dm = multiview_datamanager(tmp_path / "data", multiview_views=1)
    item = dm.train_dataset[0]
    np.testing.assert_allclose(item["view_poses"][0].numpy(), [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2]], atol=1e-6)
    np.testing.assert_allclose(item["view_poses"][1].numpy(), [[0, 0, 1, 2], [1, 0, 0, 0], [0, 1, 0, 0]], atol=1e-6)
    f = 40 * 64 / 48
    np.testing.assert_allclose(item["view_intrinsics"].numpy(), [[f, f, 32, 32]] * 2, rtol=1e-6)
    np.testing.assert_allclose(item["view_disparity"][0].numpy(), 0.5, rtol=1e-6)
    np.testing.assert_allclose(item["view_disparity"][1].numpy(), 2 / 3, rtol=1e-6)
    assert bool(item["view_disparity_mask"].all())


def test_multiview_step_renders_each_ray_from_its_own_camera_and_image(tmp_path):
    """Two scenes of three views each; every pixel's colour encodes (scene, view, row, col), so each
    ray's target names the image and pixel it came from. Views (input at (0, 0, 4), then (4, 0, 0)
    and (0, 0, -4), all looking at the pivot) map to (0, 0, 2), (2, 0, 0) and (0, 0, -2) in the
    input's canonical frame (scale 2 / 4; the input's rotation is the identity)."""
    f = 40.0
    poses = [pose((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 4)), pose((0, 0, -1), (0, 1, 0), (1, 0, 0), (4, 0, 0)),
             pose((-1, 0, 0), (0, 1, 0), (0, 0, -1), (0, 0, -4))]
    centres = [(0, 0, 2), (2, 0, 0), (0, 0, -2)]
    for s in range(2):
        paint = lambda k, r, c, s=s: np.stack([4 * c, 4 * r, np.full_like(r, 100 * k + 20 * s)], -1)  # noqa: E731
        write_posed_scene(tmp_path / "data" / f"scene_{s}", poses, intrinsics=(f, f, 32.0, 32.0), color=paint)
    dm = multiview_datamanager(tmp_path / "data", rays_per_image=300)
    ray_bundle, batch = dm.next_train(0)
    code = torch.round(batch["image"] * 255).long()
    col, row, view, scene = code[:, 0] // 4, code[:, 1] // 4, code[:, 2] // 100, (code[:, 2] % 100) // 20
    assert set(view.tolist()) == {0, 1, 2}  # every view supervises
    # each ray uses the tri-plane of its own scene's input image
    input_scene = batch["image_idx"][ray_bundle.metadata["batch_idx"][:, 0]]
    assert torch.equal(input_scene, scene) and set(scene.tolist()) == {0, 1}
    # an image's camera slots (view_idx): slot 0 is its input view, each other slot one supervising
    # view (drawn in random order, so a slot names a position, not a frame)
    slot = batch["view_idx"]
    assert set(view[slot == 0].tolist()) == {0}
    for s in range(2):
        assert sorted(view[(scene == s) & (slot == k)].unique().item() for k in (1, 2)) == [1, 2]
    for v in range(3):
        rays = view == v
        rotation = torch.tensor(poses[v][:3, :3], dtype=torch.float32)
        np.testing.assert_allclose(ray_bundle.origins[rays].numpy(), np.broadcast_to(centres[v], (int(rays.sum()), 3)), atol=1e-5)
        local = torch.stack([(col[rays] + 0.5 - 32) / f, -(row[rays] + 0.5 - 32) / f, -torch.ones(int(rays.sum()))], -1)
        expected = torch.nn.functional.normalize(local @ rotation.T, dim=-1)
        np.testing.assert_allclose(ray_bundle.directions[rays].numpy(), expected.numpy(), atol=1e-5)
    assert len(ray_bundle) == 2 * 3 * (300 // 3)  # the rays per image are shared by its three views


def test_without_the_option_losses_are_bit_identical(synth_dir):
    """Option off on posed data (3 views per scene): the plain single-image path, i.e. exactly
    nerfstudio's RayGenerator over the canonical cameras (identity rotation at (0, 0, 2), 50 degrees)
    at the drawn pixels, targets the input pixels; the model's losses on the two batches are equal
    bit for bit."""
    from nerfstudio.model_components.ray_generators import RayGenerator

    from vq3d_nerfstudio.data.dataset import Vq3dImageDataset
    from vq3d_nerfstudio.geometry.cameras import canonical_cameras

    dm = multiview_datamanager(synth_dir, use_multiview_supervision=False)
    assert type(dm.train_dataset) is Vq3dImageDataset
    images = next(dm.iter_train_image_dataloader)
    assert "view_images" not in images
    torch.manual_seed(0)
    ray_bundle, batch = dm._view_rays(images, dm.train_ray_generator)

    torch.manual_seed(0)
    num, size = images["image"].shape[:2]
    pixels = torch.randint(0, size * size, (num, 32))
    group = torch.arange(num).repeat_interleave(32)
    rows, cols = (pixels // size).reshape(-1), (pixels % size).reshape(-1)
    cameras = canonical_cameras(len(dm.train_dataset), size, 2.0, 50.0)
    reference = RayGenerator(cameras)(torch.stack([images["image_idx"][group], rows, cols], -1))
    reference.metadata["batch_idx"] = group[:, None]
    reference_batch = {**batch, "image": images["image"][group, rows, cols],
                       "disparity": images["disparity"][group, rows, cols],
                       "disparity_mask": images["disparity_mask"][group, rows, cols]}
    assert torch.equal(ray_bundle.origins, reference.origins) and torch.equal(ray_bundle.directions, reference.directions)

    config = build_trainer_config("vq3d-tiny").pipeline.model
    torch.manual_seed(1)
    model = config.setup(scene_box=dm.train_dataparser_outputs.scene_box, num_train_data=len(dm.train_dataset),
                         metadata=dm.train_dataset.metadata)
    losses = []
    for bundle, b in ((ray_bundle, batch), (reference, reference_batch)):
        torch.manual_seed(2)
        losses.append(model.get_loss_dict(model(bundle, b), b))
    assert losses[0].keys() == losses[1].keys() and "depth_loss" in losses[0]
    for key in losses[0]:
        assert torch.equal(losses[0][key], losses[1][key]), key


def _old_single_view_rays(dm, images, generator):
    """The single-image ray builder as it was before one builder served both paths (commit 20280c8,
    ``Vq3dDataManager._rays_for_images``), the reference."""
    image = images["image"]
    num_images, height, width = image.shape[:3]
    per_image = dm.rays_per_image
    pixels = torch.randint(0, height * width, (num_images, per_image))
    batch_idx = torch.arange(num_images).repeat_interleave(per_image)
    rows, cols = (pixels // width).reshape(-1), (pixels % width).reshape(-1)
    camera_idx = images.get("camera_idx", images["image_idx"])[batch_idx]
    ray_bundle = generator(torch.stack([camera_idx, rows, cols], dim=-1))
    ray_bundle.metadata["batch_idx"] = batch_idx[:, None]
    batch = {"input_images": image.permute(0, 3, 1, 2).contiguous(), "image": image[batch_idx, rows, cols],
             "image_idx": images["image_idx"], "class_id": images["class_id"],
             "disparity": images["disparity"][batch_idx, rows, cols],
             "disparity_mask": images["disparity_mask"][batch_idx, rows, cols],
             "input_disparity": images["disparity"].permute(0, 3, 1, 2),
             "input_disparity_mask": images["disparity_mask"].permute(0, 3, 1, 2)}
    return ray_bundle, batch


def _old_multiview_rays(dm, images):
    """The multi-view ray builder of commit 20280c8 (``Vq3dDataManager._multiview_rays``), the reference."""
    from nerfstudio.cameras.cameras import Cameras, CameraType

    from vq3d_nerfstudio.geometry.cameras import ray_generator

    views = images["view_images"]
    num_images, num_views, height, width = views.shape[:4]
    cams = num_images * num_views
    intrinsics = images["view_intrinsics"].reshape(cams, 4)
    cameras = Cameras(
        camera_to_worlds=images["view_poses"].reshape(cams, 3, 4),
        fx=intrinsics[:, 0:1], fy=intrinsics[:, 1:2], cx=intrinsics[:, 2:3], cy=intrinsics[:, 3:4],
        width=torch.full((cams, 1), width, dtype=torch.long), height=torch.full((cams, 1), height, dtype=torch.long),
        camera_type=CameraType.PERSPECTIVE,
    )
    pixels = torch.randint(0, height * width, (cams, max(1, dm.rays_per_image // num_views)))
    camera_idx = torch.arange(cams).repeat_interleave(pixels.shape[1])
    rows, cols = (pixels // width).reshape(-1), (pixels % width).reshape(-1)
    ray_bundle = ray_generator(cameras)(torch.stack([camera_idx, rows, cols], dim=-1))
    ray_bundle.metadata["batch_idx"] = (camera_idx // num_views)[:, None]
    disparity = images["view_disparity"].reshape(cams, height, width, 1)
    mask = images["view_disparity_mask"].reshape(cams, height, width, 1)
    batch = {"input_images": views[:, 0].permute(0, 3, 1, 2).contiguous(),
             "image": views.reshape(cams, height, width, 3)[camera_idx, rows, cols],
             "image_idx": images["image_idx"], "class_id": images["class_id"], "view_idx": camera_idx % num_views,
             "disparity": disparity[camera_idx, rows, cols], "disparity_mask": mask[camera_idx, rows, cols],
             "input_disparity": images["view_disparity"][:, 0].permute(0, 3, 1, 2),
             "input_disparity_mask": images["view_disparity_mask"][:, 0].permute(0, 3, 1, 2)}
    return ray_bundle, batch


@pytest.mark.parametrize("multiview", [False, True])
def test_one_ray_builder_gives_the_batches_of_the_two_it_replaced(synth_dir, multiview):
    """Single-image batches (one view) and multi-view batches (three views) from the one builder
    equal, tensor for tensor, what the single-image and multi-view builders of commit 20280c8 made
    from the same images with the same seed."""
    dm = multiview_datamanager(synth_dir, use_multiview_supervision=multiview)
    images = next(dm.iter_train_image_dataloader)
    assert ("view_images" in images) == multiview
    torch.manual_seed(0)
    bundle, batch = dm._view_rays(images, dm.train_ray_generator)
    torch.manual_seed(0)
    old_bundle, old_batch = _old_multiview_rays(dm, images) if multiview else _old_single_view_rays(dm, images, dm.train_ray_generator)
    for name in ("origins", "directions", "pixel_area", "camera_indices", "nears", "fars"):
        a, b = getattr(bundle, name), getattr(old_bundle, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert bundle.metadata.keys() == old_bundle.metadata.keys()
    assert all(torch.equal(bundle.metadata[k], old_bundle.metadata[k]) for k in bundle.metadata)
    assert batch.keys() == old_batch.keys()
    assert all(torch.equal(batch[k], old_batch[k]) for k in batch), [k for k in batch if not torch.equal(batch[k], old_batch[k])]


def test_a_dataparser_without_images_is_one_line():
    from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
    from nerfstudio.data.scene_box import SceneBox

    from vq3d_nerfstudio.data.views import single_image_outputs
    from vq3d_nerfstudio.errors import DatasetError
    from vq3d_nerfstudio.geometry.cameras import canonical_cameras
    from vq3d_nerfstudio.geometry.poses import CanonicalCamera

    empty = DataparserOutputs(image_filenames=[], cameras=canonical_cameras(1, 8, 2.0, 50.0),
                              scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])))
    with pytest.raises(DatasetError, match=r"^some-data: gave no images; .*vq3d-images .*nerfstudio-data, blender-data"):
        single_image_outputs(empty, "some-data", 64, CanonicalCamera())


def test_ns_train_nerfstudio_data_on_one_scene(tmp_path, cli_env):
    """`ns-train vq3d-tiny nerfstudio-data --data <scene>` through the CLI: every view of the scene one
    training input (its depth .npy in world units: --depth-unit-scale-factor 1)."""
    write_scenes(tmp_path / "scenes", num_scenes=1, resolution=16, num_views=4, seed=0, num_workers=1, progress=False)
    scene = tmp_path / "scenes" / "scene_00000"
    out = tmp_path / "runs"
    run([cli("ns-train"), "vq3d-tiny", "--output-dir", str(out), "--max-num-iterations", "2", *FAST,
         "nerfstudio-data", "--data", str(scene), "--eval-mode", "interval", "--eval-interval", "2",
         "--depth-unit-scale-factor", "1"], cli_env)
    (config,) = out.glob("**/config.yml")
    assert "NerfstudioDataParserConfig" in config.read_text()
    assert list(config.parent.glob("nerfstudio_models/step-000000001.ckpt"))


def test_ns_train_multiview_supervision_on_synth_scenes(synth_dir, tmp_path, cli_env):
    out = tmp_path / "runs"
    run([cli("ns-train"), "vq3d-tiny", "--data", str(synth_dir), "--output-dir", str(out), "--max-num-iterations", "2",
         *FAST, "--pipeline.datamanager.use-multiview-supervision", "True"], cli_env)
    assert list(out.glob("**/nerfstudio_models/step-000000001.ckpt"))


def test_one_scene_folder_as_data_says_what_to_pass(tmp_path, cli_env):
    """A single nerfstudio scene given to vq3d-images (issue 17) is refused in one line naming the
    command that trains on its views."""
    write_scenes(tmp_path / "scenes", num_scenes=1, resolution=16, num_views=2, seed=0, num_workers=1, progress=False)
    scene = tmp_path / "scenes" / "scene_00000"
    result = subprocess.run([cli("ns-train"), "vq3d-tiny", "--data", str(scene), "--output-dir", str(tmp_path / "runs"),
                             *FAST], env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vq3d: error: ") and "is one nerfstudio scene" in last
    assert f"nerfstudio-data --data {scene}" in last

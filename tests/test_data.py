"""Dataparser and dataset: layouts, classes, stable split, depth handling, cropping."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import write_image
from PIL import Image

from vq3d_nerfstudio.data.dataparser import Vq3dImagesDataParserConfig
from vq3d_nerfstudio.data.dataset import Vq3dImageDataset, load_disparity, load_image
from vq3d_nerfstudio.errors import DatasetError


def parse(data, split="train", **kwargs):
    return Vq3dImagesDataParserConfig(data=data, **kwargs).setup().get_dataparser_outputs(split=split)


def test_flat_folder_and_canonical_camera(tmp_path):
    for i in range(5):
        write_image(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    train, evals = parse(tmp_path, image_size=64), parse(tmp_path, "val", image_size=64)
    names = sorted(p.name for p in train.image_filenames + evals.image_filenames)
    assert names == [f"img{i}.png" for i in range(5)]
    assert len(evals.image_filenames) >= 1
    cams = train.cameras
    # canonical camera: identity rotation at (0, 0, 2); focal = 32 / tan(25 deg)
    assert torch.allclose(cams.camera_to_worlds[0], torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2]]))
    assert math.isclose(float(cams.fx[0]), 32 / math.tan(math.radians(25)), rel_tol=1e-6)
    assert int(cams.width[0]) == 64 and float(cams.cx[0]) == 32
    assert train.metadata["depth_kind"] == "none" and train.metadata["class_ids"] == [-1] * len(train.image_filenames)


def test_imagenet_layout_class_ids_follow_sorted_folder_names(tmp_path):
    for cls in ["n02", "n01", "n03"]:
        for i in range(3):
            write_image(tmp_path / cls / f"{cls}_{i}.JPEG")
    outputs = parse(tmp_path, eval_fraction=0.0)
    assert outputs.metadata["class_names"] == ["n01", "n02", "n03"]
    for path, class_id in zip(outputs.image_filenames, outputs.metadata["class_ids"]):
        assert path.parent.name == ["n01", "n02", "n03"][class_id]


def test_split_is_stable_when_images_are_added(tmp_path):
    for i in range(40):
        write_image(tmp_path / f"a{i:03d}.png", size=(4, 4))
    before = {p.name for p in parse(tmp_path, "val", eval_fraction=0.2).image_filenames}
    for i in range(40):
        write_image(tmp_path / f"b{i:03d}.png", size=(4, 4))
    after = {p.name for p in parse(tmp_path, "val", eval_fraction=0.2).image_filenames}
    assert before and before == {n for n in after if n.startswith("a")}


def test_synth_scenes_use_frame_zero_and_its_depth(synth_dir):
    outputs = parse(synth_dir, image_size=32)
    assert all(p.name == "frame_00000.png" for p in outputs.image_filenames)
    assert outputs.metadata["depth_kind"] == "z-depth"
    assert all(d.name == "frame_00000.npy" for d in outputs.metadata["depth_filenames"])
    item = Vq3dImageDataset(outputs)[0]
    assert item["image"].shape == (32, 32, 3) and item["disparity"].shape == (32, 32, 1)
    depth = np.load(outputs.metadata["depth_filenames"][0])
    expected = np.where(np.isinf(depth), 0.0, 1.0 / depth)
    assert np.allclose(item["disparity"][..., 0].numpy(), expected, atol=1e-6)
    assert item["disparity_mask"].all()  # inf (sky) is valid: disparity 0


def test_depth_kind_errors_name_the_file(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    np.save(tmp_path / "a.npy", np.ones((12, 20), np.float32))
    with pytest.raises(DatasetError, match=r"a\.npy.*--depth-kind"):
        parse(tmp_path)  # kind unknown
    with pytest.raises(DatasetError, match=r"b\.png.*no depth file"):
        parse(tmp_path, depth_kind="disparity")  # one image lacks depth
    assert parse(tmp_path, depth_kind="none").metadata["depth_filenames"] is None
    (tmp_path / "vq3d_meta.json").write_text(json.dumps({"depth_kind": "disparity"}))
    np.save(tmp_path / "b.npy", np.ones((12, 20), np.float32))
    assert parse(tmp_path).metadata["depth_kind"] == "disparity"


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no images found"):
        parse(tmp_path)
    with pytest.raises(DatasetError, match="no such folder"):
        parse(tmp_path / "missing")


def test_center_crop_and_resize(tmp_path):
    # 6 wide x 2 high: left 2 columns red, middle 2 green, right 2 blue -> centre crop is green
    array = np.zeros((2, 6, 3), np.uint8)
    array[:, :2, 0] = 255
    array[:, 2:4, 1] = 255
    array[:, 4:, 2] = 255
    Image.fromarray(array).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 4)
    assert image.shape == (4, 4, 3)
    assert torch.allclose(image, torch.tensor([0.0, 1.0, 0.0]).expand(4, 4, 3), atol=1e-2)


def test_disparity_from_z_depth_and_bad_shapes(tmp_path):
    depth = np.array([[2.0, np.inf], [np.nan, 0.5]], np.float32)
    np.save(tmp_path / "d.npy", depth)
    disp, mask = load_disparity(tmp_path / "d.npy", "z-depth", (2, 2), 2)
    assert torch.allclose(disp[..., 0], torch.tensor([[0.5, 0.0], [0.0, 2.0]]))
    assert mask[..., 0].tolist() == [[True, True], [False, True]]
    with pytest.raises(DatasetError, match=r"d\.npy.*shape"):
        load_disparity(tmp_path / "d.npy", "z-depth", (3, 2), 2)


# ---- the relative-depth target, made once per image by the dataset -----------------------------------
def _old_model_target(maps, map_mask, group, percentiles=(5.0, 95.0), disparity_range=(0.0, 0.83)):
    """The relative-depth target as the model computed it every training step up to commit 20280c8
    (``Vq3dModel._depth_target``), the reference: anchors of the batch's input maps ``[B, 1, S, S]``,
    then each ray (here every pixel, ``group`` its image) mapped by its image's anchors."""
    from vq3d_nerfstudio.stage1 import losses

    target, mask = maps.reshape(-1, 1), map_mask.reshape(-1, 1)  # per-ray disparity and mask, b-major
    low, high = losses.disparity_anchors(maps, map_mask, percentiles)
    target, ok = losses.canonical_disparity(target, low[group], high[group], disparity_range)
    return target, ok & mask.bool()


@pytest.mark.parametrize("options", [{}, {"percentiles": (10.0, 90.0), "target_range": (0.1, 0.7)}])
def test_dataset_relative_target_is_the_old_per_step_computation(tmp_path, options):
    """Four images whose pseudo-GT has very different ranges (one flat), with unknown (NaN) pixels:
    the items' disparity and mask equal the model's old per-step target at every pixel; the flat one
    says nothing (mask all False). The same for prepared shards' items (``to_item``)."""
    from vq3d_nerfstudio.data.dataset import RelativeDisparityConfig
    from vq3d_nerfstudio.data.shard_dataset import to_item

    size, rng = 12, np.random.default_rng(0)
    (tmp_path / "vq3d_meta.json").write_text(json.dumps({"depth_kind": "disparity"}))
    raw = []
    for i, (scale, shift) in enumerate([(1.0, 0.0), (250.0, -40.0), (0.003, 7.0), (0.0, 3.5)]):
        write_image(tmp_path / f"img{i}.png", size=(size, size))
        depth = (scale * rng.random((size, size)) + shift).astype(np.float32)
        depth[rng.random((size, size)) < 0.15] = np.nan
        np.save(tmp_path / f"img{i}.npy", depth)
        raw.append(torch.from_numpy(depth))
    maps = torch.stack([torch.nan_to_num(d, nan=0.0) for d in raw])[:, None]  # (B, 1, S, S), 0 where unknown
    map_mask = torch.stack([torch.isfinite(d) for d in raw])[:, None]
    group = torch.arange(4).repeat_interleave(size * size)
    config = RelativeDisparityConfig(**options)
    expected, expected_mask = _old_model_target(maps, map_mask, group, config.percentiles, config.target_range)
    expected, expected_mask = expected.reshape(4, size, size), expected_mask.reshape(4, size, size)
    assert bool(expected_mask[:3].any(dim=(1, 2)).all()) and not bool(expected_mask[3].any())

    outputs = parse(tmp_path, image_size=size)
    dataset = Vq3dImageDataset(outputs, relative_disparity=config)
    for index, path in enumerate(outputs.image_filenames):
        i = int(path.stem[3:])
        item = dataset[index]
        assert torch.equal(item["disparity"][..., 0], expected[i]) and torch.equal(item["disparity_mask"][..., 0], expected_mask[i])
        shard_item = to_item({"image": item["image"], "class_id": 0, "disparity": raw[i]}, True, config)
        assert torch.equal(shard_item["disparity"][..., 0], expected[i])
        assert torch.equal(shard_item["disparity_mask"][..., 0], expected_mask[i])


def test_relative_target_options_keep_their_old_flags_runs_and_packages(tmp_path):
    """The options moved from the model to the datamanager: the old flags still set them, a run's
    config.yml saved with them on the model (nerfstudio loads it with yaml.Loader, as here) gives its
    values to the datamanager, and a package whose model holds them loads."""
    import re

    import tyro
    import yaml
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion

    from vq3d_nerfstudio.data.dataset import RelativeDisparityConfig
    from vq3d_nerfstudio.geometry.poses import CanonicalCamera
    from vq3d_nerfstudio.ns.method_configs import build_trainer_config
    from vq3d_nerfstudio.stage1.package import config_from_json, config_to_json

    args = ["vq3d-tiny", "--pipeline.model.relative-disparity-percentiles", "2", "98",
            "--pipeline.model.relative-disparity-range", "0.1", "0.9"]
    parsed = tyro.cli(AnnotatedBaseConfigUnion, args=args).pipeline.datamanager.relative_disparity
    assert parsed == RelativeDisparityConfig(percentiles=(2.0, 98.0), target_range=(0.1, 0.9))

    text = yaml.dump(build_trainer_config("vq3d-tiny"))
    block = re.compile(r"^( *)relative_disparity: !!python/object:\S+RelativeDisparityConfig\n +percentiles: !!python/tuple\n"
                       r"(?: +- [\d.]+\n){2} +target_range: !!python/tuple\n(?: +- [\d.]+\n){2}", re.M)
    assert len(block.findall(text)) == 1
    old = block.sub("", text)
    model_line = re.search(r"^( *)model: !!python/object:\S+Vq3dModelConfig\n", old, re.M)
    indent = model_line[1] + "  "
    fields = (f"{indent}relative_disparity_percentiles: !!python/tuple\n{indent}- 2.0\n{indent}- 98.0\n"
              f"{indent}relative_disparity_range: !!python/tuple\n{indent}- 0.1\n{indent}- 0.9\n")
    old = old[: model_line.end()] + fields + old[model_line.end():]
    loaded = yaml.load(old, Loader=yaml.Loader).pipeline
    assert loaded.datamanager.relative_disparity == RelativeDisparityConfig((2.0, 98.0), (0.1, 0.9))
    assert "relative_disparity_range" not in vars(loaded.model)
    without = yaml.load(block.sub("", text), Loader=yaml.Loader).pipeline  # saved before either had them
    assert without.datamanager.relative_disparity == RelativeDisparityConfig()

    model = build_trainer_config("vq3d-tiny").pipeline.model
    fields = {**config_to_json(model), "relative_disparity_percentiles": [5.0, 95.0], "relative_disparity_range": [0.0, 0.83]}
    assert config_from_json(fields, tmp_path / "config.json", CanonicalCamera()) == config_from_json(
        config_to_json(model), tmp_path / "config.json", CanonicalCamera())

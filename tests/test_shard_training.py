"""Training from `vq3d prepare` shards: the held-out split, the streaming datamanager (epochs, batch
contents, per-rank shards), `ns-train` through the real CLI, and stage 1 under DDP (2 gloo processes)."""

import json
import os
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, cli, run
from PIL import Image

from vq3d_nerfstudio.data.datamanager import Vq3dDataManagerConfig
from vq3d_nerfstudio.data.dataparser import Vq3dImagesDataParserConfig
from vq3d_nerfstudio.data.dataset import Vq3dImageDataset
from vq3d_nerfstudio.data.folders import split_fraction
from vq3d_nerfstudio.data.prepare import prepare_shards
from vq3d_nerfstudio.data.shard_dataset import HeldOut
from vq3d_nerfstudio.data.shard_format import ShardError
from vq3d_nerfstudio.data.shard_stream import ShardReader
from vq3d_nerfstudio.errors import DatasetError
from vq3d_nerfstudio.stage1.quantizer import VQConfig

SIZE = 64  # vq3d-tiny's image size


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two class folders of 10 distinct 80x64 images, each with a z-depth .npy holding one NaN."""
    root = tmp_path_factory.mktemp("photos")
    (root / "vq3d_meta.json").write_text(json.dumps({"depth_kind": "z-depth"}))
    rng = np.random.default_rng(0)
    for i in range(20):
        folder = root / ("birds" if i % 2 else "cars")
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
        depth = np.linspace(1.0, 3.0, 64 * 80, dtype=np.float32).reshape(64, 80) + i
        depth[10, 40] = np.nan
        np.save(folder / f"img{i:02d}.npy", depth)
    return root


@pytest.fixture(scope="module")
def shards_dir(photos, tmp_path_factory) -> Path:
    """The photos at 64 px in 5 shards of 4."""
    out = tmp_path_factory.mktemp("shards")
    prepare_shards(photos, out, resolution=SIZE, shard_size=4)
    return out


def datamanager(data, eval_fraction=0.2, world_size=1, local_rank=0, **kwargs):
    parser = Vq3dImagesDataParserConfig(image_size=SIZE, eval_fraction=eval_fraction)
    config = Vq3dDataManagerConfig(dataparser=parser, data=data, rays_per_image=16, num_workers=0, **kwargs)
    return config.setup(device="cpu", test_mode="val", world_size=world_size, local_rank=local_rank)


def training_keys(shards_dir, rule):
    return sorted(int(s["key"]) for s in ShardReader(shards_dir) if not rule(s["key"], s["source"]))


@pytest.mark.parametrize("eval_fraction", [0.2, 0.001])
def test_shards_hold_out_the_images_a_folder_holds_out(photos, shards_dir, eval_fraction):
    folder = Vq3dImagesDataParserConfig(data=photos, image_size=SIZE, eval_fraction=eval_fraction).setup()
    folder_eval = folder.get_dataparser_outputs("val").metadata
    dm = datamanager(shards_dir, eval_fraction)
    shard_eval = dm.eval_dataset.metadata
    assert sorted(shard_eval["image_keys"]) == sorted(folder_eval["image_keys"]) and len(dm.eval_dataset) >= 1
    if eval_fraction < 0.01:  # nothing under the fraction: both hold out the image with the smallest hash
        assert len(dm.eval_dataset) == 1
    else:  # in shard (hash) order
        assert shard_eval["image_keys"] == sorted(shard_eval["image_keys"], key=split_fraction)
    assert shard_eval["class_names"] == folder_eval["class_names"] == ["birds", "cars"]
    assert shard_eval["depth_kind"] == "z-depth"  # disparity from z-depth files: metric, no alignment
    rule = shard_eval["shard_held_out"]
    preview = dm.train_dataset.metadata["image_keys"]
    assert preview and not set(preview) & set(shard_eval["image_keys"])
    assert all(not rule("", source) for source in preview)
    # eval items equal the folder dataset's items for the same image: pixels, depth, mask, class
    folder_items = Vq3dImageDataset(folder.get_dataparser_outputs("val"))
    for i, source in enumerate(shard_eval["image_keys"]):
        shard_item, folder_item = dm.eval_dataset[i], folder_items[folder_eval["image_keys"].index(source)]
        assert torch.equal(shard_item["image"], folder_item["image"])
        assert torch.equal(shard_item["disparity_mask"], folder_item["disparity_mask"])
        assert not shard_item["disparity_mask"].all()  # the NaN pixel (and its resampled neighbours)
        mask = folder_item["disparity_mask"]
        assert torch.allclose(shard_item["disparity"][mask], folder_item["disparity"][mask])
        assert (shard_item["disparity"][~mask] == 0).all()
        assert int(shard_item["class_id"]) == int(folder_item["class_id"])


def test_stream_runs_past_epochs_with_the_right_tensors(shards_dir):
    dm = datamanager(shards_dir, images_per_batch=3, shuffle_buffer=4)
    rule: HeldOut = dm.train_dataset.metadata["shard_held_out"]
    expected = {int(s["key"]): s for s in ShardReader(shards_dir)}
    train = training_keys(shards_dir, rule)
    assert 10 < len(train) < 20 and len(train) % 3  # batches straddle the epoch boundary
    drawn = []
    for step in range(3 * len(train) // 3 + 1):
        rays, batch = dm.next_train(step)
        keys = batch["image_idx"].tolist()
        drawn += keys
        assert batch["input_images"].shape == (3, 3, SIZE, SIZE)
        assert batch["input_disparity"].shape == (3, 1, SIZE, SIZE)
        assert rays.metadata["batch_idx"].shape == (3 * 16, 1) and batch["disparity"].shape == (3 * 16, 1)
        for b, key in enumerate(keys):
            sample = expected[key]
            assert torch.equal(batch["input_images"][b], sample["image"].permute(2, 0, 1))
            finite = torch.isfinite(sample["disparity"])
            assert torch.equal(batch["input_disparity"][b, 0], torch.where(finite, sample["disparity"], 0.0))
            assert int(batch["class_id"][b]) == sample["class_id"]
        # per-ray targets are the input pixels the rays go through
        flat = batch["input_images"].permute(0, 2, 3, 1).reshape(3, -1, 3)
        assert torch.equal(batch["image"].reshape(3, 16, 3), torch.gather(flat, 1, _pixels(rays, dm)))
    n = len(train)
    epochs = [drawn[k * n : (k + 1) * n] for k in range(3)]
    assert all(sorted(e) == train for e in epochs)  # each epoch: every training image exactly once
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch
    assert not {int(k) for k in rule.keys} & set(drawn)
    # a run resumed at a later step continues from the epoch it had reached
    resumed = datamanager(shards_dir, images_per_batch=3, shuffle_buffer=4)
    epoch = resumed._epoch_at(40)
    assert epoch >= 5
    reader = ShardReader(shards_dir, shuffle_buffer=4, epoch=epoch, exclude=rule)
    assert resumed.next_train(40)[1]["image_idx"].tolist() == [int(s["key"]) for s in reader][:3]


def _pixels(rays, dm):
    """Pixel index (row * width + col) of each ray, from its direction in the canonical camera."""
    camera = dm.train_dataset.cameras[0]
    d = rays.directions / -rays.directions[:, 2:3]
    col = (d[:, 0] * camera.fx[0] + camera.cx[0] - 0.5).round().long()
    row = (-d[:, 1] * camera.fy[0] + camera.cy[0] - 0.5).round().long()
    return (row * SIZE + col).reshape(3, 16, 1).expand(-1, -1, 3)


def test_two_ranks_stream_disjoint_shards_covering_the_training_images(shards_dir):
    rule = datamanager(shards_dir).train_dataset.metadata["shard_held_out"]
    per_rank = []
    for rank in range(2):
        dm = datamanager(shards_dir, images_per_batch=1, shuffle_buffer=4, world_size=2, local_rank=rank)
        count = sum(1 for _ in ShardReader(shards_dir, shuffle_buffer=4, rank=rank, world_size=2, exclude=rule))
        per_rank.append([int(dm.next_train(step)[1]["image_idx"]) for step in range(count)])
    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == training_keys(shards_dir, rule)
    # whole shards per rank where the shard count allows (5 shards: 2 whole each, the last one split)
    shards_of = [Counter(int(k) // 4 for k in keys) for keys in per_rank]
    assert sum(1 for s in range(5) if shards_of[0][s] and shards_of[1][s]) <= 1


def test_wrong_resolution_or_missing_depth_is_one_clear_error(photos, tmp_path):
    prepare_shards(photos, tmp_path / "small", resolution=32, shard_size=50, depth_kind="none")
    with pytest.raises(ShardError, match=r"32 px images but the model's image size is 64 px.*--resolution 64"):
        datamanager(tmp_path / "small")
    parser = Vq3dImagesDataParserConfig(data=tmp_path / "small", image_size=32, depth_kind="z-depth")
    with pytest.raises(ShardError, match="prepared without depth.*--depth-kind none"):
        parser.setup().get_dataparser_outputs("train")
    config = Vq3dDataManagerConfig(dataparser=Vq3dImagesDataParserConfig(image_size=32), data=tmp_path / "small",
                                   images_per_batch=2, rays_per_image=8, num_workers=0)
    dm = config.setup(device="cpu")
    _, batch = dm.next_train(0)
    assert batch["input_images"].shape == (2, 3, 32, 32) and "disparity" not in batch
    # per-file readers (e.g. stage 2's token cache) refuse shard outputs instead of failing on a path
    with pytest.raises(DatasetError, match="point --data at the image folder"):
        Vq3dImageDataset(dm.train_dataparser_outputs)


def test_ns_train_on_shards_through_the_cli(shards_dir, tmp_path, cli_env):
    from nerfstudio.utils.eval_utils import eval_setup

    out = tmp_path / "runs"
    fast = [*FAST]
    fast[fast.index("--pipeline.datamanager.num-workers") + 1] = "1"  # the stream inside a loader worker
    run([cli("ns-train"), "vq3d-tiny", "--data", str(shards_dir), "--output-dir", str(out),
         "--experiment-name", "shards", "--max-num-iterations", "4", *fast], cli_env)
    configs = list(out.glob("shards/vq3d-tiny/*/config.yml"))
    assert len(configs) == 1 and (configs[0].parent / "nerfstudio_models" / "step-000000003.ckpt").exists()
    _, pipeline, _, _ = eval_setup(configs[0], test_mode="inference")
    by_source = {s["source"]: s["image"] for s in ShardReader(shards_dir)}
    for split, dataset in (("eval", pipeline.datamanager.eval_dataset), ("train", pipeline.datamanager.train_dataset)):
        last = len(dataset) - 1
        assert torch.equal(pipeline.load_image(split, last), by_source[dataset.metadata["image_keys"][last]])
        with pytest.raises(IndexError, match=f"the {split} split has {last + 1} images"):
            pipeline.load_image(split, last + 1)

    # stage 2 encodes the same shards (every sample, the same held-out rule)
    from vq3d_nerfstudio.stage2.data import load_token_cache

    run([cli("vq3d-train-stage2"), "--stage1-config", str(configs[0]), "--output-dir", str(tmp_path / "s2"),
         "--model", "nano", "--batch-size", "4", "--max-steps", "2", "--num-workers", "0", "--device", "cpu"], cli_env)
    cache = load_token_cache(next(configs[0].parent.glob("token_cache-*")))
    rule = pipeline.datamanager.eval_dataset.metadata["shard_held_out"]
    assert cache.class_names == ["birds", "cars"]
    assert len(cache.train) == len(training_keys(shards_dir, rule)) and len(cache.train) + len(cache.eval) == 20
    first_eval = pipeline.load_image("eval", 0).permute(2, 0, 1)[None].to(pipeline.model.device)
    assert np.array_equal(cache.eval.codes[0], pipeline.model.encode_to_indices(first_eval)[0].cpu().numpy())


# ------------------------------------------------------------------------------------------------
# DDP: nerfstudio's launcher asserts CUDA and passes CUDA-only device_ids to DDP and barrier, so on a
# CPU the test does what its _distributed_worker + train_loop do, over gloo, with those dropped.


def _ddp_worker(rank: int, world_size: int, port: int, data: str, out: str) -> None:
    import torch.distributed as dist
    from nerfstudio.pipelines import base_pipeline

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    real_ddp, real_barrier = base_pipeline.DDP, dist.barrier

    class CpuDDP(real_ddp):
        def __init__(self, module, device_ids=None, **kwargs):
            super().__init__(module, **kwargs)

    base_pipeline.DDP = CpuDDP
    dist.barrier = lambda *args, device_ids=None, **kwargs: real_barrier(*args, **kwargs)  # noqa: PLW0108 - drops device_ids (gloo rejects it)

    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny")
    config.output_dir, config.experiment_name, config.vis, config.timestamp = Path(out), "ddp", "tensorboard", "run"
    config.max_num_iterations, config.steps_per_save = 3, 100
    config.steps_per_eval_batch = config.steps_per_eval_image = 1000
    dm = config.pipeline.datamanager
    dm.data, dm.images_per_batch, dm.rays_per_image, dm.num_workers = Path(data), 2, 32, 0
    model = config.pipeline.model  # the GAN too: its discriminator step all-reduces outside DDP
    model.quantizer = VQConfig()  # a learned codebook, whose k-means init and restarts must agree across ranks
    gan = model.adversarial
    gan.loss_mult, gan.start_step, gan.ramp_steps, gan.resolution, gan.images_per_batch, gan.r1_interval = 0.1, 0, 1, 8, 2, 1
    torch.manual_seed(rank)  # as nerfstudio seeds each rank (seed + rank): DDP must make them agree
    trainer = config.setup(local_rank=rank, world_size=world_size)
    trainer.setup()
    quantizer = trainer.pipeline.model.quantizer
    quantizer.usage_decay, quantizer.dead_code_threshold = 0.5, 0.3  # unused codes die on the second step
    restarts, keys = [], []
    real_restart, real_next = quantizer.restart_dead_codes, trainer.pipeline.datamanager.next_train
    quantizer.restart_dead_codes = lambda *a: restarts.append(real_restart(*a)) or restarts[-1]
    first = {k: v.clone() for k, v in trainer.pipeline.model.state_dict().items()}

    def next_train(step):
        rays, batch = real_next(step)
        keys.extend(batch["image_idx"].tolist())
        return rays, batch

    trainer.pipeline.datamanager.next_train = next_train
    trainer.train()
    state = trainer.pipeline.model.state_dict()
    torch.save({"state": state, "first": first, "keys": keys, "restarts": restarts}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_stage1_under_ddp_keeps_ranks_identical_on_disjoint_data(shards_dir, tmp_path):
    import torch.multiprocessing as mp

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    mp.spawn(_ddp_worker, args=(2, port, str(shards_dir), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(len(r["keys"]) == 3 * 2 for r in ranks) and not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    assert ranks[0]["restarts"] == ranks[1]["restarts"] and sum(ranks[0]["restarts"]) > 0
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    # every weight, the codebook after restarts, its usage statistics and the discriminator agree
    assert [k for k in state0 if not torch.equal(state0[k], state1[k])] == []
    moved = [k for k in state0 if not torch.equal(state0[k], ranks[0]["first"][k])]
    assert "quantizer.codebook" in moved and "quantizer.code_usage" in moved
    assert any(k.startswith("adversarial.discriminator.") for k in moved) and any(k.startswith("encoder.") for k in moved)
    checkpoints = list(tmp_path.glob("ddp/vq3d-tiny/run/nerfstudio_models/*.ckpt"))
    assert [c.name for c in checkpoints] == ["step-000000002.ckpt"]  # written once, by rank 0

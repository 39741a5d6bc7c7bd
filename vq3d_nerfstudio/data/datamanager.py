"""Streaming datamanager: B images per step from disk through a torch DataLoader, rays at random
pixels of each, every ray tagged with ``metadata["batch_idx"]`` (which image's tri-plane it uses).

It subclasses ``VanillaDataManager`` because ``ns-render`` / ``ns-export`` check for it, but it never
caches images: the built-in datamanagers hold every image in memory, which fails at ImageNet scale.

Two sources, picked by the dataparser from ``--data``:

- a folder of images: a ``DataLoader`` over the per-file dataset, shuffled by ``RandomSampler`` (one
  process) or ``DistributedSampler`` (DDP: each rank a disjoint share), epoch after epoch;
- a ``vq3d prepare`` output: a ``DataLoader`` over :class:`~vq3d_nerfstudio.data.shard_dataset.TrainingStream`,
  which streams the training split from the tar shards without end (a shuffle buffer of raw samples,
  the shard order reshuffled and ``set_epoch`` called at each pass, each DDP rank reading its own
  shards). ``train_dataset`` / ``eval_dataset`` are then the bounded preview and eval sets.

A file that cannot be read (corrupt, truncated, not an image, a bad depth ``.npy``) never stops a
run by default: the dataset replaces the item by the next readable image and lists the file in the
item's ``skipped`` entry, which rides through the DataLoader (a worker process cannot print into the
trainer's log, and its counters would die with it). The datamanager, in the training process, prints
one warning line per bad file with the running count, logs the count as ``data/skipped_files`` and
prints a summary when the process ends. ``--pipeline.datamanager.strict True`` stops at the first
bad file with one line naming it instead. (Prepared shards were validated by ``vq3d prepare``.)

Under DDP the rank is ``torch.distributed``'s global rank (nerfstudio passes the *local* rank, which
repeats across machines).

Outside training (``eval_setup`` puts the pipeline in eval mode), ``next_train`` is what
``ns-export pointcloud`` / ``poisson`` draw rays from: it returns rays of random cameras orbiting the
pivot, without ``batch_idx``, so the model renders its shown scene from all around the input view.
"""

from __future__ import annotations

import atexit
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional, Tuple, Type, Union

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.datamanagers.base_datamanager import DataManager, VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.pixel_samplers import PixelSamplerConfig
from nerfstudio.data.utils.dataloaders import FixedIndicesEvalDataloader, RandIndicesEvalDataloader
from nerfstudio.model_components.ray_generators import RayGenerator
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from vq3d_nerfstudio.data.dataparser import DatasetError, Vq3dImagesDataParserConfig
from vq3d_nerfstudio.data.dataset import SKIPPED_KEY, Vq3dImageDataset


@dataclass
class Vq3dDataManagerConfig(VanillaDataManagerConfig):
    """Streams B images per step from disk and samples rays from each."""

    _target: Type = field(default_factory=lambda: Vq3dDataManager)
    dataparser: Vq3dImagesDataParserConfig = field(default_factory=Vq3dImagesDataParserConfig)
    """The image-collection dataparser."""
    images_per_batch: int = 8
    """Images (hence tri-planes) per training step, per device."""
    rays_per_image: int = 256
    """Random pixels rendered per image per step; 0 renders every pixel."""
    num_workers: int = 2
    """DataLoader worker processes reading and resizing images."""
    seed: int = 0
    """Seed of the shuffling order (and of DistributedSampler under DDP)."""
    strict: bool = False
    """Stop at the first image or depth file that cannot be read, with one error naming it and the fix.
    Without it a bad file is skipped: its place in the batch goes to the next readable image, one
    warning line names the file, the reason and how many have been skipped so far (also logged as
    data/skipped_files), and a summary is printed when the run ends."""
    shuffle_buffer: int = 256
    """Prepared shards only: samples each DataLoader worker holds to shuffle the stream (0: read in
    shard order, the same every epoch). The shard order is reshuffled every epoch as well, and
    `vq3d prepare` already mixes classes across shards. A buffered sample is its stored bytes
    (~0.11 MB at 256 px, ~0.37 MB with depth), so memory is about buffer x workers x that."""
    export_max_yaw_deg: float = 30.0
    """ns-export samples rays from cameras orbiting the pivot with yaw within +-this (degrees) ..."""
    export_max_elevation_deg: float = 15.0
    """... and elevation within +-this: the range the NeRF is trained to hold up in."""


def _ignore_sigint(worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the trainer, which finishes the step and saves a checkpoint
    (a worker killed by the terminal's SIGINT would crash the step instead)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def global_rank(fallback: int) -> int:
    """This process's rank among all processes under ``torch.distributed``, else ``fallback``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return fallback


def dataset_error_message(err: Exception) -> str:
    """The message of a ``DatasetError``, also when a DataLoader worker raised it (torch re-raises it
    in the main process with the worker's whole traceback as the message)."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split("DatasetError: ", 1)[-1]
    return text


def _print_skip_summary(skipped: Dict[str, str]) -> None:
    if skipped:
        names = list(skipped)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        print(f"vq3d: warning: {len(names)} bad file(s) were skipped in this run: {shown}", file=sys.stderr, flush=True)


def _forever(loader: DataLoader) -> Iterator[Dict]:
    """Iterate a DataLoader across epochs, telling a DistributedSampler the epoch."""
    epoch = 0
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class Vq3dDataManager(VanillaDataManager):
    """Train batches: ``(RayBundle [B * n], batch)`` with ``batch["input_images"]`` ``[B, 3, S, S]``,
    per-ray ``image`` ``[B*n, 3]`` targets, optional per-ray ``disparity`` / ``disparity_mask``,
    and ``image_idx`` / ``class_id`` ``[B]`` (``image_idx``: the dataset index, or for prepared
    shards the sample's key, its position in the prepared input list)."""

    config: Vq3dDataManagerConfig
    train_dataset: Vq3dImageDataset  # or ShardImageDataset (prepared shards: the bounded preview)
    eval_dataset: Vq3dImageDataset  # or ShardImageDataset (prepared shards: the bounded eval set)

    def __init__(
        self,
        config: Vq3dDataManagerConfig,
        device: Union[torch.device, str] = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs,
    ):
        self.config = config
        self.device = device
        self.world_size = world_size
        self.local_rank = local_rank
        self.sampler = None
        self.test_mode = test_mode
        self.test_split = "test" if test_mode in ["test", "inference"] else "val"
        if self.config.data is not None:
            self.config.dataparser.data = Path(self.config.data)
        else:
            self.config.data = self.config.dataparser.data
        self.dataparser_config = self.config.dataparser
        self.dataparser = self.dataparser_config.setup()
        self.includes_time = False
        self.train_dataparser_outputs = self.dataparser.get_dataparser_outputs(split="train")
        self.shard_root: Optional[Path] = self.train_dataparser_outputs.metadata.get("shard_root")
        dataset_class = Vq3dImageDataset
        if self.shard_root is not None:
            from vq3d_nerfstudio.data.shard_dataset import ShardImageDataset

            dataset_class = ShardImageDataset
        self.train_dataset = dataset_class(self.train_dataparser_outputs)
        self.eval_dataset = dataset_class(self.dataparser.get_dataparser_outputs(split=self.test_split))
        for dataset in (self.train_dataset, self.eval_dataset):
            if isinstance(dataset, Vq3dImageDataset):
                dataset.strict = config.strict
        self.skipped_files: Dict[str, str] = {}
        """Files skipped so far (path -> the reason), met by any DataLoader worker of this process."""
        self.iter_train_image_dataloader: Optional[Iterator[Dict]] = None
        # Read by ns-export (it sets num_rays_per_batch); training samples pixels itself.
        self.train_pixel_sampler = PixelSamplerConfig(
            num_rays_per_batch=config.images_per_batch * max(1, config.rays_per_image)
        ).setup()
        self.exclude_batch_keys_from_device = []
        DataManager.__init__(self)

    def _loader(self, dataset: Vq3dImageDataset, num_workers: int) -> Iterator[Dict]:
        batch_size = self.config.images_per_batch
        if self.world_size > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=self.world_size, rank=global_rank(self.local_rank), shuffle=True,
                seed=self.config.seed,
            )
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.config.seed))
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            drop_last=len(dataset) >= batch_size * self.world_size,
            persistent_workers=num_workers > 0,
            worker_init_fn=_ignore_sigint,
            pin_memory=torch.device(self.device).type == "cuda",
        )
        return _forever(loader)

    def _shard_loader(self, start_epoch: int) -> Iterator[Dict]:
        """Batches of ``images_per_batch`` training images streamed from the prepared shards."""
        from vq3d_nerfstudio.data.shard_dataset import TrainingStream
        from vq3d_nerfstudio.data.shards import ShardReader

        metadata = self.train_dataset.metadata
        rank = global_rank(self.local_rank)
        reader = ShardReader(
            self.shard_root, shuffle_buffer=self.config.shuffle_buffer, seed=self.config.seed,
            rank=rank, world_size=self.world_size, exclude=metadata["shard_held_out"],
        )
        stream = TrainingStream(reader, use_depth=metadata["depth_kind"] != "none", start_epoch=start_epoch)
        num_workers = self.config.num_workers
        loader = DataLoader(
            stream,
            batch_size=self.config.images_per_batch,
            num_workers=num_workers,
            drop_last=True,
            worker_init_fn=_ignore_sigint,
            pin_memory=torch.device(self.device).type == "cuda",
        )
        yield from loader
        raise DatasetError(
            f"{self.shard_root}: rank {rank} of {self.world_size} has no training images to stream"
            f"{f' in any of its {num_workers} loader workers' if num_workers > 1 else ''}; prepare more "
            "images, lower --pipeline.datamanager.dataparser.eval-fraction, or use fewer ranks or workers"
        )

    def setup_train(self):
        if self.shard_root is None:
            self.iter_train_image_dataloader = self._loader(self.train_dataset, self.config.num_workers)
        # Prepared shards: the stream starts at the first next_train, at the epoch that step implies.
        self.train_ray_generator = RayGenerator(self.train_dataset.cameras.to(self.device))

    def setup_eval(self):
        self.iter_eval_image_dataloader = self._loader(self.eval_dataset, 0)
        self.eval_ray_generator = RayGenerator(self.eval_dataset.cameras.to(self.device))
        self.fixed_indices_eval_dataloader = FixedIndicesEvalDataloader(input_dataset=self.eval_dataset, device=self.device)
        self.eval_dataloader = RandIndicesEvalDataloader(input_dataset=self.eval_dataset, device=self.device)

    def _next(self, iterator: Iterator, step: int):
        """The next item of a loader (a batch dict, or ``(camera, batch)``); the bad files skipped to
        make it are reported, and a ``DatasetError`` (strict, or nothing readable left) ends the run
        in one line."""
        try:
            item = next(iterator)
        except DatasetError as err:
            hint = " (--pipeline.datamanager.strict True; without it bad files are skipped and reported)"
            raise SystemExit(f"vq3d: error: {dataset_error_message(err)}{hint if self.config.strict else ''}") from None
        self.report_skipped(item[1] if isinstance(item, tuple) else item, step)
        return item

    def report_skipped(self, batch: Dict, step: int) -> None:
        """Take the ``skipped`` entry out of ``batch`` and warn once per newly skipped file."""
        entries: Union[None, str, List[str]] = batch.pop(SKIPPED_KEY, None)
        if not entries:
            return
        before = len(self.skipped_files)
        for entry in [entries] if isinstance(entries, str) else entries:
            for line in entry.splitlines():
                path, _, reason = line.partition("\t")
                if path in self.skipped_files:
                    continue
                self.skipped_files[path] = reason
                count = len(self.skipped_files)
                print(
                    f"vq3d: warning: skipped {reason} ({count} bad file{'s' if count > 1 else ''} so far; "
                    "--pipeline.datamanager.strict True stops at the first instead)",
                    file=sys.stderr, flush=True,
                )
        if len(self.skipped_files) > before:
            if before == 0:
                atexit.register(_print_skip_summary, self.skipped_files)
            from nerfstudio.utils import writer

            writer.put_scalar("data/skipped_files", len(self.skipped_files), step)

    def _rays_for_images(self, images: Dict, ray_generator: RayGenerator) -> Tuple[RayBundle, Dict]:
        image = images["image"].to(self.device)  # (B, S, S, 3)
        num_images, height, width = image.shape[:3]
        per_image = self.config.rays_per_image
        if per_image <= 0 or per_image >= height * width:
            pixels = torch.arange(height * width, device=self.device).expand(num_images, -1)
        else:
            pixels = torch.randint(0, height * width, (num_images, per_image), device=self.device)
        per_image = pixels.shape[1]
        batch_idx = torch.arange(num_images, device=self.device).repeat_interleave(per_image)
        rows, cols = (pixels // width).reshape(-1), (pixels % width).reshape(-1)
        camera_idx = images.get("camera_idx", images["image_idx"]).to(self.device)[batch_idx]
        ray_bundle = ray_generator(torch.stack([camera_idx, rows, cols], dim=-1))
        ray_bundle.metadata["batch_idx"] = batch_idx[:, None]
        batch = {
            "input_images": image.permute(0, 3, 1, 2).contiguous(),
            "image": image[batch_idx, rows, cols],
            "image_idx": images["image_idx"],
            "class_id": images["class_id"],
        }
        if "disparity" in images:
            batch["disparity"] = images["disparity"].to(self.device)[batch_idx, rows, cols]
            batch["disparity_mask"] = images["disparity_mask"].to(self.device)[batch_idx, rows, cols]
            batch["input_disparity"] = images["disparity"].to(self.device).permute(0, 3, 1, 2)  # (B, 1, S, S)
            batch["input_disparity_mask"] = images["disparity_mask"].to(self.device).permute(0, 3, 1, 2)
        return ray_bundle, batch

    def next_train(self, step: int) -> Tuple[RayBundle, Dict]:
        self.train_count += 1
        if not self.training:
            return self.orbit_rays(self.train_pixel_sampler.num_rays_per_batch), {}
        if self.iter_train_image_dataloader is None and self.shard_root is not None:
            self.iter_train_image_dataloader = self._shard_loader(self._epoch_at(step))
        return self._rays_for_images(self._next(self.iter_train_image_dataloader, step), self.train_ray_generator)

    def _epoch_at(self, step: int) -> int:
        """The shard epoch a run (resumed) at ``step`` has reached, estimated from the index, so a
        resumed run goes on with new shuffles instead of replaying epoch 0's order."""
        from vq3d_nerfstudio.data.shard_dataset import num_training_samples

        metadata = self.train_dataset.metadata
        per_epoch = num_training_samples(metadata["shard_index"], metadata["shard_held_out"])
        return step * self.config.images_per_batch * self.world_size // per_epoch

    def orbit_rays(self, num_rays: int, num_cameras: int = 64) -> RayBundle:
        """``num_rays`` rays at random pixels of ``num_cameras`` random cameras orbiting the pivot
        (at the canonical distance, within the export yaw/elevation range), no ``batch_idx``."""
        from vq3d_nerfstudio.data.dataparser import square_pinhole_cameras
        from vq3d_nerfstudio.gan import sample_novel_poses

        parser = self.config.dataparser
        size = parser.image_size
        poses = sample_novel_poses(
            num_cameras, parser.camera_distance, self.config.export_max_yaw_deg, self.config.export_max_elevation_deg
        )
        cameras = square_pinhole_cameras(poses, size, parser.fov_deg).to(self.device)
        index = torch.stack(
            [torch.randint(0, num_cameras, (num_rays,)), torch.randint(0, size, (num_rays,)), torch.randint(0, size, (num_rays,))],
            dim=-1,
        ).to(self.device)
        return RayGenerator(cameras)(index)

    def next_eval(self, step: int) -> Tuple[RayBundle, Dict]:
        self.eval_count += 1
        return self._rays_for_images(self._next(self.iter_eval_image_dataloader, step), self.eval_ray_generator)

    def next_eval_image(self, step: int) -> Tuple[Cameras, Dict]:
        if len(self.eval_dataset) == 0:
            raise ValueError("No eval images")
        camera, batch = self._next(iter(self.eval_dataloader), step)
        return camera, batch

    def get_train_rays_per_batch(self) -> int:
        return self.config.images_per_batch * self.config.rays_per_image

    def get_eval_rays_per_batch(self) -> int:
        return self.get_train_rays_per_batch()

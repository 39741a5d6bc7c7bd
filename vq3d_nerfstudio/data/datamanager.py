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
bad file with one line naming it instead (a ``DatasetError`` that the trainer prints; from a worker it
arrives as itself: :class:`~vq3d_nerfstudio.data.workers.ErrorCarryingLoader`). Prepared shards follow
the same policy: a sample that cannot be decoded (a damaged image, a missing depth member) is skipped and reported as ``<shard>:<key>``.

Under DDP the rank is ``torch.distributed``'s global rank (nerfstudio passes the *local* rank, which
repeats across machines).

Any nerfstudio dataparser can feed it (``ns-train vq3d-tiny nerfstudio-data --data <capture>``,
``blender-data``, ``colmap``, ...): its images become single training images
(:func:`~vq3d_nerfstudio.data.views.single_image_outputs`). With ``use_multiview_supervision`` and posed
data (those dataparsers, or ``vq3d synth`` scene folders) every input image brings other views of
its scene, and their rays are rendered from their own cameras relative to the input view
(:class:`~vq3d_nerfstudio.data.views.MultiviewDataset`); one ray builder serves both,
:meth:`Vq3dDataManager._view_rays` (a single image is one view).

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
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.configs.dataparser_configs import AnnotatedDataParserUnion
from nerfstudio.data.datamanagers.base_datamanager import DataManager, VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.dataparsers.base_dataparser import DataParserConfig
from nerfstudio.data.pixel_samplers import PixelSamplerConfig
from nerfstudio.data.utils.dataloaders import FixedIndicesEvalDataloader, RandIndicesEvalDataloader
from nerfstudio.model_components.ray_generators import RayGenerator
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from vq3d_nerfstudio.checks import (
    ElevationRange,
    NonNegativeInt,
    PositiveInt,
    YawRange,
    ranged,
    renamed,
    under_current_names,
)
from vq3d_nerfstudio.data.dataparser import Vq3dImagesDataParserConfig
from vq3d_nerfstudio.data.dataset import SKIPPED_KEY, DepthCoverage, RelativeDisparityConfig, Vq3dImageDataset
from vq3d_nerfstudio.data.shard_dataset import ShardImageDataset, TrainingStream, num_training_samples, relative_target
from vq3d_nerfstudio.data.shard_stream import ShardReader
from vq3d_nerfstudio.data.views import (
    MultiviewDataset,
    check_perspective,
    posed_views_from_scene_files,
    single_image_outputs,
)
from vq3d_nerfstudio.data.workers import ErrorCarryingLoader
from vq3d_nerfstudio.errors import DatasetError
from vq3d_nerfstudio.geometry.cameras import orbit_rays, ray_generator
from vq3d_nerfstudio.geometry.poses import CanonicalCamera


@dataclass
class Vq3dDataManagerConfig(VanillaDataManagerConfig):
    """Streams B images per step from disk and samples rays from each."""

    _target: Type = field(default_factory=lambda: Vq3dDataManager)
    dataparser: AnnotatedDataParserUnion = field(default_factory=Vq3dImagesDataParserConfig)
    """vq3d-images (folders of images or `vq3d synth` scenes, the default), or any nerfstudio dataparser
    (nerfstudio-data, blender-data, colmap, ...: each of its images one training input). Choose one
    by its subcommand after the method, e.g. `ns-train vq3d-tiny nerfstudio-data --data <capture>`;
    its options follow it (`vq3d-images --eval-fraction 0`)."""
    image_size: ranged(Optional[int], 1) = None
    """Side images from a nerfstudio dataparser are cropped and resized to; None: the model's image
    size (the pipeline fills it in). vq3d-images has its own --image-size."""
    use_multiview_supervision: renamed(bool, "--pipeline.datamanager.multiview-supervision") = False
    """Beyond the paper: with posed data (`vq3d synth` scene folders, nerfstudio dataparsers) encode one
    view and supervise renders from other views of its scene as well, their cameras relative to the
    input view (the canonical alignment and scale of `vq3d eval`). The rays per image are shared
    between the input view and the supervising views."""
    multiview_views: PositiveInt = 2
    """Multi-view supervision: other views of the scene drawn per input image each step."""
    relative_disparity: RelativeDisparityConfig = field(default_factory=RelativeDisparityConfig)
    """Relative pseudo-GT disparity (depth kind 'disparity'): how the datasets map each image's range
    onto the canonical scene's disparity, the depth loss's target, once per image as they read it."""
    train_num_rays_per_batch: int = -1
    """nerfstudio's knob, honoured when set (> 0): rays per step, shared between the images of the
    step (at least one each); -1: images_per_batch x rays_per_image."""
    train_num_images_to_sample_from: int = -1
    """nerfstudio's knob, honoured when set (> 0): at most this many images per step; -1: images_per_batch."""
    images_per_batch: PositiveInt = 8
    """Images (hence tri-planes) per training step, per device."""
    rays_per_image: NonNegativeInt = 256
    """Random pixels rendered per image per step; 0 renders every pixel."""
    num_workers: NonNegativeInt = 2
    """DataLoader worker processes reading and resizing images."""
    seed: int = 0
    """Seed of the shuffling order (and of DistributedSampler under DDP)."""
    strict: bool = False
    """Stop at the first image or depth file that cannot be read, with one error naming it and the fix.
    Without it a bad file is skipped: its place in the batch goes to the next readable image, one
    warning line names the file, the reason and how many have been skipped so far (also logged as
    data/skipped_files), and a summary is printed when the run ends."""
    shuffle_buffer: NonNegativeInt = 256
    """Prepared shards only: samples each DataLoader worker holds to shuffle the stream (0: read in
    shard order, the same every epoch). The shard order is reshuffled every epoch as well, and
    `vq3d prepare` already mixes classes across shards. A buffered sample is its stored bytes
    (~0.11 MB at 256 px, ~0.37 MB with depth), so memory is about buffer x workers x that."""
    export_max_yaw_deg: YawRange = 30.0
    """ns-export samples rays from cameras orbiting the pivot with yaw within +-this (degrees) ..."""
    export_max_elevation_deg: ElevationRange = 15.0
    """... and elevation within +-this: the range the NeRF is trained to hold up in."""

    def __setstate__(self, state: Dict) -> None:
        """A ``config.yml`` saved before the boolean was named ``use_multiview_supervision`` loads its
        value; one saved before ``relative_disparity`` was the datamanager's gets its defaults here and
        the model's old values from the pipeline
        (:meth:`~vq3d_nerfstudio.ns.pipeline.Vq3dPipelineConfig.__setstate__`). Removal:
        with the old flags, at version 0.2.0."""
        self.__dict__.update(under_current_names(Vq3dDataManagerConfig, state))
        self.__dict__.setdefault("relative_disparity", RelativeDisparityConfig())


def data_canonical_camera(dataparser: DataParserConfig) -> CanonicalCamera:
    """The camera the data's images are seen by: vq3d-images' own (``--canonical-camera.*``); a
    nerfstudio dataparser's images get the default :class:`CanonicalCamera` (they have no option
    for it). The model's must equal it (:func:`vq3d_nerfstudio.ns.pipeline.check_canonical_cameras`)."""
    if isinstance(dataparser, Vq3dImagesDataParserConfig):
        return dataparser.canonical_camera
    return CanonicalCamera()


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
        if isinstance(self.dataparser_config, Vq3dImagesDataParserConfig):
            self.train_dataparser_outputs = self.dataparser.get_dataparser_outputs(split="train")
            eval_outputs = self.dataparser.get_dataparser_outputs(split=self.test_split)
        else:
            self.train_dataparser_outputs = self._single_images("train")
            eval_outputs = self._single_images(self.test_split, fallback=self.train_dataparser_outputs)
        self.shard_root: Optional[Path] = self.train_dataparser_outputs.metadata.get("shard_root")
        dataset_class = Vq3dImageDataset
        if self.shard_root is not None:
            dataset_class = ShardImageDataset
        relative = config.relative_disparity
        if config.use_multiview_supervision:
            self.train_dataset = self._multiview_dataset()
        else:
            self.train_dataset = dataset_class(self.train_dataparser_outputs, relative_disparity=relative)
        self.eval_dataset = dataset_class(eval_outputs, relative_disparity=relative)
        for dataset in (self.train_dataset, self.eval_dataset):
            if isinstance(dataset, (Vq3dImageDataset, ShardImageDataset)):
                dataset.strict = config.strict
        self.skipped_files: Dict[str, str] = {}
        """Files skipped so far (path -> the reason), met by any DataLoader worker of this process."""
        self.depth_coverage = DepthCoverage(self.train_dataparser_outputs.metadata.get("depth_kind", "none"))
        self.iter_train_image_dataloader: Optional[Iterator[Dict]] = None
        # Read by ns-export (it sets num_rays_per_batch); training samples pixels itself.
        self.train_pixel_sampler = PixelSamplerConfig(
            num_rays_per_batch=self.images_per_step * max(1, self.rays_per_image)
        ).setup()
        self.exclude_batch_keys_from_device = []
        DataManager.__init__(self)

    @property
    def images_per_step(self) -> int:
        """``images_per_batch``, capped by nerfstudio's ``train_num_images_to_sample_from`` when set."""
        cap = self.config.train_num_images_to_sample_from
        return min(self.config.images_per_batch, cap) if cap > 0 else self.config.images_per_batch

    @property
    def rays_per_image(self) -> int:
        """``rays_per_image``, or nerfstudio's ``train_num_rays_per_batch`` shared by the step's images when set."""
        total = self.config.train_num_rays_per_batch
        return max(1, total // self.images_per_step) if total > 0 else self.config.rays_per_image

    def canonical(self) -> Tuple[int, CanonicalCamera]:
        """``(image_size, canonical camera)`` of the data: vq3d-images' own, else the model's image
        size and :func:`data_canonical_camera`."""
        parser = self.config.dataparser
        size = parser.image_size if isinstance(parser, Vq3dImagesDataParserConfig) else None
        return size or self.config.image_size or Vq3dImagesDataParserConfig.image_size, data_canonical_camera(parser)

    def _dataparser_name(self) -> str:
        from nerfstudio.configs.dataparser_configs import all_dataparsers

        kind = type(self.config.dataparser)
        return next((name for name, cfg in all_dataparsers.items() if type(cfg) is kind), kind.__name__)

    def _single_images(self, split: str, fallback=None):
        """A nerfstudio dataparser's ``split`` as single images (an empty eval split: ``fallback``,
        the training images, as vq3d-images evaluates a one-image folder on its image). Its failures
        and a dataparser without images are one-line ``DatasetError``s."""
        name = self._dataparser_name()
        try:
            outputs = self.dataparser.get_dataparser_outputs(split=split)
        except (AssertionError, OSError, KeyError, ValueError, IndexError, RuntimeError) as err:
            raise DatasetError(
                f"{name} could not read {self.config.dataparser.data} ({type(err).__name__}: "
                f"{' '.join(str(err).split()) or 'no message'}); check --data, or pick the dataparser that fits the data"
            ) from None
        if fallback is not None and not outputs.image_filenames:
            return fallback
        if split == "train":
            self._posed_train_outputs = outputs  # the dataparser's own, for multi-view's camera check
        return single_image_outputs(outputs, name, *self.canonical())

    def _multiview_dataset(self) -> Vq3dImageDataset:
        """The training images with the supervising views of their scenes; one line when the data
        has no poses (a folder of single images, prepared shards) or no pinhole cameras: a one-line
        ``DatasetError``."""
        outputs, config = self.train_dataparser_outputs, self.config
        metadata = outputs.metadata
        if isinstance(config.dataparser, Vq3dImagesDataParserConfig):
            scene_files = metadata.get("scene_files")
            if not scene_files:
                raise DatasetError(
                    f"{config.dataparser.data}: --pipeline.datamanager.use-multiview-supervision needs posed views: "
                    "`vq3d synth` scene folders (`--num-views` > 1) or a nerfstudio dataparser "
                    "(nerfstudio-data, blender-data, colmap, ...); this data holds single images"
                )
            views = posed_views_from_scene_files(scene_files)
            firsts = [i for i in range(len(views.images)) if i == 0 or views.scene_ids[i] != views.scene_ids[i - 1]]
            metadata["posed_views"], metadata["input_views"] = views, firsts  # frame 0: the input, as in vq3d eval
            if metadata.get("depth_kind") == "z-depth":
                distance = self.canonical()[1].distance
                metadata["depth_scales"] = [views.depth_scale * views.alignment(v, distance)[1] for v in firsts]
        else:
            check_perspective(self._posed_train_outputs, self._dataparser_name())
        if config.multiview_views < 1:
            raise DatasetError("--pipeline.datamanager.multiview-views must be >= 1")
        return MultiviewDataset(outputs, config.multiview_views, relative_disparity=config.relative_disparity)

    def _loader(self, dataset: Vq3dImageDataset, num_workers: int) -> Iterator[Dict]:
        batch_size = self.images_per_step
        if self.world_size > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=self.world_size, rank=global_rank(self.local_rank), shuffle=True,
                seed=self.config.seed,
            )
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.config.seed))
        loader = ErrorCarryingLoader(
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
        metadata = self.train_dataset.metadata
        rank = global_rank(self.local_rank)
        reader = ShardReader(
            self.shard_root, shuffle_buffer=self.config.shuffle_buffer, seed=self.config.seed,
            rank=rank, world_size=self.world_size, exclude=metadata["shard_held_out"],
        )
        stream = TrainingStream(
            reader, use_depth=metadata["depth_kind"] != "none", start_epoch=start_epoch, strict=self.config.strict,
            relative=relative_target(metadata["depth_kind"], self.config.relative_disparity),
        )
        num_workers = self.config.num_workers
        loader = ErrorCarryingLoader(
            stream,
            batch_size=self.images_per_step,
            num_workers=num_workers,
            drop_last=True,
            worker_init_fn=_ignore_sigint,
            pin_memory=torch.device(self.device).type == "cuda",
        )
        yield from loader
        raise DatasetError(
            f"{self.shard_root}: rank {rank} of {self.world_size} has no training images to stream"
            f"{f' in any of its {num_workers} loader workers' if num_workers > 1 else ''}; prepare more "
            "images, lower vq3d-images --eval-fraction, or use fewer ranks or workers"
        )

    def setup_train(self):
        if self.shard_root is None:
            self.iter_train_image_dataloader = self._loader(self.train_dataset, self.config.num_workers)
        # Prepared shards: the stream starts at the first next_train, at the epoch that step implies.
        self.train_ray_generator = ray_generator(self.train_dataset.cameras.to(self.device))

    def setup_eval(self):
        self.iter_eval_image_dataloader = self._loader(self.eval_dataset, 0)
        self.eval_ray_generator = ray_generator(self.eval_dataset.cameras.to(self.device))
        self.fixed_indices_eval_dataloader = FixedIndicesEvalDataloader(input_dataset=self.eval_dataset, device=self.device)
        self.eval_dataloader = RandIndicesEvalDataloader(input_dataset=self.eval_dataset, device=self.device)

    def _next(self, iterator: Iterator, step: int):
        """The next item of a loader (a batch dict, or ``(camera, batch)``); the bad files skipped to
        make it are reported. A ``DatasetError`` (strict, or nothing readable left) passes on, a
        strict one saying why the file was not skipped."""
        try:
            item = next(iterator)
        except DatasetError as err:
            if not self.config.strict:
                raise
            hint = "(--pipeline.datamanager.strict True; without it bad files are skipped and reported)"
            raise DatasetError(f"{err} {hint}") from None
        self.report_skipped(item[1] if isinstance(item, tuple) else item, step)
        self.depth_coverage.add(item[1] if isinstance(item, tuple) else item)  # warns once if almost none is valid
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

    def _view_cameras(self, images: Dict, height: int, width: int) -> Cameras:
        """The ``B * V`` pinhole cameras of a multi-view batch (``view_poses`` in each input's canonical
        frame, ``view_intrinsics``), camera ``b * V + v`` view ``v`` of image ``b``."""
        cams = images["view_poses"].shape[0] * images["view_poses"].shape[1]
        intrinsics = images["view_intrinsics"].to(self.device).reshape(cams, 4)
        return Cameras(
            camera_to_worlds=images["view_poses"].to(self.device).reshape(cams, 3, 4),
            fx=intrinsics[:, 0:1], fy=intrinsics[:, 1:2], cx=intrinsics[:, 2:3], cy=intrinsics[:, 3:4],
            width=torch.full((cams, 1), width, dtype=torch.long), height=torch.full((cams, 1), height, dtype=torch.long),
            camera_type=CameraType.PERSPECTIVE,
        ).to(self.device)

    def _view_rays(self, images: Dict, generator: RayGenerator) -> Tuple[RayBundle, Dict]:
        """Rays of ``B`` images with ``V`` views each, view 0 the input, at random pixels of each view's
        own image, every ray with its input's ``batch_idx``; ``rays_per_image`` is shared by the ``V``
        views (at least one ray each).

        A single-image batch is ``V = 1``: image ``b`` is seen by ``generator``'s camera
        ``camera_idx[b]`` (else ``image_idx[b]``). A multi-view batch (``view_images``, see
        :class:`~vq3d_nerfstudio.data.views.MultiviewDataset`) renders each view from its own camera
        (:meth:`_view_cameras`); ``generator`` is unused.

        Returns:
            ``(RayBundle [R], batch)``: ``input_images`` ``[B, 3, S, S]``, per-ray ``image`` ``[R, 3]``,
            ``image_idx`` / ``class_id`` ``[B]``; with ``V > 1`` ``view_idx`` ``[R]`` (the ray's view);
            with depth per-ray ``disparity`` / ``disparity_mask`` ``[R, 1]`` (the items' targets) and
            the inputs' maps ``input_disparity`` / ``input_disparity_mask`` ``[B, 1, S, S]``.
        """
        device = self.device
        if "view_images" in images:
            views = images["view_images"].to(device)  # (B, V, S, S, 3)
            disparity, mask = images.get("view_disparity"), images.get("view_disparity_mask")  # (B, V, S, S, 1)
            generator = ray_generator(self._view_cameras(images, *views.shape[2:4]))
            camera_of_view = torch.arange(views.shape[0] * views.shape[1], device=device)
        else:
            views = images["image"].to(device)[:, None]  # (B, 1, S, S, 3)
            disparity, mask = (images[key][:, None] if key in images else None for key in ("disparity", "disparity_mask"))
            camera_of_view = images.get("camera_idx", images["image_idx"]).to(device)
        num_images, num_views, height, width = views.shape[:4]
        cams = num_images * num_views
        per_image = self.rays_per_image
        if per_image <= 0 or per_image >= num_views * height * width:
            pixels = torch.arange(height * width, device=device).expand(cams, -1)
        else:
            pixels = torch.randint(0, height * width, (cams, max(1, per_image // num_views)), device=device)
        view = torch.arange(cams, device=device).repeat_interleave(pixels.shape[1])  # b * V + v
        rows, cols = (pixels // width).reshape(-1), (pixels % width).reshape(-1)
        ray_bundle = generator(torch.stack([camera_of_view[view], rows, cols], dim=-1))
        ray_bundle.metadata["batch_idx"] = (view // num_views)[:, None]
        batch = {
            "input_images": views[:, 0].permute(0, 3, 1, 2).contiguous(),
            "image": views.reshape(cams, height, width, 3)[view, rows, cols],
            "image_idx": images["image_idx"],
            "class_id": images["class_id"],
        }
        if num_views > 1:
            batch["view_idx"] = view % num_views
        if disparity is not None:
            disparity, mask = disparity.to(device), mask.to(device)
            batch["disparity"] = disparity.reshape(cams, height, width, 1)[view, rows, cols]
            batch["disparity_mask"] = mask.reshape(cams, height, width, 1)[view, rows, cols]
            batch["input_disparity"] = disparity[:, 0].permute(0, 3, 1, 2)  # (B, 1, S, S)
            batch["input_disparity_mask"] = mask[:, 0].permute(0, 3, 1, 2)
        return ray_bundle, batch

    def next_train(self, step: int) -> Tuple[RayBundle, Dict]:
        self.train_count += 1
        if not self.training:
            return self.orbit_rays(self.train_pixel_sampler.num_rays_per_batch), {}
        if self.iter_train_image_dataloader is None and self.shard_root is not None:
            self.iter_train_image_dataloader = self._shard_loader(self._epoch_at(step))
        return self._view_rays(self._next(self.iter_train_image_dataloader, step), self.train_ray_generator)

    def _epoch_at(self, step: int) -> int:
        """The shard epoch a run (resumed) at ``step`` has reached, estimated from the index, so a
        resumed run goes on with new shuffles instead of replaying epoch 0's order."""
        metadata = self.train_dataset.metadata
        per_epoch = num_training_samples(metadata["shard_index"], metadata["shard_held_out"])
        return step * self.config.images_per_batch * self.world_size // per_epoch

    def orbit_rays(self, num_rays: int, num_cameras: int = 64) -> RayBundle:
        """``num_rays`` rays at random pixels of ``num_cameras`` random cameras orbiting the pivot
        (at the canonical distance, within the export yaw/elevation range), no ``batch_idx``."""
        size, camera = self.canonical()
        return orbit_rays(
            num_rays, size, camera.distance, camera.fov_deg, self.config.export_max_yaw_deg, self.config.export_max_elevation_deg,
            self.device, num_cameras,
        )

    def next_eval(self, step: int) -> Tuple[RayBundle, Dict]:
        self.eval_count += 1
        return self._view_rays(self._next(self.iter_eval_image_dataloader, step), self.eval_ray_generator)

    def next_eval_image(self, step: int) -> Tuple[Cameras, Dict]:
        if len(self.eval_dataset) == 0:
            raise ValueError("No eval images")
        camera, batch = self._next(iter(self.eval_dataloader), step)
        return camera, batch

    def get_train_rays_per_batch(self) -> int:
        return self.images_per_step * self.rays_per_image

    def get_eval_rays_per_batch(self) -> int:
        return self.get_train_rays_per_batch()

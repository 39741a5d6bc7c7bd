"""Prepared shards (``vq3d prepare``) as nerfstudio data: the held-out split, small eval and preview
datasets read by byte offset, and the endless per-rank training stream.

**Split.** An image is held out when ``split_fraction(source) < eval_fraction``. This is the rule a
plain folder uses, applied to the same relative path, so an image is held out whether you train on
its folder or on its shards. ``vq3d prepare`` orders inputs by the same sha1, so the held-out images
are the *first* samples (the leading shards) and training images come after them. A collection too
small to have any image under the fraction holds out its first sample, as a folder does.

**What is read when.** Training streams every training image through :class:`TrainingStream` (a
:class:`ShardReader` under the hood: shuffle buffer, per-rank shard split, epoch after epoch), so
the collection never sits in memory. Everything else nerfstudio reads by index (``ns-eval``, eval
batches, the viewer's image controls and camera frustums, ``ns-render``, ``pipeline.load_image``)
sees two small sets that the dataparser finds by reading tar headers: the first
``shard_eval_images`` held-out samples (scanning forward from shard 0 up to the first training
sample) and a preview of the last ``shard_preview_images`` training samples (scanning the last
shards backwards). Each item is read by its byte offset when asked for; nothing is cached.

**Where from.** The dataparser's sets need local files (byte offsets, ``tarfile``); the training
stream is webdataset's and also reads shards from URLs, ``pipe:`` commands and brace patterns
(:class:`ShardReader` takes any of them; see :mod:`vq3d_nerfstudio.data.shard_sources`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Union

import torch
from nerfstudio.data.datasets.base_dataset import InputDataset

from vq3d_nerfstudio.data.dataset import (
    MAX_REPLACEMENT_TRIES,
    SKIPPED_KEY,
    RelativeDisparityConfig,
    item_or_next_readable,
    nothing_readable,
    skip_entry,
)
from vq3d_nerfstudio.data.folders import split_fraction
from vq3d_nerfstudio.data.shard_access import SampleLocation, read_sample, scan_shard
from vq3d_nerfstudio.data.shard_format import FORMAT_NAME, INDEX_NAME, ShardError, decode_sample
from vq3d_nerfstudio.data.shard_stream import ShardReader


def is_prepared_folder(root: Path) -> bool:
    """Whether ``root`` holds a ``vq3d prepare`` output (an ``index.json`` of the shard format)."""
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        return False
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("format") == FORMAT_NAME


@dataclass(frozen=True)
class HeldOut:
    """``(key, source) -> True`` for held-out samples. Picklable (DataLoader workers)."""

    eval_fraction: float
    keys: FrozenSet[str] = frozenset()
    """Held out besides the fraction: the first sample, when nothing falls under the fraction."""

    def __call__(self, key: str, source: str) -> bool:
        return key in self.keys or split_fraction(source) < self.eval_fraction


def held_out_rule(root: Path, index: Dict[str, Any], eval_fraction: float) -> HeldOut:
    """The held-out rule for this collection (reads the first sample's source, nothing more)."""
    if eval_fraction <= 0:
        return HeldOut(0.0)
    for entry in index["shards"]:
        for first in scan_shard(Path(root) / entry["name"]):
            if split_fraction(first.source) < eval_fraction:
                return HeldOut(eval_fraction)
            return HeldOut(eval_fraction, frozenset({first.key}))  # tiny collection: as a folder does
    return HeldOut(eval_fraction)


def eval_locations(root: Path, index: Dict[str, Any], rule: HeldOut, max_images: int) -> List[SampleLocation]:
    """The first ``max_images`` held-out samples in key order. Held-out samples come first (see the
    module docstring), so the scan stops at the first training sample."""
    found: List[SampleLocation] = []
    for entry in index["shards"]:
        for location in scan_shard(Path(root) / entry["name"]):
            if not rule(location.key, location.source):
                return found
            found.append(location)
            if len(found) >= max_images:
                return found
    return found


def preview_locations(root: Path, index: Dict[str, Any], rule: HeldOut, max_images: int) -> List[SampleLocation]:
    """The last ``max_images`` training samples in key order, read from the last shards backwards."""
    found: List[SampleLocation] = []
    for entry in reversed(index["shards"]):
        shard = [loc for loc in scan_shard(Path(root) / entry["name"]) if not rule(loc.key, loc.source)]
        found = shard + found
        if len(found) >= max_images:
            break
    return found[len(found) - max_images :] if len(found) > max_images else found


def to_item(sample: Dict[str, Any], use_depth: bool, relative: Optional[RelativeDisparityConfig] = None) -> Dict[str, Any]:
    """A decoded shard sample -> the item format of :class:`~vq3d_nerfstudio.data.dataset.Vq3dImageDataset`
    (without ``image_idx``): ``image`` ``[S, S, 3]``, ``class_id`` long, and with depth ``disparity``
    ``[S, S, 1]`` (0 where unknown) plus ``disparity_mask`` ``[S, S, 1]`` bool (finite in the shard);
    ``relative`` given (relative pseudo-GT), the disparity is its target
    (:meth:`~vq3d_nerfstudio.data.dataset.RelativeDisparityConfig.target`)."""
    item: Dict[str, Any] = {"image": sample["image"], "class_id": torch.tensor(sample["class_id"], dtype=torch.long)}
    if use_depth:
        disparity = sample["disparity"]
        valid = torch.isfinite(disparity)
        disparity, valid = torch.where(valid, disparity, torch.zeros_like(disparity))[..., None], valid[..., None]
        if relative is not None:
            disparity, valid = relative.target(disparity, valid)
        item["disparity"], item["disparity_mask"] = disparity, valid
    return item


def relative_target(depth_kind: str, config: Optional[RelativeDisparityConfig]) -> Optional[RelativeDisparityConfig]:
    """What maps prepared data's depth onto its target: ``config`` (default: its defaults) for relative
    pseudo-GT (``depth_kind`` 'disparity'), None for metric depth or none."""
    return (config or RelativeDisparityConfig()) if depth_kind == "disparity" else None


class ShardImageDataset(InputDataset):
    """The eval set or the training preview of a prepared folder (the samples the dataparser listed
    in ``metadata["shard_samples"]``), read by byte offset on each access. Items as
    :class:`~vq3d_nerfstudio.data.dataset.Vq3dImageDataset`'s: ``image`` ``[S, S, 3]``, ``image_idx``,
    ``class_id``, and with depth ``disparity`` / ``disparity_mask`` ``[S, S, 1]`` (relative
    pseudo-GT mapped by ``relative_disparity``, see :func:`relative_target`)."""

    exclude_batch_keys_from_device: List[str] = []

    def __init__(
        self, dataparser_outputs, scale_factor: float = 1.0, relative_disparity: Optional[RelativeDisparityConfig] = None
    ):
        super().__init__(dataparser_outputs, scale_factor)
        self.image_size = int(self.cameras.width[0, 0])
        self.root = Path(self.metadata["shard_root"])
        self.locations: List[SampleLocation] = self.metadata["shard_samples"]
        self.use_depth = self.metadata.get("depth_kind", "none") != "none"
        self.relative = relative_target(self.metadata.get("depth_kind", "none"), relative_disparity)
        self.strict = False
        """Raise at a sample that cannot be decoded, instead of returning the next readable one (the
        policy of :func:`~vq3d_nerfstudio.data.dataset.item_or_next_readable`)."""
        self.bad_files: Dict[int, str] = {}  # index -> its "skipped" line, found by this copy

    def get_data(self, image_idx: int, image_type: str = "float32") -> Dict:
        location = self.locations[image_idx]
        raw = read_sample(self.root, location)
        sample = decode_sample(raw, self.root / location.shard, self.image_size, self.use_depth)
        return {"image_idx": image_idx, **to_item(sample, self.use_depth, self.relative)}

    def __getitem__(self, image_idx: int) -> Dict:
        return item_or_next_readable(self, image_idx, lambda i: sample_name(self.root / self.locations[i].shard, self.locations[i].key))


def sample_name(shard: Union[Path, str], key: str) -> str:
    """How a bad sample is named in skip reports: ``<shard>:<key>``."""
    return f"{shard}:{key}"


class TrainingStream(torch.utils.data.IterableDataset):
    """One rank's training images, epoch after epoch, without end: a DataLoader over it never runs
    dry, and a batch may span an epoch boundary. Each epoch calls ``reader.set_epoch`` (new shard
    order and shuffle, the same split between ranks) inside the DataLoader worker that iterates it.

    Items as :func:`to_item` (with ``relative``: relative pseudo-GT mapped onto its target, see
    :func:`relative_target`), plus ``image_idx`` (the sample's key: its position in the prepared
    input list, unique and stable) and ``camera_idx`` 0 (every image has the canonical camera).
    A worker whose epoch holds no sample (more workers than a tiny rank's images) stops; when all
    stop, the DataLoader ends and the datamanager reports it.

    A sample that cannot be decoded (a damaged image, a missing depth member) gets a folder's bad-file
    policy: with ``strict`` its :class:`ShardError` (naming the shard and member) is raised; otherwise
    it is passed over and listed in the next item's ``skipped`` (``SKIPPED_KEY``), which the
    datamanager warns about and counts, until :data:`MAX_REPLACEMENT_TRIES` in a row were bad.
    """

    def __init__(
        self, reader: ShardReader, use_depth: bool, start_epoch: int = 0, strict: bool = False,
        relative: Optional[RelativeDisparityConfig] = None,
    ):
        super().__init__()
        self.reader = reader
        self.use_depth = use_depth
        self.relative = relative
        self.start_epoch = start_epoch
        self.strict = strict
        if not use_depth:
            reader.has_depth = False  # depth in the shards but not wanted: do not decode it

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        epoch = self.start_epoch
        skipped: List[str] = []  # bad samples since the last item yielded
        while True:
            self.reader.set_epoch(epoch)
            count = 0
            for shard, raw in self.reader.raw_samples():
                try:
                    sample = self.reader.decode(shard, raw)
                except ShardError as err:
                    if self.strict:
                        raise
                    skipped.append(skip_entry(sample_name(shard, raw["__key__"]), err))
                    if len(skipped) > MAX_REPLACEMENT_TRIES:
                        raise nothing_readable(skipped) from err
                    continue
                count += 1
                item = {"image_idx": int(sample["key"]), "camera_idx": 0, **to_item(sample, self.use_depth, self.relative)}
                yield {**item, SKIPPED_KEY: "\n".join(skipped)}
                skipped = []
            if count == 0:
                if skipped:
                    raise nothing_readable(skipped)
                return
            epoch += 1


def check_resolution(root: Path, index: Dict[str, Any], image_size: int) -> None:
    """One clear error when the shards were prepared at another size than the model's."""
    resolution = int(index["resolution"])
    if resolution != image_size:
        raise ShardError(
            f"{Path(root) / INDEX_NAME}: the shards hold {resolution} px images but the model's image size is "
            f"{image_size} px; prepare them again at the model's size (`vq3d prepare --input ... --output ... "
            f"--resolution {image_size}`), or train at {resolution} px (--pipeline.model.image-size {resolution} "
            f"vq3d-images --image-size {resolution})"
        )


def shard_depth_kind(index: Dict[str, Any], requested: str, root: Path) -> str:
    """``depth_kind`` metadata for prepared data: 'none' (no depth used), 'z-depth' (stored disparity
    is 1 / world z-depth from files, compared as is) or 'disparity' (relative, aligned per image)."""
    if requested == "none":
        return "none"
    if index["depth_kind"] == "none":
        if requested != "auto":
            raise ShardError(
                f"{Path(root) / INDEX_NAME}: prepared without depth, but --depth-kind {requested} asks for it; "
                "prepare again with --depth-model (or depth files beside the images), or pass --depth-kind none"
            )
        return "none"
    if index.get("depth_source") == "files" and index.get("sibling_depth_kind") == "z-depth":
        return "z-depth"
    return "disparity"


def num_training_samples(index: Dict[str, Any], rule: HeldOut) -> int:
    """Training samples, estimated from the index (the held-out count is known only by reading)."""
    total = int(index["num_samples"])
    return max(1, round(total * (1 - rule.eval_fraction)) - len(rule.keys))


"""Streaming prepared shards for training: :class:`ShardReader` reads every sample of a
``vq3d prepare`` output once an epoch, split between ranks and DataLoader workers, shuffled, from
any source :mod:`~vq3d_nerfstudio.data.shard_sources` parses. Reading goes through
``webdataset.gopen`` and webdataset's tar iterators (:func:`iter_shard_raw`), so any source
``gopen`` opens can be streamed. Apart from random access by byte offset
(:mod:`~vq3d_nerfstudio.data.shard_access`), which only local files allow.
"""

from __future__ import annotations

import os
import random
import tarfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from vq3d_nerfstudio.data.shard_format import ShardError, decode_sample, verify_shards
from vq3d_nerfstudio.data.shard_sources import gopen_reason, read_source_index, shard_source, verify_streamed


def iter_shard_raw(
    url: Union[Path, str], keep: Optional[Callable[[int], bool]] = None
) -> Iterator[Tuple[int, Optional[Dict[str, bytes]]]]:
    """Stream ``(position, sample)`` for every sample of one shard (a local path, or a URL or
    ``pipe:`` command that ``webdataset.gopen`` opens), where ``sample`` is
    ``{ext: bytes, "__key__": key}``, or None for samples that ``keep(position) -> bool`` rejects.
    webdataset's tar iterators group the members (they must be adjacent, WebDataset layout). Errors
    are :class:`~vq3d_nerfstudio.data.shard_format.ShardError` naming the shard, including a
    ``pipe:`` command or download that failed.
    """
    url = str(url)
    stream = None
    try:
        stream = gopen(url, "rb")
        samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        for position, sample in enumerate(samples):
            if keep is not None and not keep(position):
                yield position, None
                continue
            sample.pop("__url__", None)
            yield position, sample
        opened, stream = stream, None
        opened.close()  # a failed command or download shows here, as its exit status
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise ShardError(
            f"{url}: unreadable shard ({gopen_reason(err)}); it is truncated or corrupt, or its source failed: "
            "delete it and rerun `vq3d prepare` with the same options (ShardReader(verify=True) checks "
            "every sha256 up front)"
        ) from err
    finally:
        if stream is not None:  # left early (an error, or the consumer stopped): its exit status is moot
            try:
                stream.close()
            except OSError:
                pass


def consumer_plan(order: Sequence[int], consumer: int, num_consumers: int) -> List[Tuple[int, int, int]]:
    """Which samples one of ``num_consumers`` readers takes: ``[(shard, offset, step)]`` in reading
    order, meaning "the samples of ``shard`` at positions ``p`` with ``p % step == offset``".

    Whole shards are dealt round-robin (by position in ``order``) while every consumer can get the
    same number of them; the last ``len(order) % num_consumers`` shards (all of them when there are
    fewer shards than consumers) are read by every consumer, each keeping every
    ``num_consumers``-th sample (offset rotated per shard so the extra samples spread over the
    consumers). The plan depends only on the shard order, so every rank computes the same split.
    The consumers' sets are disjoint and together hold every sample. Per-consumer counts
    can still differ by the shards' differing sizes (skipped bad files): see :meth:`ShardReader.__len__`.
    """
    if not 0 <= consumer < num_consumers:
        raise ValueError(f"consumer {consumer} out of range for {num_consumers} consumers")
    num_whole = len(order) - len(order) % num_consumers
    plan = []
    for i, shard in enumerate(order):
        if i < num_whole:
            if i % num_consumers == consumer:
                plan.append((shard, 0, 1))
        else:
            plan.append((shard, (consumer + i) % num_consumers, num_consumers))
    return plan


def planned_count(counts: Sequence[int], plan: Sequence[Tuple[int, int, int]]) -> int:
    """Number of samples a plan yields."""
    return sum(len(range(offset, counts[shard], step)) for shard, offset, step in plan)


def shuffle_buffer(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """WebDataset-style shuffle: keep ``buffer_size`` items, yield a random one as each new one
    arrives, then the rest in random order. A permutation of the input."""
    buffer: List = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardReader(torch.utils.data.IterableDataset):
    """Streams the samples of a ``vq3d prepare`` output: a local folder, or a folder URL or shard
    pattern (URL, ``pipe:`` command, braces) with ``index.json`` beside the shards
    (:mod:`~vq3d_nerfstudio.data.shard_sources`).

    Each item is a dict: ``image`` ``[S, S, 3]`` float32 in [0, 1]; ``disparity`` ``[S, S]`` float32
    relative disparity (NaN where unknown) or None when the dataset has no depth; ``class_id`` int
    (-1 = no classes); ``key`` (str, unique) and ``source`` (the input's relative path).

    Splitting: the samples of an epoch are divided between ``world_size`` ranks (default: from
    ``torch.distributed`` when initialised) by :func:`consumer_plan`, whole shards where the shard
    count allows and by sample position inside the remaining shards otherwise; inside a rank, DataLoader
    workers take every ``num_workers``-th sample of the rank's stream. So what a rank sees does not
    depend on its number of workers, and ranks are disjoint with all samples covered. (webdataset's
    ``split_by_node``/``split_by_worker`` deal whole shards only: with fewer shards than consumers
    some would get nothing, and a rank's samples would change with its worker count.)

    Shuffling (``shuffle_buffer > 0``): the shard order is permuted by ``(seed, epoch)`` (the same on
    every rank, so the split stays disjoint), then samples pass through a shuffle buffer seeded by
    ``(seed, epoch, rank, worker)``. Call :meth:`set_epoch` before each epoch (as with
    ``DistributedSampler``); DataLoader's ``persistent_workers=True`` keeps the workers' copies at
    the epoch they were created with.

    ``verify=True`` checks every shard's size and sha256 against the index when the reader is built
    (reads, or downloads, the whole dataset once; one
    :class:`~vq3d_nerfstudio.data.shard_format.ShardError` naming the first bad shard).

    ``exclude(key, source) -> bool`` drops samples before they are decoded or shuffled (the training
    stream leaves out the held-out split this way); it must be picklable for DataLoader workers
    started by spawn. :meth:`__len__` counts samples before ``exclude``.
    """

    def __init__(
        self,
        root: Union[Path, str],
        shuffle_buffer: int = 0,
        seed: int = 0,
        epoch: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        verify: bool = False,
        exclude: Optional[Callable[[str, str], bool]] = None,
    ):
        super().__init__()
        self.source = shard_source(root)
        local_folder = self.source.local and self.source.folder is not None
        self.root: Union[Path, str] = Path(root) if local_folder else str(root)
        self.index = read_source_index(self.source)
        self.shards = self.source.shards(self.index)
        """``(address, index entry)`` of each shard read, in the source's order."""
        if verify:
            if isinstance(self.root, Path):
                verify_shards(self.root, self.index)
            else:
                verify_streamed(self.shards)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        if world_size is None:
            world_size = torch.distributed.get_world_size() if distributed else 1
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, epoch
        self.exclude = exclude
        self.counts = [int(entry["num_samples"]) for _, entry in self.shards]
        self.has_depth = self.index["depth_kind"] == "disparity"

    @property
    def class_names(self) -> List[str]:
        return list(self.index["class_names"])

    @property
    def resolution(self) -> int:
        return int(self.index["resolution"])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order and shuffle are used next."""
        self.epoch = epoch

    def shard_order(self) -> List[int]:
        """Shard indices in this epoch's reading order (identical on every rank)."""
        order = list(range(len(self.counts)))
        if self.shuffle_buffer > 0:
            random.Random(f"vq3d-shards/{self.seed}/{self.epoch}").shuffle(order)
        return order

    def rank_plan(self) -> List[Tuple[int, int, int]]:
        """This rank's ``[(shard, offset, step)]`` for the current epoch (see :func:`consumer_plan`)."""
        return consumer_plan(self.shard_order(), self.rank, self.world_size)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (all its DataLoader workers together)."""
        return planned_count(self.counts, self.rank_plan())

    def _raw_stream(self, plan: Sequence[Tuple[int, int, int]]) -> Iterator[Tuple[str, Dict[str, bytes]]]:
        for shard, offset, step in plan:
            path, entry = self.shards[shard]
            if self.source.local and not os.path.isfile(path):
                raise ShardError(f"{path}: missing; rerun `vq3d prepare` with the same options to rewrite it")
            total = 0
            for position, raw in iter_shard_raw(path, keep=lambda p, o=offset, s=step: p % s == o):
                total = position + 1
                if raw is None:
                    continue
                if self.exclude is not None:
                    if self.exclude(raw["__key__"], raw.get("source.txt", b"").decode("utf-8")):
                        continue
                yield path, raw
            if total != entry["num_samples"]:
                raise ShardError(
                    f"{path}: holds {total} samples but the index says {entry['num_samples']}; delete it and "
                    "rerun `vq3d prepare` with the same options"
                )

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        for shard, raw in self.raw_samples():
            yield self.decode(shard, raw)

    def raw_samples(self) -> Iterator[Tuple[str, Dict[str, bytes]]]:
        """What :meth:`__iter__` decodes: ``(shard address, {ext: bytes, "__key__": key})`` of this
        rank's and DataLoader worker's samples, in this epoch's (shuffled) order. A reader that skips
        undecodable samples (the training stream) decodes them itself with :meth:`decode`."""
        plan = self.rank_plan()
        if not plan or planned_count(self.counts, plan) == 0:
            raise ShardError(
                f"{self.root}: {sum(self.counts)} samples leave rank {self.rank} of {self.world_size} with none; "
                "prepare more images or use fewer ranks"
            )
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream: Iterator = (
            item for j, item in enumerate(self._raw_stream(plan)) if j % num_workers == worker
        )
        if self.shuffle_buffer > 0:
            rng = random.Random(f"vq3d-shards/{self.seed}/{self.epoch}/{self.rank}/{worker}")
            stream = shuffle_buffer(stream, self.shuffle_buffer, rng)
        yield from stream

    def decode(self, shard: str, raw: Dict[str, bytes]) -> Dict[str, Any]:
        """One raw sample -> the item :meth:`__iter__` yields; :class:`~vq3d_nerfstudio.data.shard_format.ShardError`
        naming the shard and member."""
        return decode_sample(raw, shard, self.resolution, self.has_depth)

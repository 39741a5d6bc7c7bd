"""Prepared datasets as WebDataset-layout tar shards, written by ``vq3d prepare``.

Layout of an output folder::

    index.json            what is there (below); written atomically, "complete": true at the end
    bad_files.txt         inputs that were skipped, one "<source>\\t<reason>" a line
    shard-000000.tar      samples, in WebDataset layout (members of one sample are adjacent,
    shard-000001.tar      named <key>.<ext>, key = 8+ digits, no dots)
    ...

Members of a sample (sorted by name inside the sample):

- ``<key>.cls``: the class id as ASCII decimal (``-1`` when the collection has no classes);
- ``<key>.depth.npy``: ``[S, S]`` float32 relative disparity (larger = nearer, arbitrary scale and
  shift; NaN where unknown), present on every sample when ``index["depth_kind"] == "disparity"``
  and on none when it is ``"none"``; a plain ``.npy``, read with ``allow_pickle=False``;
- ``<key>.png``: the ``S x S`` RGB image, 8 bits per channel, exactly what
  :func:`vq3d_nerfstudio.data.dataset.load_image` returned (centre-cropped, resized, EXIF-rotated).
  PNG, not JPEG: the autoencoder is trained to reproduce these pixels and JPEG's blocking and
  ringing would become part of its target; lossless storage keeps a shard sample bit-identical to
  ``load_image`` of the original. The cost is size: ~106 KB for a 256 px photo-like image against
  ~19 KB as JPEG q95 (measured on a noisy 640x480 JPEG resized to 256 px); the float32 depth map
  (256 KB) is the larger member anyway, so a sample with depth is ~370 KB;
- ``<key>.source.txt``: the input's path relative to the input folder (or as listed), UTF-8.

Tar members are written deterministically (ustar, mtime 0, uid/gid 0, mode 0644, sample order and
member order fixed), so the same inputs give byte-identical shards. Each shard is written under a
hidden temporary name and renamed when complete: a killed run never leaves a partial shard under a
shard's name.

``index.json``: ``format``/``version``, ``complete``, ``resolution``, ``image_format``,
``num_samples``, ``num_inputs``, ``class_names``, ``depth_kind`` ("disparity" or "none"),
``depth_source`` ("files", "model", "files+model" or null), ``depth_model`` and
``depth_model_type`` (or null), ``shard_size``, ``inputs_sha256`` (fingerprint of the input list),
``shards`` (per shard: ``name``, ``num_samples``, ``num_bytes``, ``sha256``, ``skipped`` inputs),
``ignored`` (inputs outside any shard) and ``num_skipped``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from vq3d_nerfstudio.data.dataparser import DatasetError

INDEX_NAME = "index.json"
BAD_FILES_NAME = "bad_files.txt"
FORMAT_NAME = "vq3d-shards"
FORMAT_VERSION = 1
PNG_COMPRESS_LEVEL = 1  # fixed, so the bytes never follow a change of Pillow's default. Level 1 encodes a
# 256 px photo ~5x faster than Pillow's default 6 (7.5 vs 38 ms measured) for ~15% more bytes (106 vs 91 KB),
# and the float32 depth map (256 KB) dominates a sample's size anyway.
_IMAGE_EXTS = ("png", "jpg", "jpeg")


class ShardError(DatasetError):
    """A prepared dataset that cannot be read as promised; the message names the file and the fix."""


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-000000.tar``."""
    return f"shard-{index:06d}.tar"


def temporary_path(path: Path) -> Path:
    """Hidden name a file is written under before the rename that makes it visible."""
    return path.with_name(f".{path.name}.partial")


def sample_key(position: int) -> str:
    """Key of the sample at ``position`` of the (hash-ordered) input list: digits, no dots."""
    return f"{position:08d}"


@dataclass(frozen=True)
class EncodedSample:
    """One sample as the bytes that go into a shard."""

    key: str
    class_id: int
    png: bytes
    depth_npy: Optional[bytes]
    source: str


def encode_image(image: np.ndarray) -> bytes:
    """``[S, S, 3]`` uint8 -> PNG bytes (deterministic for a given Pillow/zlib)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected [S, S, 3] uint8, got {image.shape} {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def encode_disparity(disparity: np.ndarray) -> bytes:
    """``[S, S]`` disparity -> ``.npy`` bytes (little-endian float32, no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(disparity, dtype="<f4"), allow_pickle=False)
    return buffer.getvalue()


def decode_image(data: bytes) -> torch.Tensor:
    """PNG/JPEG bytes -> ``[S, S, 3]`` float32 in [0, 1] (the same numbers ``load_image`` gives)."""
    with Image.open(io.BytesIO(data)) as pil:
        array = np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())


def decode_disparity(data: bytes) -> torch.Tensor:
    """``.npy`` bytes -> ``[S, S]`` float32 disparity (NaN where unknown)."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim != 2:
        raise ValueError(f"disparity must be 2-D, got shape {array.shape}")
    return torch.from_numpy(array.astype(np.float32, copy=True))


def _member(name: str, data: bytes) -> Tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


def sample_members(sample: EncodedSample) -> List[Tuple[str, bytes]]:
    """The ``(name, bytes)`` tar members of one sample, sorted by name."""
    if not sample.key or "." in sample.key or "/" in sample.key:
        raise ValueError(f"bad sample key {sample.key!r}: keys need at least one character and no '.' or '/'")
    members = [(f"{sample.key}.cls", str(int(sample.class_id)).encode("ascii"))]
    if sample.depth_npy is not None:
        members.append((f"{sample.key}.depth.npy", sample.depth_npy))
    members.append((f"{sample.key}.png", sample.png))
    members.append((f"{sample.key}.source.txt", sample.source.encode("utf-8")))
    return sorted(members)


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a hidden temporary file, fsync, and rename it over ``path``."""
    tmp = temporary_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_shard(path: Path, samples: Iterable[EncodedSample]) -> Dict[str, Any]:
    """Write one tar shard atomically (temporary name, fsync, rename).

    Returns:
        ``{"name", "num_samples", "num_bytes", "sha256"}`` of the finished shard.
    """
    tmp = temporary_path(path)
    count = 0
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for sample in samples:
                    for name, data in sample_members(sample):
                        info, payload = _member(name, data)
                        tar.addfile(info, payload)
                    count += 1
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sha256 = file_sha256(tmp)
    num_bytes = tmp.stat().st_size
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return {"name": path.name, "num_samples": count, "num_bytes": num_bytes, "sha256": sha256}


def dump_index(index: Dict[str, Any]) -> bytes:
    """The bytes of ``index.json`` (key order as built, so equal indexes give equal bytes)."""
    return (json.dumps(index, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def write_index(root: Path, index: Dict[str, Any]) -> None:
    """(Re)write ``root/index.json`` atomically."""
    write_atomic(root / INDEX_NAME, dump_index(index))


def read_index(root: Path, require_complete: bool = True) -> Dict[str, Any]:
    """Load and check ``root/index.json``."""
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"{path}: no such file; prepare the dataset with `vq3d prepare --input ... --output {root}`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: not readable JSON ({err}); rerun `vq3d prepare` with the same options") from err
    found = index.get("format") if isinstance(index, dict) else type(index).__name__
    if found != FORMAT_NAME:
        raise ShardError(f"{path}: not a vq3d shard index (format {found!r}); point at a `vq3d prepare` output")
    if index.get("version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: shard format version {index.get('version')} but this code reads {FORMAT_VERSION}; "
            "prepare the data again with this version"
        )
    if require_complete and not index.get("complete"):
        raise ShardError(f"{path}: `vq3d prepare` did not finish; rerun it with the same options to complete the shards")
    return index


def verify_shards(root: Path, index: Optional[Dict[str, Any]] = None) -> None:
    """Check every shard's size and sha256 against the index; one :class:`ShardError` on the first mismatch."""
    root = Path(root)
    index = index if index is not None else read_index(root)
    for entry in index["shards"]:
        path = root / entry["name"]
        if not path.is_file():
            raise ShardError(f"{path}: missing; rerun `vq3d prepare` with the same options to rewrite it")
        size = path.stat().st_size
        if size != entry["num_bytes"] or file_sha256(path) != entry["sha256"]:
            raise ShardError(
                f"{path}: checksum mismatch ({size} bytes, index says {entry['num_bytes']}; sha256 differs): "
                "the shard is truncated or was modified; delete it and rerun `vq3d prepare` with the same "
                "options to rewrite it"
            )


def _split_name(name: str) -> Tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, dot, ext = base.partition(".")
    if not dot:
        raise ValueError(f"member {name!r} has no extension")
    return name[: len(name) - len(base)] + key, ext


def _samples_in_tar(tar: tarfile.TarFile) -> Iterator[Tuple[int, str, List[Tuple[str, tarfile.TarInfo]]]]:
    """A shard's file members grouped by sample, in order: ``(position, key, [(ext, member), ...])``.
    Members of one sample must be adjacent (WebDataset layout)."""
    position, key, members = -1, None, []
    for member in tar:
        if not member.isfile():
            continue
        member_key, ext = _split_name(member.name)
        if member_key != key:
            if key is not None:
                yield position, key, members
            position, key, members = position + 1, member_key, []
        members.append((ext, member))
    if key is not None:
        yield position, key, members


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    assert handle is not None
    data = handle.read()
    if len(data) != member.size:
        raise tarfile.ReadError(f"member {member.name} is cut short")
    return data


def iter_shard_raw(
    path: Path, keep: Optional[Callable[[int], bool]] = None
) -> Iterator[Tuple[int, Optional[Dict[str, bytes]]]]:
    """Stream ``(position, sample)`` for every sample of one shard, where ``sample`` is
    ``{ext: bytes, "__key__": key}``, or None for samples that ``keep(position) -> bool`` rejects
    (their data is skipped, not read). Members of one sample must be adjacent (WebDataset layout).
    Errors are :class:`ShardError` naming the shard.
    """
    try:
        with tarfile.open(path, mode="r:") as tar:
            for position, key, members in _samples_in_tar(tar):
                if keep is not None and not keep(position):
                    yield position, None
                    continue
                sample: Dict[str, Any] = {"__key__": key}
                for ext, member in members:
                    sample[ext] = _read_member(tar, member)
                yield position, sample
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise ShardError(
            f"{path}: unreadable shard ({err}); it is truncated or corrupt: delete it and rerun "
            "`vq3d prepare` with the same options (ShardReader(verify=True) checks every sha256 up front)"
        ) from err


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
    """Streams the samples of a ``vq3d prepare`` output.

    Each item is a dict: ``image`` ``[S, S, 3]`` float32 in [0, 1]; ``disparity`` ``[S, S]`` float32
    relative disparity (NaN where unknown) or None when the dataset has no depth; ``class_id`` int
    (-1 = no classes); ``key`` (str, unique) and ``source`` (the input's relative path).

    Splitting: the samples of an epoch are divided between ``world_size`` ranks (default: from
    ``torch.distributed`` when initialised) by :func:`consumer_plan`, whole shards where the shard
    count allows and by sample position inside the remaining shards otherwise; inside a rank, DataLoader
    workers take every ``num_workers``-th sample of the rank's stream. So what a rank sees does not
    depend on its number of workers, and ranks are disjoint with all samples covered.

    Shuffling (``shuffle_buffer > 0``): the shard order is permuted by ``(seed, epoch)`` (the same on
    every rank, so the split stays disjoint), then samples pass through a shuffle buffer seeded by
    ``(seed, epoch, rank, worker)``. Call :meth:`set_epoch` before each epoch (as with
    ``DistributedSampler``); DataLoader's ``persistent_workers=True`` keeps the workers' copies at
    the epoch they were created with.

    ``verify=True`` checks every shard's size and sha256 against the index when the reader is built
    (reads the whole dataset once; one :class:`ShardError` naming the first bad shard).

    ``exclude(key, source) -> bool`` drops samples before they are decoded or shuffled (the training
    stream leaves out the held-out split this way); it must be picklable for DataLoader workers
    started by spawn. :meth:`__len__` counts samples before ``exclude``.
    """

    def __init__(
        self,
        root: Path,
        shuffle_buffer: int = 0,
        seed: int = 0,
        epoch: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        verify: bool = False,
        exclude: Optional[Callable[[str, str], bool]] = None,
    ):
        super().__init__()
        self.root = Path(root)
        self.index = read_index(self.root)
        if verify:
            verify_shards(self.root, self.index)
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
        self.counts = [int(entry["num_samples"]) for entry in self.index["shards"]]
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
            entry = self.index["shards"][shard]
            path = self.root / entry["name"]
            if not path.is_file():
                raise ShardError(f"{path}: missing; rerun `vq3d prepare` with the same options to rewrite it")
            total = 0
            for position, raw in iter_shard_raw(path, keep=lambda p, o=offset, s=step: p % s == o):
                total = position + 1
                if raw is None:
                    continue
                if self.exclude is not None:
                    if self.exclude(raw["__key__"], raw.get("source.txt", b"").decode("utf-8")):
                        continue
                yield entry["name"], raw
            if total != entry["num_samples"]:
                raise ShardError(
                    f"{path}: holds {total} samples but the index says {entry['num_samples']}; delete it and "
                    "rerun `vq3d prepare` with the same options"
                )

    def __iter__(self) -> Iterator[Dict[str, Any]]:
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
        for name, raw in stream:
            yield self._decode(name, raw)

    def _decode(self, shard: str, raw: Dict[str, bytes]) -> Dict[str, Any]:
        return decode_sample(raw, self.root / shard, self.resolution, self.has_depth)


def decode_sample(raw: Dict[str, bytes], shard_path: Path, resolution: int, has_depth: bool) -> Dict[str, Any]:
    """One sample's members (``{ext: bytes, "__key__": key}``) -> the item :class:`ShardReader`
    yields. Errors are :class:`ShardError` naming the shard and the sample."""
    key = raw["__key__"]
    where = f"{shard_path}: sample {key}"
    image_ext = next((ext for ext in _IMAGE_EXTS if ext in raw), None)
    if image_ext is None or "cls" not in raw:
        raise ShardError(
            f"{where} lacks its image or .cls member (the shard is truncated or corrupt); delete the shard "
            "and rerun `vq3d prepare` with the same options"
        )
    if has_depth and "depth.npy" not in raw:
        raise ShardError(f"{where} has no .depth.npy although the index says depth_kind=disparity; rerun `vq3d prepare`")
    try:
        image = decode_image(raw[image_ext])
        disparity = decode_disparity(raw["depth.npy"]) if has_depth else None
        class_id = int(raw["cls"].decode("ascii").strip())
        source = raw.get("source.txt", b"").decode("utf-8")
    except (OSError, ValueError) as err:
        raise ShardError(f"{where} cannot be decoded ({err}); delete the shard and rerun `vq3d prepare`") from err
    size = resolution
    if image.shape != (size, size, 3) or (disparity is not None and disparity.shape != (size, size)):
        raise ShardError(f"{where} is not {size}x{size} as the index says; prepare the data again")
    return {"key": key, "source": source, "image": image, "disparity": disparity, "class_id": class_id}


@dataclass(frozen=True)
class SampleLocation:
    """Where one sample's members lie inside its shard, for random access without a scan."""

    shard: str  # file name, e.g. shard-000000.tar
    position: int  # index of the sample inside the shard
    key: str
    source: str
    class_id: int
    members: Tuple[Tuple[str, int, int], ...]  # (ext, byte offset of the data, size)


def scan_shard(path: Path) -> Iterator[SampleLocation]:
    """Yield the location of every sample of one shard, in order, reading tar headers and the small
    ``.source.txt`` and ``.cls`` members only (image and depth bytes are skipped, not read)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            for position, key, members in _samples_in_tar(tar):
                small = {ext: _read_member(tar, m) for ext, m in members if ext in ("source.txt", "cls")}
                class_id = int(small["cls"].decode("ascii").strip()) if "cls" in small else -1
                yield SampleLocation(path.name, position, key, small.get("source.txt", b"").decode("utf-8"), class_id,
                                     tuple((ext, m.offset_data, m.size) for ext, m in members))
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise ShardError(
            f"{path}: unreadable shard ({err}); it is truncated or corrupt: delete it and rerun "
            "`vq3d prepare` with the same options"
        ) from err


def read_sample(root: Path, location: SampleLocation) -> Dict[str, bytes]:
    """The members of one sample (``{ext: bytes, "__key__": key}``), read by offset."""
    path = Path(root) / location.shard
    raw: Dict[str, Any] = {"__key__": location.key}
    try:
        with open(path, "rb") as f:
            for ext, offset, size in location.members:
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise EOFError(f"member {location.key}.{ext} is cut short")
                raw[ext] = data
    except (OSError, EOFError) as err:
        raise ShardError(
            f"{path}: cannot read sample {location.key} ({err}); the shard changed since it was indexed or is "
            "truncated: rerun `vq3d prepare` with the same options"
        ) from err
    return raw


def num_shards_for(num_inputs: int, shard_size: int) -> int:
    """Shards needed for ``num_inputs`` inputs at ``shard_size`` inputs each (at least one)."""
    return max(1, math.ceil(num_inputs / shard_size))

"""Prepared datasets as WebDataset-layout tar shards, written by ``vq3d prepare``.

Layout of an output folder::

    index.json            what is there (below); written atomically, "complete": true at the end
    bad_files.txt         inputs that were skipped: JSON lines, {"source": ..., "error": ...} a line
                          (JSON, so that names holding tabs or newlines read back as they are)
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

The tar work is the ``webdataset`` library's: :func:`write_shard` writes through
``webdataset.TarWriter`` and the streaming reader (:func:`iter_shard_raw`, :class:`ShardReader`)
reads through ``webdataset.gopen`` and its tar iterators, so shards are what any WebDataset
pipeline reads and any source ``gopen`` opens can be streamed. Members are written
deterministically (ustar headers, mtime 0, uid/gid 0, empty user/group names, mode 0644, sample
order and member order fixed), so the same inputs give byte-identical shards. Each shard is
written under a hidden temporary name and renamed when complete: a killed run never leaves a
partial shard under a shard's name. Random access by byte offset (:func:`scan_shard`,
:func:`read_sample`, used for the small eval and preview sets) stays on ``tarfile`` over local
files: webdataset only streams.

Sources :class:`ShardReader` streams from (training on a cluster without a shared file system):

- a local folder (a ``vq3d prepare`` output): ``index.json`` and every shard it lists;
- a folder URL, ``http://host/data/imagenet256`` (or ``https://``): ``index.json`` is fetched from
  ``<url>/index.json`` and every shard it lists from ``<url>/<name>``;
- a shard pattern ending in ``.tar``, with or without braces: a URL
  (``https://host/data/shard-{000000..000127}.tar``), a ``pipe:`` command that writes a shard to
  its stdout (``pipe:aws s3 cp s3://bucket/data/shard-{000000..000127}.tar -``), or a local path.
  Braces are expanded (``braceexpand``, as WebDataset does) into the shards to read, in that order;
  a pattern may name a subset of the shards. ``index.json`` is found *beside* them: the source with
  the shard file name replaced by ``index.json`` (``pipe:aws s3 cp s3://bucket/data/index.json -``).

``index.json`` is required for every source: the resolution, class names, depth kind and per-shard
sample counts it holds are what the rank split and the checks rely on, and guessing them from the
first samples would be wrong for a collection whose classes or depth vary. A source without it is
one :class:`ShardError` naming the address tried. ``http(s)://`` is read with ``curl`` (as
webdataset does) and ``pipe:`` runs its command through the shell: use trusted sources only.

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
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import webdataset
from PIL import Image
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from vq3d_nerfstudio.checks import json_bytes_problem
from vq3d_nerfstudio.errors import DatasetError
from vq3d_nerfstudio.files import atomic_path, file_sha256, write_atomic

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


class IndexDamagedError(ShardError):
    """An ``index.json`` that is empty, truncated or lacks its shard list: ``vq3d prepare`` rebuilds
    such an output folder (index and shards) instead of refusing it. ``damage``: what is wrong, naming
    the file, without the fix."""

    def __init__(self, path: Union[Path, str], problem: str):
        self.damage = f"{path}: {problem}"
        folder = path.parent if isinstance(path, Path) else str(path).rsplit("/", 1)[0]
        super().__init__(
            f"{self.damage}; rerun `vq3d prepare --input <images> --output {folder}` with the options it was "
            "prepared with: it rebuilds a damaged index.json and its shards"
        )


_SHARD_ENTRY_NAME = re.compile(r"^shard-\d{6,}\.tar$")


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-000000.tar``."""
    return f"shard-{index:06d}.tar"


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


def webdataset_sample(sample: EncodedSample) -> Dict[str, Any]:
    """One sample as ``webdataset.TarWriter`` takes it: ``{"__key__": key, ext: bytes}`` (the writer
    stores the members sorted by extension, so adjacent and in a fixed order)."""
    if not sample.key or "." in sample.key or "/" in sample.key:
        raise ValueError(f"bad sample key {sample.key!r}: keys need at least one character and no '.' or '/'")
    members: Dict[str, Any] = {"__key__": sample.key, "cls": str(int(sample.class_id)).encode("ascii")}
    if sample.depth_npy is not None:
        members["depth.npy"] = sample.depth_npy
    members["png"] = sample.png
    members["source.txt"] = sample.source.encode("utf-8")
    return members


def write_shard(path: Path, samples: Iterable[EncodedSample]) -> Dict[str, Any]:
    """Write one tar shard atomically (temporary name, fsync, rename).

    Returns:
        ``{"name", "num_samples", "num_bytes", "sha256"}`` of the finished shard.
    """
    count = 0
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            # Deterministic headers: mtime, mode and user/group names fixed here, uid/gid left at
            # TarInfo's 0. TarWriter opens tarfile in its default (pax) format whatever its `format`
            # argument says (webdataset 1.0.2 drops it), but pax writes a plain ustar header, with no
            # extended header, for members like ours: short ASCII names, integer mtime, sizes < 8 GiB;
            # tests/test_prepare.py checks the bytes against the former hand-written ustar writer's.
            with webdataset.TarWriter(f, user="", group="", mode=0o644, mtime=0, encoder=False) as writer:
                for sample in samples:
                    writer.write(webdataset_sample(sample))
                    count += 1
        sha256 = file_sha256(tmp)
        num_bytes = tmp.stat().st_size
    return {"name": path.name, "num_samples": count, "num_bytes": num_bytes, "sha256": sha256}


def dump_index(index: Dict[str, Any]) -> bytes:
    """The bytes of ``index.json`` (key order as built, so equal indexes give equal bytes)."""
    return (json.dumps(index, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def dump_bad_files(bad: Sequence[Tuple[str, str]]) -> bytes:
    """The bytes of ``bad_files.txt``: one JSON object ``{"source", "error"}`` a line per skipped input."""
    return "".join(json.dumps({"source": s, "error": e}, ensure_ascii=False) + "\n" for s, e in bad).encode("utf-8")


def read_bad_files(root: Path) -> List[Tuple[str, str]]:
    """``(source, error)`` of each input ``vq3d prepare`` skipped, from ``root/bad_files.txt``."""
    lines = (Path(root) / BAD_FILES_NAME).read_text(encoding="utf-8").splitlines()
    return [(row["source"], row["error"]) for row in map(json.loads, lines) if row]


def write_index(root: Path, index: Dict[str, Any]) -> None:
    """(Re)write ``root/index.json`` atomically."""
    write_atomic(root / INDEX_NAME, dump_index(index))


def read_index(root: Path, require_complete: bool = True) -> Dict[str, Any]:
    """Load and check ``root/index.json``."""
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"{path}: no such file; prepare the dataset with `vq3d prepare --input ... --output {root}`")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ShardError(f"{path}: cannot read it ({err.strerror or err}); check its permissions") from err
    index = parse_index(data, path, require_complete)
    if require_complete:
        problems = shard_problems(Path(root), index, sha256=False)
        if problems:
            raise ShardError(
                f"{problems[0]}{f' (and {len(problems) - 1} more shards)' if len(problems) > 1 else ''}; rerun "
                f"`vq3d prepare` with the same options to rewrite {'them' if len(problems) > 1 else 'it'}"
                f" (`vq3d prepare --verify --output {root}` checks every shard's sha256 as well)"
            )
    return index


def _entry_problem(entry: Any, number: int) -> Optional[str]:
    """Why ``index["shards"][number]`` is not a shard entry, or ``None``."""
    if not isinstance(entry, dict):
        return f"shard entry {number} is {entry!r}, not an object"
    name = entry.get("name")
    if not isinstance(name, str) or not _SHARD_ENTRY_NAME.match(name):
        return f"shard entry {number} has {'no name' if name is None else f'the name {name!r}, not shard-NNNNNN.tar'}"
    for key in ("num_samples", "num_bytes"):
        value = entry.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"shard entry {number} ({name}) has {f'no {key}' if value is None else f'{key} {value!r}, not a count'}"
    if not isinstance(entry.get("sha256"), str):
        return f"shard entry {number} ({name}) has no sha256"
    return None


def parse_index(data: bytes, path: Union[Path, str], require_complete: bool = True) -> Dict[str, Any]:
    """Check the bytes of an ``index.json`` read from ``path`` (a file or a URL, named in errors).
    A damaged index (empty, truncated, ``shards`` not a list of entries with ``name``,
    ``num_samples``, ``num_bytes`` and ``sha256``) is an :class:`IndexDamagedError`."""
    problem = json_bytes_problem(data, path)
    if problem is not None:
        raise IndexDamagedError(path, problem[len(f"{path}: "):])  # the problem without the path it starts with
    index = json.loads(data.decode("utf-8"))
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
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise IndexDamagedError(path, "has no 'shards' list" if shards is None else f"'shards' is {shards!r}, not a list")
    for number, entry in enumerate(shards):
        if entry is None and not index.get("complete"):
            continue  # an unfinished run's index: shards not written yet
        problem = _entry_problem(entry, number)
        if problem is not None:
            raise IndexDamagedError(path, problem)
    return index


def shard_problems(root: Path, index: Dict[str, Any], sha256: bool = True) -> List[str]:
    """Each shard of ``index`` that is missing or whose size (and, with ``sha256``, checksum) differs
    from the index: one line each, naming it. Sizes alone cost a ``stat`` a shard; checksums read
    every byte."""
    problems = []
    for entry in index["shards"]:
        path = Path(root) / entry["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry["num_bytes"]:
            problems.append(f"{path}: {size:,} bytes but index.json says {entry['num_bytes']:,}: truncated or modified")
        elif sha256 and file_sha256(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from index.json (same size): modified or damaged")
    return problems


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
            raise _checksum_error(path, size, entry)


def _checksum_error(where: Union[Path, str], size: int, entry: Dict[str, Any]) -> ShardError:
    return ShardError(
        f"{where}: checksum mismatch ({size} bytes, index says {entry['num_bytes']}; sha256 differs): "
        "the shard is truncated or was modified; delete it and rerun `vq3d prepare` with the same "
        "options to rewrite it"
    )


def _verify_streamed(shards: Sequence[Tuple[str, Dict[str, Any]]]) -> None:
    """:func:`verify_shards` for shards read through ``gopen`` (URLs, ``pipe:``, patterns)."""
    for url, entry in shards:
        digest, size = hashlib.sha256(), 0
        try:
            with gopen(url, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 22), b""):
                    digest.update(chunk)
                    size += len(chunk)
        except (OSError, ValueError) as err:
            raise ShardError(
                f"{url}: cannot be read ({_reason(err)}); check the source, or rerun `vq3d prepare`"
            ) from err
        if size != entry["num_bytes"] or digest.hexdigest() != entry["sha256"]:
            raise _checksum_error(url, size, entry)


_REMOTE = re.compile(r"^(?:https?://|pipe:)")
_SHARD_FILE = re.compile(r"[^/\s'\"]+\.tar(?=$|[\s'\"])")
"""A shard's file name inside a source (a path, URL or ``pipe:`` command): the last one is the shard."""


def _shard_file(text: str) -> Optional[re.Match]:
    matches = list(_SHARD_FILE.finditer(text))
    return matches[-1] if matches else None


@dataclass(frozen=True)
class ShardSource:
    """Where :class:`ShardReader` finds ``index.json`` and the shards (see the module docstring)."""

    location: str
    """As given, for messages."""
    index_url: str
    """``index.json``'s local path or the URL / ``pipe:`` command ``webdataset.gopen`` opens."""
    local: bool
    """Shards are local files (a folder, or a pattern without a scheme)."""
    folder: Optional[str] = None
    """Read every shard of the index from this folder (path or URL); None for a pattern."""
    pattern: Tuple[str, ...] = ()
    """A pattern's shards, braces expanded, in reading order."""

    def shards(self, index: Dict[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
        """``(address, index entry)`` of each shard to read, in order."""
        if self.folder is not None:
            join = os.path.join if self.local else (lambda folder, name: f"{folder}/{name}")
            return [(join(self.folder, entry["name"]), entry) for entry in index["shards"]]
        entries = {entry["name"]: entry for entry in index["shards"]}
        found = []
        for url in self.pattern:
            match = _shard_file(url)
            name = match.group(0) if match else url
            if name not in entries:
                raise ShardError(
                    f"{url}: {name} is not a shard listed in {self.index_url}; fix the pattern, or keep the shards and "
                    "index.json of one `vq3d prepare` run together"
                )
            found.append((url, entries[name]))
        return found


def shard_source(source: Union[Path, str]) -> ShardSource:
    """Parse what :class:`ShardReader` is given: a local folder, a folder URL, or a shard pattern
    (URL, ``pipe:`` command or path ending in ``.tar``, braces allowed) with ``index.json`` beside it."""
    text = str(source)
    local = not _REMOTE.match(text)
    match = _shard_file(text)
    if match is not None:
        index_url = text[: match.start()] + INDEX_NAME + text[match.end() :]
        return ShardSource(text, index_url, local, pattern=tuple(expand_urls(text)))
    if text.startswith("pipe:"):
        raise ShardError(
            f"{text}: a pipe: source must name the shards it writes to stdout, e.g. "
            "`pipe:aws s3 cp s3://bucket/data/shard-{000000..000127}.tar -`"
        )
    if local:
        return ShardSource(text, str(Path(text) / INDEX_NAME), True, folder=text)
    folder = text.rstrip("/")
    return ShardSource(text, f"{folder}/{INDEX_NAME}", False, folder=folder)


def read_source_index(source: ShardSource) -> Dict[str, Any]:
    """The checked ``index.json`` of a source (local folders: :func:`read_index`, with its messages)."""
    if source.local and source.folder is not None:
        return read_index(Path(source.folder))
    try:
        with gopen(source.index_url, "rb") as stream:
            data = stream.read()
    except (OSError, ValueError) as err:
        raise ShardError(
            f"{source.index_url}: cannot read the shard index ({_reason(err)}); streaming {source.location} needs "
            f"the {INDEX_NAME} of its `vq3d prepare` run beside the shards: copy or serve the whole output folder"
        ) from err
    return parse_index(data, source.index_url)


def _reason(err: BaseException) -> str:
    """An exception's own message: webdataset appends the stream and URL to ``args`` (and `` @ <stream>``
    to the message), which our messages name already."""
    if not err.args:
        return type(err).__name__
    return str(err.args[0]).split(" @ <")[0]


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
    url: Union[Path, str], keep: Optional[Callable[[int], bool]] = None
) -> Iterator[Tuple[int, Optional[Dict[str, bytes]]]]:
    """Stream ``(position, sample)`` for every sample of one shard (a local path, or a URL or
    ``pipe:`` command that ``webdataset.gopen`` opens), where ``sample`` is
    ``{ext: bytes, "__key__": key}``, or None for samples that ``keep(position) -> bool`` rejects.
    webdataset's tar iterators group the members (they must be adjacent, WebDataset layout). Errors
    are :class:`ShardError` naming the shard, including a ``pipe:`` command or download that failed.
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
            f"{url}: unreadable shard ({_reason(err)}); it is truncated or corrupt, or its source failed: "
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
    pattern (URL, ``pipe:`` command, braces) with ``index.json`` beside the shards (module docstring).

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
    (reads, or downloads, the whole dataset once; one :class:`ShardError` naming the first bad shard).

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
                _verify_streamed(self.shards)
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
        """One raw sample -> the item :meth:`__iter__` yields; :class:`ShardError` naming the shard and member."""
        return decode_sample(raw, shard, self.resolution, self.has_depth)


def decode_sample(
    raw: Dict[str, bytes], shard_path: Union[Path, str], resolution: int, has_depth: bool
) -> Dict[str, Any]:
    """One sample's members (``{ext: bytes, "__key__": key}``) -> the item :class:`ShardReader`
    yields. Errors are :class:`ShardError` naming the shard and the sample."""
    key = raw["__key__"]
    fix = "delete the shard and rerun `vq3d prepare` with the same options to rewrite it"
    image_ext = next((ext for ext in _IMAGE_EXTS if ext in raw), None)
    missing = [m for m, absent in (("png", image_ext is None), ("cls", "cls" not in raw), ("depth.npy", has_depth and "depth.npy" not in raw)) if absent]
    if missing:
        said = " although index.json says depth_kind=disparity" if missing == ["depth.npy"] else ""
        raise ShardError(f"{shard_path}: sample {key} has no member {key}.{missing[0]}{said}; {fix}")
    decoders = [(image_ext, decode_image), ("cls", lambda data: int(data.decode("ascii").strip()))]
    decoders += [("depth.npy", decode_disparity)] if has_depth else []
    decoders += [("source.txt", lambda data: data.decode("utf-8"))] if "source.txt" in raw else []
    decoded = {}
    for ext, decode in decoders:
        try:
            decoded[ext] = decode(raw[ext])
        except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ShardError(f"{shard_path}: member {key}.{ext} cannot be decoded ({reason}); {fix}") from err
    image, disparity = decoded[image_ext], decoded.get("depth.npy")
    size = resolution
    for ext, shape, expected in ((image_ext, image.shape, (size, size, 3)), ("depth.npy", getattr(disparity, "shape", None), (size, size))):
        if shape is not None and tuple(shape) != expected:
            raise ShardError(f"{shard_path}: member {key}.{ext} is {tuple(shape)}, not {expected} as index.json's resolution says; {fix}")
    return {"key": key, "source": decoded.get("source.txt", ""), "image": image, "disparity": disparity, "class_id": decoded["cls"]}


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
    ``.source.txt`` and ``.cls`` members only (image and depth bytes are skipped, not read).

    Local files through ``tarfile`` rather than webdataset: webdataset streams every byte and gives
    no member offsets, while this seeks past the large members and records where they lie, for
    :func:`read_sample` to read one sample by offset later (the eval and preview sets)."""
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

"""The prepared-dataset format: WebDataset-layout tar shards and their ``index.json``, written by
``vq3d prepare``; how a sample is encoded and decoded, and how the index is written, read and checked
against the shards. The other shard modules read this format: from where
(:mod:`~vq3d_nerfstudio.data.shard_sources`), streaming (:mod:`~vq3d_nerfstudio.data.shard_stream`)
or by byte offset (:mod:`~vq3d_nerfstudio.data.shard_access`); the errors they raise are defined here.

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
``webdataset.TarWriter`` (and the streaming reader reads through ``webdataset.gopen`` and its tar
iterators), so shards are what any WebDataset pipeline reads. Members are written
deterministically (ustar headers, mtime 0, uid/gid 0, empty user/group names, mode 0644, sample
order and member order fixed), so the same inputs give byte-identical shards. Each shard is
written under a hidden temporary name and renamed when complete: a killed run never leaves a
partial shard under a shard's name.

``index.json``: ``format``/``version``, ``complete``, ``resolution``, ``image_format``,
``num_samples``, ``num_inputs``, ``class_names``, ``depth_kind`` ("disparity" or "none"),
``depth_source`` ("files", "model", "files+model" or null), ``depth_model`` and
``depth_model_type`` (or null), ``shard_size``, ``inputs_sha256`` (fingerprint of the input list),
``shards`` (per shard: ``name``, ``num_samples``, ``num_bytes``, ``sha256``, ``skipped`` inputs),
``ignored`` (inputs outside any shard) and ``num_skipped``.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import webdataset
from PIL import Image

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
            raise checksum_error(path, size, entry)


def checksum_error(where: Union[Path, str], size: int, entry: Dict[str, Any]) -> ShardError:
    """The :class:`ShardError` for a shard (a file, URL or ``pipe:`` command) of ``size`` bytes whose
    size or sha256 differs from its index ``entry``."""
    return ShardError(
        f"{where}: checksum mismatch ({size} bytes, index says {entry['num_bytes']}; sha256 differs): "
        "the shard is truncated or was modified; delete it and rerun `vq3d prepare` with the same "
        "options to rewrite it"
    )


def decode_sample(
    raw: Dict[str, bytes], shard_path: Union[Path, str], resolution: int, has_depth: bool
) -> Dict[str, Any]:
    """One sample's members (``{ext: bytes, "__key__": key}``) -> the item
    :class:`~vq3d_nerfstudio.data.shard_stream.ShardReader` yields. Errors are :class:`ShardError`
    naming the shard and the sample."""
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


def num_shards_for(num_inputs: int, shard_size: int) -> int:
    """Shards needed for ``num_inputs`` inputs at ``shard_size`` inputs each (at least one)."""
    return max(1, math.ceil(num_inputs / shard_size))

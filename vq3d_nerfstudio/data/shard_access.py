"""Random access into local prepared shards: where each sample's members lie (:func:`scan_shard`,
reading tar headers only) and one sample read by byte offset (:func:`read_sample`), for the small
eval and preview sets that nerfstudio reads by index. Local files through ``tarfile`` rather than
webdataset, which only streams (:mod:`~vq3d_nerfstudio.data.shard_stream`).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from vq3d_nerfstudio.data.shard_format import ShardError


@dataclass(frozen=True)
class SampleLocation:
    """Where one sample's members lie inside its shard, for random access without a scan."""

    shard: str  # file name, e.g. shard-000000.tar
    position: int  # index of the sample inside the shard
    key: str
    source: str
    class_id: int
    members: Tuple[Tuple[str, int, int], ...]  # (ext, byte offset of the data, size)


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

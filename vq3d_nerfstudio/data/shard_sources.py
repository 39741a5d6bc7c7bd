"""Where prepared shards are read from: a local folder, or remote sources that ``webdataset.gopen``
opens (training on a cluster without a shared file system). Parsing a source, finding its
``index.json`` and checking its shards' checksums through ``gopen``; apart from the format
(:mod:`~vq3d_nerfstudio.data.shard_format`) because only the streaming reader
(:mod:`~vq3d_nerfstudio.data.shard_stream`) reads anything but local files.

Sources :class:`~vq3d_nerfstudio.data.shard_stream.ShardReader` streams from:

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
one :class:`~vq3d_nerfstudio.data.shard_format.ShardError` naming the address tried. ``http(s)://``
is read with ``curl`` (as webdataset does) and ``pipe:`` runs its command through the shell: use
trusted sources only.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from vq3d_nerfstudio.data.shard_format import INDEX_NAME, ShardError, checksum_error, parse_index, read_index

_REMOTE = re.compile(r"^(?:https?://|pipe:)")
_SHARD_FILE = re.compile(r"[^/\s'\"]+\.tar(?=$|[\s'\"])")
"""A shard's file name inside a source (a path, URL or ``pipe:`` command): the last one is the shard."""


def _shard_file(text: str) -> Optional[re.Match]:
    matches = list(_SHARD_FILE.finditer(text))
    return matches[-1] if matches else None


@dataclass(frozen=True)
class ShardSource:
    """Where :class:`~vq3d_nerfstudio.data.shard_stream.ShardReader` finds ``index.json`` and the
    shards (see the module docstring)."""

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
    """Parse what :class:`~vq3d_nerfstudio.data.shard_stream.ShardReader` is given: a local folder, a
    folder URL, or a shard pattern (URL, ``pipe:`` command or path ending in ``.tar``, braces allowed)
    with ``index.json`` beside it."""
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
    """The checked ``index.json`` of a source (local folders:
    :func:`~vq3d_nerfstudio.data.shard_format.read_index`, with its messages)."""
    if source.local and source.folder is not None:
        return read_index(Path(source.folder))
    try:
        with gopen(source.index_url, "rb") as stream:
            data = stream.read()
    except (OSError, ValueError) as err:
        raise ShardError(
            f"{source.index_url}: cannot read the shard index ({gopen_reason(err)}); streaming {source.location} needs "
            f"the {INDEX_NAME} of its `vq3d prepare` run beside the shards: copy or serve the whole output folder"
        ) from err
    return parse_index(data, source.index_url)


def verify_streamed(shards: Sequence[Tuple[str, Dict[str, Any]]]) -> None:
    """:func:`~vq3d_nerfstudio.data.shard_format.verify_shards` for shards read through ``gopen``
    (URLs, ``pipe:``, patterns): ``shards`` are ``(address, index entry)`` as :meth:`ShardSource.shards`
    gives them."""
    for url, entry in shards:
        digest, size = hashlib.sha256(), 0
        try:
            with gopen(url, "rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 22), b""):
                    digest.update(chunk)
                    size += len(chunk)
        except (OSError, ValueError) as err:
            raise ShardError(
                f"{url}: cannot be read ({gopen_reason(err)}); check the source, or rerun `vq3d prepare`"
            ) from err
        if size != entry["num_bytes"] or digest.hexdigest() != entry["sha256"]:
            raise checksum_error(url, size, entry)


def gopen_reason(err: BaseException) -> str:
    """An exception's own message: webdataset appends the stream and URL to ``args`` (and `` @ <stream>``
    to the message), which our messages name already."""
    if not err.args:
        return type(err).__name__
    return str(err.args[0]).split(" @ <")[0]

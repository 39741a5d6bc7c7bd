"""Files written so that a killed run never leaves a half-written one under its final name, and
their checksums: the bottom layer (imports nothing of ours)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator, Optional


def temporary_path(path: Path, folder: Optional[Path] = None) -> Path:
    """Hidden name ``path`` is written under (in ``folder``, default beside it) before the rename
    that makes it visible."""
    return (folder or path.parent) / f".{path.name}.partial"


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path, folder: Optional[Path] = None) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; when the block ends without an error
    the file is fsync'ed and renamed over ``path``, otherwise removed. ``folder``: where the
    temporary file lives (same file system as ``path``), when not beside it."""
    tmp = temporary_path(path, folder)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def try_download(url: str, path: Path, hash_prefix: Optional[str] = None) -> None:
    """Download ``url`` to ``path`` with torch hub's downloader (``hash_prefix``: the leading hex of
    its sha256, checked); offline or on a bad hash it prints why and returns, and the caller reports
    the missing file in its own words."""
    # torch and nerfstudio are imported here, not at the top: `vq3d synth` imports this module
    # (atomic writes) and must not load torch.
    import torch
    from nerfstudio.utils.rich_utils import CONSOLE

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        CONSOLE.print(f"Downloading {url} to {path}")
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix, progress=False)
    except Exception as err:  # offline, proxy, disk, bad hash: all mean "not available"
        CONSOLE.print(f"[yellow]download failed ({type(err).__name__}: {err})")

"""Files written so that a killed run never leaves a half-written one under its final name, their
checksums, the file names made from labels that others wrote (class names), and the one loader of
downloaded network weights (:func:`load_weights`): the bottom layer (imports only ``errors``)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Type

from vq3d_nerfstudio.errors import Vq3dError

if TYPE_CHECKING:
    import torch


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


#: ``errno`` of a write refused for want of space: the file system is full, or the user's quota is.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

#: How libraries that wrap that OSError word it: Rust's io::Error in safetensors' SafetensorError
#: ("os error 28"), torch.save's zip writer, which loses the errno ("unexpected pos 576 vs 534",
#: "PytorchStreamWriter failed writing file"), ffmpeg's log.
_QUOTA_TEXTS = ("Disk quota exceeded", "os error 122")
_DISK_FULL_TEXTS = ("No space left on device", "os error 28", "unexpected pos", "PytorchStreamWriter failed writing file")


class DiskFullError(OSError, Vq3dError):
    """A write that failed because the disk is full (or the quota used up). Its message is one line
    naming the file (``filename``; None when unknown) and where to free space; whatever was half
    written has been removed by the writer that raised it."""

    def __init__(self, path: Optional[Path], reason: str = os.strerror(errno.ENOSPC)):
        super().__init__(errno.ENOSPC, reason, None if path is None else str(path))

    def __reduce__(self):  # from a worker process: rebuilt from what __init__ takes
        return type(self), (self.filename, self.strerror)

    def __str__(self) -> str:
        if self.filename is None:
            return f"the disk is full ({self.strerror}); free some space or write somewhere else"
        folder = Path(self.filename).parent
        return f"{self.filename}: not written, the disk is full ({self.strerror}); free space in {folder} or write somewhere else"


def disk_full_reason(err: Optional[BaseException]) -> Optional[str]:
    """``"No space left on device"`` or ``"Disk quota exceeded"`` when ``err``, or an error it was
    raised from or while handling, is an out-of-space failure (an OSError with ENOSPC or EDQUOT,
    or a library's wrapped form of one); otherwise None."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return os.strerror(err.errno)
        text = str(err)
        if any(t in text for t in _QUOTA_TEXTS):
            return os.strerror(errno.EDQUOT)
        if any(t in text for t in _DISK_FULL_TEXTS):
            return os.strerror(errno.ENOSPC)
        err = err.__cause__ or err.__context__
    return None


def _failed_file(err: Optional[BaseException]) -> Optional[str]:
    """The file name an OSError in ``err``'s chain carries, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.filename:
            return os.fsdecode(err.filename)
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def disk_full_as_error(path: Optional[Path] = None) -> Iterator[None]:
    """Raise an out-of-space failure in the block (:func:`disk_full_reason`) as :class:`DiskFullError`
    naming ``path`` (default: the file the OSError names); other errors pass unchanged. The one place
    a full disk becomes one line: writers wrap their writes in it, commands their whole run."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        reason = disk_full_reason(err)
        if reason is None:
            raise
        raise DiskFullError(path if path is not None else _failed_file(err), reason) from err


@contextlib.contextmanager
def atomic_path(path: Path, folder: Optional[Path] = None) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; when the block ends without an error
    the file is fsync'ed and renamed over ``path``, otherwise removed. ``folder``: where the
    temporary file lives (same file system as ``path``), when not beside it. A full disk raises
    :class:`DiskFullError` naming ``path``, and the file there before (if any) stays as it was."""
    tmp = temporary_path(path, folder)
    try:
        with disk_full_as_error(path):
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


class WeightsUnavailable(Vq3dError, RuntimeError):
    """Pretrained network weights (the FID Inception-v3, LPIPS' ImageNet backbone) that are not on
    this machine, or a file that does not hold them; the message is one line naming the file and the fix."""


def _refusal_reason(err: Exception) -> str:
    """The line of ``torch.load(weights_only=True)``'s long message that says what it refused
    (``Trying to load unsupported GLOBAL posix.system ...``, ``Unsupported operand 110``)."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(boilerplate)]
    return lines[-1][:200] if lines else type(err).__name__


def load_weights(
    path: Path,
    needed: str,
    url: Optional[str] = None,
    download: bool = False,
    hash_prefix: Optional[str] = None,
    error: Type[WeightsUnavailable] = WeightsUnavailable,
) -> Dict[str, "torch.Tensor"]:
    """The state dict in ``path``: the one way the project reads pretrained weights it does not train.

    Read once, without running anything in the file: ``*.safetensors`` with safetensors (a JSON header
    and raw bytes), anything else with ``torch.load(weights_only=True)``, which refuses pickled objects
    other than tensors and plain containers. Callers hand the dict to their network's
    ``load_state_dict``; no library re-reads the file.

    Args:
        path: the weights file (a user's path, or where torch hub caches ``url``).
        needed: what the weights are for, the start of the missing-file message
            (``"FID needs the Inception weights pt_inception-2015-12-05"``).
        url: where the file is published; named in the messages, and downloaded to ``path`` first
            when ``download`` and ``path`` is missing (:func:`try_download`, sha256 ``hash_prefix`` checked).
        error: the :class:`WeightsUnavailable` subclass to raise (e.g. LPIPS' own, which callers catch).

    Raises:
        error: ``"<needed> at <path>; download <url> there (or pass the file's path)"`` when the file
            is missing; ``"<path>: not a readable state dict (<reason>); nothing in it was run; ..."``
            when it is unreadable or holds pickled objects beyond tensors (refused, not run);
            ``"<path>: not a state dict ..."`` when it holds something other than a dict of tensors.
    """
    import torch  # here, not at the top: see try_download

    path = Path(path)
    if not path.is_file() and download and url is not None:
        try_download(url, path, hash_prefix=hash_prefix)
    if not path.is_file():
        fix = f"download {url} there (or pass the file's path)" if url else "pass the file's path"
        raise error(f"{needed} at {path}; {fix}")
    fix = f"replace it with {url}" if url else "pass another file"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, or a pickle of more than tensors: all one line
        raise error(f"{path}: not a readable state dict ({_refusal_reason(err)}); nothing in it was run; {fix}") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise error(f"{path}: not a state dict (a dict of tensors, as torch.save(module.state_dict()) writes); {fix}")
    return state


# ---- file names made from names others wrote ----------------------------------------------------
#: What never goes into a file name made from a label: path separators and the characters Windows
#: refuses (``:`` also opens an NTFS stream).
_REFUSED_CHARS = re.compile(r'[\\/:*?"<>|]')
_WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))})
MAX_NAME_BYTES = 96
"""Longest file-name part made from a label (UTF-8 bytes): room for the suffixes commands add
(``_000_disparity.mp4``) within the 255 bytes file systems allow."""


def safe_file_name(name: str, fallback: str = "unnamed") -> str:
    """``name`` (a class name from a checkpoint, a token cache or a ``vq3d prepare`` list file) as one
    readable part of a file name that stays in the folder it is written to: the parts between path
    separators are joined by ``_`` (``cars/sedan`` -> ``cars_sedan``) with the empty, ``.`` and ``..``
    ones dropped (``../../ESC`` -> ``ESC``); leading and trailing dots and spaces, control and
    invisible characters go; characters file systems refuse become ``_``; a Windows device name
    gains a ``_``; past :data:`MAX_NAME_BYTES` it is cut and ends in a hash of the whole name.
    Nothing left: ``fallback``. Several names may give one part: :func:`safe_file_names` keeps a
    list's parts distinct. This is the one place a name becomes a path."""
    text = unicodedata.normalize("NFC", str(name))
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)  # controls, bidi overrides
    parts = (part.strip(" .") for part in re.split(r"[\\/]", text))
    text = _REFUSED_CHARS.sub("_", "_".join(part for part in parts if part))
    text = re.sub(r"\s+", " ", text).strip(" .")
    if not text:
        return fallback
    device, dot, rest = text.partition(".")
    if device.upper() in _WINDOWS_DEVICES:
        text = f"{device}_{dot}{rest}"
    if len(text.encode("utf-8")) > MAX_NAME_BYTES:
        digest = hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:8]
        head = text.encode("utf-8")[: MAX_NAME_BYTES - 9].decode("utf-8", "ignore").rstrip(" .")
        text = f"{head}-{digest}"
    return text


def safe_file_names(names: Sequence[str], fallbacks: Optional[Sequence[str]] = None) -> List[str]:
    """:func:`safe_file_name` of each of ``names`` (``fallbacks[i]``, default ``unnamed``, for one
    that leaves nothing), all distinct even where the file system ignores case: names that come
    through unchanged keep their part (in list order), a clash gets ``-2``, ``-3``, ... (``cars_sedan``
    and ``cars/sedan`` -> ``cars_sedan``, ``cars_sedan-2``)."""
    safe = [safe_file_name(n, fallbacks[i] if fallbacks else "unnamed") for i, n in enumerate(names)]
    result: List[str] = [""] * len(safe)
    taken = set()
    for i in sorted(range(len(safe)), key=lambda i: safe[i] != names[i]):  # stable: unchanged names first
        candidate, count = safe[i], 1
        while candidate.casefold() in taken:
            count += 1
            candidate = f"{safe[i]}-{count}"
        taken.add(candidate.casefold())
        result[i] = candidate
    return result

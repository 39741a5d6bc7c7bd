"""The token cache: a dataset encoded once to stage-1 code grids, and the batches stage 2 reads.

Layout of a cache folder (plain ``.npy`` and JSON: loading never executes code)::

    meta.json              codebook size, grid, classes, split sizes, fingerprint, stage-1 paths
    train.codes.npy        (N, h, w) uint16 (int32 when the codebook exceeds 65536 codes); (N, h, w, G)
                           with G codes per token, read by stage 2 as one sequence, a token's codes in a row
    train.classes.npy      (N,) int64, class ids in [0, num_classes) (0 for unlabelled data)
    eval.codes.npy / eval.classes.npy   the held-out split (bits per token)

While encoding, finished chunks sit in ``parts/<split>-<chunk>.npz`` (each written to a temporary
name and renamed), so an interrupted run resumes at the first missing chunk (a chunk that does not
load, e.g. an empty or truncated copy, is encoded again); ``meta.json`` is
written last and marks the cache complete. The fingerprint covers the stage-1 checkpoint's bytes and
the image list (paths, sizes, modification times, class labels): a cache is reused only when all are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from vq3d_nerfstudio.data.dataset import SKIPPED_KEY, item_or_next_readable
from vq3d_nerfstudio.data.shard_access import read_sample, scan_shard
from vq3d_nerfstudio.data.shard_dataset import held_out_rule
from vq3d_nerfstudio.data.shard_format import decode_sample, read_index
from vq3d_nerfstudio.data.workers import ErrorCarryingLoader
from vq3d_nerfstudio.errors import Vq3dError
from vq3d_nerfstudio.files import atomic_path, temporary_path, write_atomic

CACHE_VERSION = 1
SPLITS = ("train", "eval")


class TokenCacheError(Vq3dError, ValueError):
    """A token cache that is missing, incomplete, tampered with or does not fit the model."""


@dataclass
class TokenSplit:
    codes: np.ndarray  # (N, h, w) or (N, h, w, G), memory-mapped
    classes: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return int(self.codes.shape[0])


@dataclass
class TokenCache:
    path: Path
    meta: Dict
    train: TokenSplit
    eval: TokenSplit

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def class_names(self) -> List[str]:
        return list(self.meta["class_names"])

    @property
    def num_tokens(self) -> int:
        """Codes per scene: the sequence stage 2 models (h * w, times G with G codes per token)."""
        return int(np.prod(self.meta["grid"]))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def write_json_atomic(path: Path, value: Dict) -> None:
    write_atomic(path, json.dumps(value, indent=1).encode("utf-8"))


def codes_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


def write_token_cache(
    path: Path,
    splits: Dict[str, Tuple[np.ndarray, np.ndarray]],
    codebook_size: int,
    class_names: Sequence[str],
    extra_meta: Optional[Dict] = None,
) -> TokenCache:
    """Write a complete cache from in-memory ``{split: (codes (N, h, w) or (N, h, w, G), classes (N,))}``."""
    path.mkdir(parents=True, exist_ok=True)
    grid = None
    sizes = {}
    for split in SPLITS:
        codes, classes = splits[split]
        grid = list(codes.shape[1:])
        _save_npy(path / f"{split}.codes.npy", np.asarray(codes).astype(codes_dtype(codebook_size)))
        _save_npy(path / f"{split}.classes.npy", np.asarray(classes).astype(np.int64))
        sizes[split] = int(codes.shape[0])
    meta = {
        "version": CACHE_VERSION,
        "codebook_size": int(codebook_size),
        "grid": grid,
        "class_names": list(class_names),
        "num_classes": max(1, len(class_names)),
        "sizes": sizes,
        **(extra_meta or {}),
    }
    write_json_atomic(path / "meta.json", meta)
    return load_token_cache(path)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def meta_problem(meta) -> Optional[str]:
    """Why the contents of a cache's ``meta.json`` are not a finished cache's (one phrase), or ``None``."""
    if not isinstance(meta, dict):
        return f"holds a {type(meta).__name__}, not a JSON object"
    for key in ("codebook_size", "num_classes"):
        if not _count(meta.get(key)) or meta[key] < 1:
            return f"{key!r} is {meta.get(key)!r}, not a positive integer"
    grid = meta.get("grid")
    if not isinstance(grid, list) or not grid or not all(_count(g) and g >= 1 for g in grid):
        return f"'grid' is {grid!r}, not a list of positive integers"
    sizes = meta.get("sizes")
    if not isinstance(sizes, dict):
        return "has no 'sizes'" if sizes is None else f"'sizes' is {sizes!r}, not {{\"train\": N, \"eval\": N}}"
    for split in SPLITS:
        if not _count(sizes.get(split)) or sizes[split] < 0:
            return f"'sizes' gives {split}: {sizes.get(split)!r}, not a count of scenes"
    names = meta.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return f"'class_names' is {names!r}, not a list of names"
    return None


def _array_problem(file: Path, array: np.ndarray, what: str) -> Optional[str]:
    """Why ``array`` (a split's codes or class ids) cannot be used: not integers (NaN codes, float class ids)."""
    if array.dtype.kind in "iu":
        return None
    has_nan = array.dtype.kind == "f" and bool(np.isnan(array).any())
    return f"{file}: holds {array.dtype} values{' (NaN among them)' if has_nan else ''}, not integer {what}"


def load_token_cache(path: Path, validate: bool = True) -> TokenCache:
    """Open a finished cache (codes memory-mapped). Anything missing, empty, truncated, mistyped or out
    of range is one :class:`TokenCacheError` naming the file and ending in "the token cache is
    damaged" (the caller says how to rebuild it)."""
    meta_file = path / "meta.json"
    if not meta_file.exists():
        raise TokenCacheError(f"{path}: not a finished token cache (no meta.json); rerun vq3d-train-stage2 to build it")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = "empty file" if meta_file.stat().st_size == 0 else f"{type(err).__name__}: {err}"
        raise TokenCacheError(f"{meta_file}: unreadable ({reason}); the token cache is damaged") from err
    problem = meta_problem(meta)
    if problem is not None:
        raise TokenCacheError(f"{meta_file}: {problem}; the token cache is damaged")
    codebook_size, grid, sizes, num_classes = meta["codebook_size"], tuple(meta["grid"]), meta["sizes"], meta["num_classes"]
    loaded = {}
    for split in SPLITS:
        arrays = []
        for name in ("codes", "classes"):
            file = path / f"{split}.{name}.npy"
            try:
                arrays.append(np.load(file, mmap_mode="r" if name == "codes" else None, allow_pickle=False))
            except (OSError, ValueError, EOFError) as err:
                reason = "empty file, 0 bytes" if file.is_file() and file.stat().st_size == 0 else str(err)
                raise TokenCacheError(f"{file}: unreadable ({reason}); the token cache is damaged") from err
        codes, classes = arrays
        for file, array, what in ((f"{path / split}.codes.npy", codes, "codes"), (f"{path / split}.classes.npy", classes, "class ids")):
            problem = _array_problem(Path(file), array, what)
            if problem is not None:
                raise TokenCacheError(f"{problem}; the token cache is damaged")
        expected = (int(sizes[split]), *grid)
        if codes.shape != expected or classes.shape != expected[:1]:
            raise TokenCacheError(
                f"{path / split}.*.npy: shapes {codes.shape} / {classes.shape} do not match meta.json {expected}; "
                "the token cache is damaged"
            )
        if validate and len(codes):
            if int(codes.max()) >= codebook_size or (codes.dtype.kind == "i" and int(codes.min()) < 0):
                raise TokenCacheError(f"{path / split}.codes.npy: codes outside [0, {codebook_size}); the token cache is damaged")
            if int(classes.min()) < 0 or int(classes.max()) >= num_classes:
                raise TokenCacheError(f"{path / split}.classes.npy: class ids outside [0, {num_classes}); the token cache is damaged")
        loaded[split] = TokenSplit(codes, classes)
    return TokenCache(path, meta, loaded["train"], loaded["eval"])


# ---- building a cache from a stage-1 run ---------------------------------------------------------
def listing_digest(files: Sequence[Path]) -> str:
    """Hash of every image's path, size and modification time (cheap; catches added, removed and
    rewritten files)."""
    digest = hashlib.sha256()
    for file in files:
        stat = Path(file).stat()
        digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def chunk_ranges(num: int, chunk_size: int) -> List[Tuple[int, int]]:
    return [(start, min(start + chunk_size, num)) for start in range(0, num, chunk_size)]


def _read_part(part: Path) -> Tuple[np.ndarray, np.ndarray]:
    """``(codes, classes)`` of a finished chunk; an empty, truncated or mistyped one is a
    :class:`TokenCacheError` naming it."""
    try:
        with np.load(part, allow_pickle=False) as data:
            codes, classes = data["codes"], data["classes"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        reason = "empty file, 0 bytes" if part.stat().st_size == 0 else f"{type(err).__name__}: {err}"
        raise TokenCacheError(f"{part}: unreadable chunk ({reason})") from err
    for array, what in ((codes, "codes"), (classes, "class ids")):
        problem = _array_problem(part, array, what)
        if problem is not None:
            raise TokenCacheError(problem)
    return codes, classes


def part_problem(part: Path, num: int) -> Optional[str]:
    """Why a finished chunk file cannot be used (it must hold ``num`` scenes), or ``None``."""
    try:
        codes, classes = _read_part(part)
    except TokenCacheError as err:
        return str(err)
    if len(codes) != num or len(classes) != num:
        return f"{part}: holds {len(codes)} scenes, not {num}"
    return None


def encode_split(
    encode: Callable[[torch.Tensor], torch.Tensor],
    dataset: torch.utils.data.Dataset,
    parts_dir: Path,
    split: str,
    chunk_size: int,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    on_images: Optional[Callable[[int], None]] = None,
) -> None:
    """Encode this rank's chunks of ``dataset`` (chunk ``c`` belongs to rank ``c % world_size``) into
    ``parts_dir/<split>-<c>.npz`` (codes and classes), skipping chunks already there."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    for chunk, (start, stop) in enumerate(chunk_ranges(len(dataset), chunk_size)):
        part = parts_dir / f"{split}-{chunk:06d}.npz"
        if chunk % world_size != rank:
            continue
        if part.exists():
            problem = part_problem(part, stop - start)
            if problem is None:
                if on_images:
                    on_images(stop - start)
                continue
            print(f"{problem}: encoding that chunk again")
            part.unlink()
        subset = torch.utils.data.Subset(dataset, range(start, stop))
        loader = ErrorCarryingLoader(subset, batch_size=batch_size, num_workers=num_workers)  # a DatasetError as itself
        codes, classes = [], []
        for batch in loader:
            images = batch["image"].permute(0, 3, 1, 2)  # (B, 3, S, S)
            codes.append(encode(images).cpu().numpy())
            classes.append(batch["class_id"].numpy())
            if on_images:
                on_images(images.shape[0])

        with atomic_path(part) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, codes=np.concatenate(codes), classes=np.concatenate(classes))


def assemble_cache(path: Path, sizes: Dict[str, int], chunk_size: int, codebook_size: int, meta: Dict) -> TokenCache:
    """Concatenate the finished chunks into the split arrays, write ``meta.json``, drop the chunks."""
    parts_dir = path / "parts"
    for split in SPLITS:
        ranges = chunk_ranges(sizes[split], chunk_size)
        codes_out = classes_out = None
        final_codes = path / f"{split}.codes.npy"
        for chunk, (start, stop) in enumerate(ranges):
            codes, classes = _read_part(parts_dir / f"{split}-{chunk:06d}.npz")
            if codes_out is None:
                tmp_codes = temporary_path(final_codes)
                codes_out = np.lib.format.open_memmap(
                    tmp_codes, mode="w+", dtype=codes_dtype(codebook_size), shape=(sizes[split], *codes.shape[1:])
                )
                classes_out = np.zeros(sizes[split], dtype=np.int64)
            codes_out[start:stop] = codes
            classes_out[start:stop] = np.maximum(classes, 0)  # unlabelled (-1) -> class 0
        if codes_out is None:
            grid = tuple(meta["grid"])
            _save_npy(final_codes, np.zeros((0, *grid), codes_dtype(codebook_size)))
            _save_npy(path / f"{split}.classes.npy", np.zeros(0, np.int64))
            continue
        codes_out.flush()
        del codes_out
        os.replace(tmp_codes, final_codes)
        _save_npy(path / f"{split}.classes.npy", classes_out)
    write_json_atomic(path / "meta.json", {**meta, "sizes": sizes})
    shutil.rmtree(parts_dir, ignore_errors=True)
    return load_token_cache(path)


# ---- batches ---------------------------------------------------------------------------------------
def global_batch(num: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Dataset indices of the global batch at ``step``: epochs walk a fresh permutation (seeded by
    ``seed`` and the epoch), dropping the remainder, so the order depends only on the step (resume
    and any number of ranks see the same global batches)."""
    if num < batch_size:
        raise TokenCacheError(f"the token cache holds {num} training scenes, fewer than the batch size {batch_size}; lower --batch-size")
    per_epoch = num // batch_size
    epoch, within = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num)
    return perm[within * batch_size : (within + 1) * batch_size]


def rank_share(global_indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``r`` takes positions ``r, r + W, r + 2W, ...`` of the global batch; over an epoch that is
    rank ``r``'s shard of the permuted dataset, as with ``DistributedSampler``."""
    return global_indices[rank::world_size]


class ShardSplit(torch.utils.data.Dataset):
    """The training or held-out samples of a ``vq3d prepare`` output as a map-style dataset (each
    item read by byte offset), items ``{"image" [S, S, 3], "class_id"}`` like ``Vq3dImageDataset``'s.
    The held-out rule is the dataparser's, so stage 2 holds out what stage 1 held out. A sample that
    does not decode is handled as a folder's bad file is (``data.dataset.item_or_next_readable``):
    with ``strict`` its one-line :class:`~vq3d_nerfstudio.data.shard_format.ShardError`, otherwise the next
    readable sample in its place (``bad_files`` remembers it)."""

    def __init__(self, root: Path, split: str, eval_fraction: float, image_size: int, strict: bool = False) -> None:
        self.root, self.image_size, self.strict = Path(root), image_size, strict
        self.bad_files: Dict[int, str] = {}
        self.index = read_index(self.root)
        rule = held_out_rule(self.root, self.index, eval_fraction)
        want_eval = split != "train"
        self.locations = [
            loc for entry in self.index["shards"] for loc in scan_shard(self.root / entry["name"])
            if rule(loc.key, loc.source) == want_eval
        ]

    @property
    def class_names(self) -> List[str]:
        return list(self.index.get("class_names") or [])

    def fingerprint(self) -> str:
        """The shards' checksums from the index and which samples this split holds."""
        digest = hashlib.sha256(json.dumps([e.get("sha256") for e in self.index["shards"]]).encode())
        digest.update("\n".join(loc.key for loc in self.locations).encode())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.locations)

    def get_data(self, i: int) -> Dict:
        """Sample ``i`` decoded (a :class:`~vq3d_nerfstudio.data.shard_format.ShardError` when it does not)."""
        location = self.locations[i]
        sample = decode_sample(read_sample(self.root, location), self.root / location.shard, self.image_size, False)
        return {"image": sample["image"], "class_id": torch.tensor(sample["class_id"], dtype=torch.long)}

    def __getitem__(self, i: int) -> Dict:
        item = item_or_next_readable(self, i, lambda j: f"{self.root / self.locations[j].shard}:{self.locations[j].key}")
        item.pop(SKIPPED_KEY)  # as from a folder: the bad sample is replaced (bad_files keeps it)
        return item

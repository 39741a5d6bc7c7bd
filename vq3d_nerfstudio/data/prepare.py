"""Images -> WebDataset-layout tar shards + ``index.json``: what ``vq3d prepare`` runs.

Shard membership is fixed by the input list alone: inputs are ordered by a hash of their relative
path (classes mixed across shards, so a shard-level shuffle plus a small buffer gives mixed
batches) and shard ``k`` holds inputs ``[k * shard_size, (k + 1) * shard_size)`` minus the bad
ones. A restart therefore rebuilds exactly the shards that are missing, byte for byte (see
:mod:`vq3d_nerfstudio.data.shard_format` for the format).

Which sibling depth files are used, and as what kind, is decided by the rule the ``vq3d-images``
dataparser uses (:func:`~vq3d_nerfstudio.data.folders.sibling_depth_kind`), so that preparing a
folder and training on it directly cannot drift apart; they differ only where a depth model can
stand in for missing files (see :func:`list_inputs`).

Only light imports at module level: ``vq3d`` imports its ``prepare`` subcommand, and so this
module, at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from vq3d_nerfstudio.data import shard_format as fmt
from vq3d_nerfstudio.data.dataset import image_size_of, load_disparity, load_image
from vq3d_nerfstudio.data.folders import IMAGE_EXTENSIONS, DepthKind, scan_image_folder, sibling_depth_kind
from vq3d_nerfstudio.data.shard_format import (
    INDEX_NAME,
    IndexDamagedError,
    ShardError,
    encode_disparity,
    encode_image,
    read_index,
)
from vq3d_nerfstudio.errors import DatasetError, Vq3dError
from vq3d_nerfstudio.files import write_atomic


class PrepareError(Vq3dError, ValueError):
    """A problem with the inputs or options of ``vq3d prepare``; the message names the file and the fix."""


@dataclass(frozen=True)
class PrepareInput:
    """One input image, in the order it is sharded."""

    path: Path
    source: str  # relative path (POSIX) or the line of the list file: what reports and shards name
    class_id: int  # -1 without classes
    depth: Optional[Path]  # a sibling depth .npy to carry over, if used


@dataclass(frozen=True)
class InputList:
    """What ``--input`` holds."""

    items: List[PrepareInput]  # hash-ordered
    class_names: List[str]
    sibling_depth_kind: Optional[str]  # 'z-depth' / 'disparity' of the sibling files, None if unused
    ignored: List[Tuple[str, str]]  # (source, reason) of images that belong to no shard


def _order_key(source: str) -> Tuple[str, str]:
    return hashlib.sha1(source.encode("utf-8")).hexdigest(), source


def _read_list_file(list_file: Path) -> Tuple[List[Tuple[Path, str, Optional[str]]], List[str]]:
    """Lines ``path`` or ``path<TAB>class name``; ``#`` comments and blank lines are skipped;
    relative paths are relative to the list file's folder."""
    rows, seen = [], {}
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path_text, _, class_name = line.rstrip("\r\n").partition("\t")
        path_text, class_name = path_text.strip(), class_name.strip()
        if path_text in seen:
            raise PrepareError(
                f"{list_file}:{number}: {path_text} is listed twice (also line {seen[path_text]}); list each image once"
            )
        seen[path_text] = number
        path = Path(path_text).expanduser()
        rows.append((path if path.is_absolute() else list_file.parent / path, path_text, class_name or None))
    if not rows:
        raise PrepareError(f"{list_file}: lists no images; write one path per line (optionally <TAB> class name)")
    with_class = [r for r in rows if r[2] is not None]
    if with_class and len(with_class) != len(rows):
        missing = next(r for r in rows if r[2] is None)
        raise PrepareError(
            f"{list_file}: {missing[1]} has no class name but {len(with_class)} other lines have one; "
            "give every line a class (path<TAB>class) or none"
        )
    class_names = sorted({r[2] for r in with_class})
    return rows, class_names


def list_inputs(input_path: Path, depth_kind: DepthKind = "auto", use_depth_model: bool = False) -> InputList:
    """The inputs of ``--input`` (a folder as the ``vq3d-images`` dataparser reads it, or a list
    file), in shard order, with the sibling depth files to carry over.

    Sibling depth (``<image stem>.npy``) is used unless ``depth_kind == 'none'``; its kind comes
    from ``depth_kind`` or, with 'auto', from ``vq3d_meta.json`` / the scenes' ``transforms.json``.
    Either every image has one, or a depth model fills the gaps, or it is an error. Unlike the
    dataparser, a --depth-kind with no depth files at all is no error: the shards then hold the
    depth model's disparity, or none.
    """
    ignored: List[Tuple[str, str]] = []
    if input_path.is_dir():
        try:
            records, class_names, meta_kind = scan_image_folder(input_path)
        except DatasetError as err:
            raise PrepareError(str(err)) from err
        items = [PrepareInput(r.image, r.key, r.class_id, r.depth) for r in records]
        # Images beside the class folders have no class: report them rather than drop them silently.
        if class_names and not any(input_path.glob("*/transforms.json")):
            for path in sorted(input_path.iterdir()):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                    ignored.append((path.name, "image outside the class folders (no class); move it into one"))
    elif input_path.is_file():
        rows, class_names = _read_list_file(input_path)
        meta_kind = None
        items = []
        for path, source, class_name in rows:
            depth = path.with_suffix(".npy")
            class_id = class_names.index(class_name) if class_name is not None else -1
            items.append(PrepareInput(path, source, class_id, depth if depth.is_file() else None))
    else:
        raise PrepareError(f"{input_path}: no such file or folder; pass --input <folder of images or list file>")

    try:
        kind = sibling_depth_kind(
            depth_kind, [(item.path, item.depth) for item in items], meta_kind, required=False, gaps_filled=use_depth_model,
            unknown_fix="pass --depth-kind z-depth|disparity (or none to ignore them), or write vq3d_meta.json",
            missing_fix="add it, pass --depth-model to estimate the missing ones, or --depth-kind none",
        )
    except DatasetError as err:
        raise PrepareError(str(err)) from err
    if kind == "none":
        items = [PrepareInput(i.path, i.source, i.class_id, None) for i in items]
    items.sort(key=lambda item: _order_key(item.source))
    return InputList(items, class_names, None if kind == "none" else kind, ignored)


def inputs_fingerprint(items: Sequence[PrepareInput]) -> str:
    """sha256 of what decides the shards' membership and content sources."""
    rows = [[i.source, i.class_id, i.depth is not None] for i in items]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Decoding (runs in worker processes: numpy / Pillow / torch CPU only)


def _init_worker() -> None:
    import threading
    import time

    import torch

    torch.set_num_threads(1)
    parent = os.getppid()

    def exit_with_parent() -> None:  # forked workers hold the queue's pipe open and would outlive a killed run
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def decode_input(
    task: Tuple[str, Optional[str], Optional[str], int],
) -> Tuple[Optional[bytes], Optional[bytes], Optional[str]]:
    """``(image path, depth path, depth kind, resolution)`` -> ``(png, depth npy, error)``.

    The image goes through :func:`load_image` (EXIF orientation, greyscale / RGBA / CMYK / 16-bit,
    centre crop, resize); sibling depth through :func:`load_disparity`, stored as disparity with NaN
    where it is unknown. A file that fails gives ``(None, None, reason)``.
    """
    import numpy as np
    from PIL import Image


    image_path, depth_path, depth_kind, size = task
    try:
        image = load_image(Path(image_path), size)
        pixels = (image.numpy() * 255.0 + 0.5).astype(np.uint8)  # exact: load_image gives uint8 / 255
        depth_npy = None
        if depth_path is not None:
            disparity, mask = load_disparity(Path(depth_path), depth_kind, image_size_of(Path(image_path)), size)
            disparity = np.where(mask[..., 0].numpy(), disparity[..., 0].numpy(), np.nan)
            depth_npy = encode_disparity(disparity)
        return encode_image(pixels), depth_npy, None
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as err:  # DatasetError is a ValueError
        message = " ".join(str(err).split())  # one line: it goes into bad_files.txt
        if image_path not in message:
            message = f"{image_path}: {type(err).__name__}: {message}"
        return None, None, message


# ----------------------------------------------------------------------------------------------
# Pseudo-ground-truth depth through `transformers`


class DepthEstimator:
    """A ``transformers`` monocular depth model (DPT, Depth Anything, ...) loaded through
    ``AutoModelForDepthEstimation`` + ``AutoImageProcessor`` from a local directory or a hub name
    (weights only from safetensors: nothing is unpickled). Runs batched, on CUDA when available,
    and returns relative disparity at the prepared resolution.

    DPT and Depth Anything ("relative") predict relative inverse depth, stored as is; models that
    predict metric depth (``depth_estimation_type == "metric"``, ZoeDepth, Depth Pro) are inverted.
    """

    METRIC_MODEL_TYPES = ("zoedepth", "depth_pro")

    def __init__(self, name_or_path: str):
        try:
            import torch
            import transformers
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation
        except ImportError as err:
            raise PrepareError(
                f"--depth-model needs the optional dependency transformers ({err}); pip install transformers"
            ) from err
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.model = AutoModelForDepthEstimation.from_pretrained(name_or_path, use_safetensors=True)
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PrepareError(
                f"{name_or_path}: cannot load a depth model ({first}); pass a folder written by save_pretrained "
                "(safetensors) or a hub name such as depth-anything/Depth-Anything-V2-Small-hf (needs internet)"
            ) from err
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":  # same inputs -> same bytes, so restarted runs reproduce shards
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.model.to(self.device).eval()
        config = self.model.config
        self.model_type: str = config.model_type
        self.is_metric = (
            getattr(config, "depth_estimation_type", "relative") == "metric" or self.model_type in self.METRIC_MODEL_TYPES
        )

    def __call__(self, images: Sequence, size: int) -> List:
        """``images``: ``[S, S, 3]`` uint8 arrays -> ``[size, size]`` float32 disparity arrays."""
        import numpy as np
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            inputs = self.processor(images=list(images), return_tensors="pt")
            outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device))
            if hasattr(self.processor, "post_process_depth_estimation"):
                outputs.predicted_depth = outputs.predicted_depth.float()
                post = self.processor.post_process_depth_estimation(outputs, target_sizes=[(size, size)] * len(images))
                depth = torch.stack([p["predicted_depth"] for p in post])
            else:
                predicted = outputs.predicted_depth.float()[:, None]  # (B, 1, h, w)
                depth = F.interpolate(predicted, size=(size, size), mode="bicubic", align_corners=False)[:, 0]
        depth = depth.float().cpu().numpy()
        if self.is_metric:
            depth = np.where(depth > 0, 1.0 / np.where(depth > 0, depth, 1.0), np.nan)
        return [d.astype(np.float32) for d in depth]


# ----------------------------------------------------------------------------------------------
# The run


def _lock_output(output: Path):
    """Hold an exclusive lock on ``output`` while this process lives. A POSIX record lock (lockf), not
    flock: forked decoding workers do not inherit it, so a killed run never leaves it held."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    handle = open(output / ".prepare.lock", "w")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        raise PrepareError(
            f"{output}: another `vq3d prepare` is writing here; wait for it or pick another --output"
        ) from err
    return handle


def _settings(
    resolution: int, shard_size: int, listed: InputList, depth_model: Optional[str], depth_source: Optional[str]
) -> Dict[str, Any]:
    return {
        "resolution": resolution,
        "shard_size": shard_size,
        "inputs_sha256": inputs_fingerprint(listed.items),
        "depth_source": depth_source,
        "sibling_depth_kind": listed.sibling_depth_kind,
        "depth_model": depth_model,
    }


def prepare_shards(
    input_path: Path,
    output: Path,
    resolution: int = 256,
    depth_model: Optional[str] = None,
    depth_kind: DepthKind = "auto",
    shard_size: int = 1000,
    strict: bool = False,
    num_workers: int = 0,
    depth_batch_size: int = 16,
    progress: bool = False,
) -> Dict[str, Any]:
    """Write (or complete) the shards, ``index.json`` and ``bad_files.txt`` in ``output``.

    Shards already listed in an existing ``index.json`` with the same settings and present with the
    recorded size are kept; the others are written. Returns the final index.
    Raises :class:`PrepareError` (bad options, inputs, or a bad file under ``strict``).
    """
    output = Path(output)
    listed = list_inputs(Path(input_path), depth_kind, use_depth_model=depth_model is not None)
    items = listed.items
    if strict and listed.ignored:
        source, reason = listed.ignored[0]
        raise PrepareError(f"{Path(input_path) / source}: {reason} (--strict)")
    needs_model = [i for i, item in enumerate(items) if item.depth is None] if depth_model is not None else []
    from_files = any(item.depth is not None for item in items)
    depth_source = {(True, True): "files+model", (True, False): "files", (False, True): "model"}.get(
        (from_files, bool(needs_model))
    )
    settings = _settings(resolution, shard_size, listed, depth_model if needs_model else None, depth_source)

    output.mkdir(parents=True, exist_ok=True)
    lock = _lock_output(output)
    try:
        for stray in output.glob(".*.partial"):  # left by a killed run; never visible under a real name
            stray.unlink()
        num_shards = fmt.num_shards_for(len(items), shard_size)
        entries: List[Optional[Dict[str, Any]]] = [None] * num_shards
        model_type: Optional[str] = None
        previous = _previous_index(output)
        if previous is not None:
            old = {k: previous.get(k) for k in settings}
            if old != settings:
                changed = [k for k in settings if old[k] != settings[k]]
                raise PrepareError(
                    f"{output / fmt.INDEX_NAME}: was prepared with other settings or inputs "
                    f"({', '.join(f'{k}: {old[k]!r} -> {settings[k]!r}' for k in changed)}); "
                    "pass a new --output or delete that folder"
                )
            model_type = previous.get("depth_model_type")
            for k, entry in enumerate(previous.get("shards", [])[:num_shards]):
                path = output / fmt.shard_name(k)
                if entry is not None and path.is_file() and path.stat().st_size == entry["num_bytes"]:
                    entries[k] = entry
        todo = [k for k in range(num_shards) if entries[k] is None]

        def index(complete: bool) -> Dict[str, Any]:
            done = [e for e in entries if e is not None]
            skipped = sum(len(e["skipped"]) for e in done) + len(listed.ignored)
            return {
                "format": fmt.FORMAT_NAME,
                "version": fmt.FORMAT_VERSION,
                "complete": complete,
                "resolution": resolution,
                "image_format": "png",
                "num_samples": sum(e["num_samples"] for e in done),
                "num_inputs": len(items) + len(listed.ignored),
                "num_skipped": skipped,
                "class_names": listed.class_names,
                "depth_kind": "disparity" if depth_source is not None else "none",
                "depth_source": depth_source,
                "sibling_depth_kind": listed.sibling_depth_kind,
                "depth_model": settings["depth_model"],
                "depth_model_type": model_type,
                "shard_size": shard_size,
                "inputs_sha256": settings["inputs_sha256"],
                "shards": entries if not complete else done,
                "ignored": [{"source": s, "error": r} for s, r in listed.ignored],
            }

        estimator = None
        if todo:
            executor = _executor(num_workers)
            try:
                if needs_model:
                    estimator = DepthEstimator(depth_model)
                    model_type = estimator.model_type
                # Before the first shard appears: a shard in `output` always has an index beside it.
                fmt.write_index(output, index(complete=False))
                _write_shards(
                    output, items, todo, entries, shard_size, resolution, listed.sibling_depth_kind,
                    estimator, depth_batch_size, strict, executor, progress,
                    on_shard=lambda: fmt.write_index(output, index(complete=False)),
                )
            finally:
                if executor is not None:
                    executor.shutdown(cancel_futures=True)
        final = index(complete=True)
        bad = [(i["source"], i["error"]) for i in final["ignored"]]
        bad += [(s["source"], s["error"]) for e in final["shards"] for s in e["skipped"]]
        write_atomic(output / fmt.BAD_FILES_NAME, fmt.dump_bad_files(bad))
        fmt.write_index(output, final)
    finally:
        if lock is not None:
            lock.close()
    if final["num_samples"] == 0:
        raise PrepareError(f"{input_path}: none of the {len(items)} images could be read; see {output / fmt.BAD_FILES_NAME}")
    return final


def verify_prepared(output: Path) -> Tuple[int, List[str]]:
    """``vq3d prepare --verify``: ``(number of shards, one line per shard that is missing or whose size
    or sha256 differs from index.json)``. Reads every byte; writes nothing. An unreadable or
    unfinished index is a :class:`~vq3d_nerfstudio.data.shard_format.ShardError`."""
    index = read_index(Path(output), require_complete=False)  # the full check below, not the sizes alone
    if not index.get("complete"):
        raise ShardError(f"{Path(output) / INDEX_NAME}: `vq3d prepare` did not finish; rerun it with the same options to complete the shards")
    return len(index["shards"]), fmt.shard_problems(Path(output), index, sha256=True)


def _previous_index(output: Path) -> Optional[Dict[str, Any]]:
    if not (output / INDEX_NAME).exists():
        if any(output.glob("shard-*.tar")):
            raise PrepareError(f"{output}: holds shards but no index.json; pass a new --output or empty this folder")
        return None
    try:
        return read_index(output, require_complete=False)
    except IndexDamagedError as err:  # its shards cannot be checked against it: all are written again
        print(f"vq3d prepare: warning: {err.damage}; rebuilding the index and every shard", file=sys.stderr, flush=True)
        return None
    except ShardError as err:
        raise PrepareError(f"{err}; or pass a new --output") from err


def _executor(num_workers: int):
    if num_workers <= 0:
        return None
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork: workers start at once without re-importing nerfstudio; created before any model is loaded.
    context = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    return ProcessPoolExecutor(max_workers=num_workers, mp_context=context, initializer=_init_worker)


def _write_shards(
    output: Path,
    items: Sequence[PrepareInput],
    todo: Sequence[int],
    entries: List[Optional[Dict[str, Any]]],
    shard_size: int,
    resolution: int,
    depth_kind: Optional[str],
    estimator: Optional[DepthEstimator],
    depth_batch_size: int,
    strict: bool,
    executor,
    progress: bool,
    on_shard,
) -> None:
    from contextlib import nullcontext

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )


    def decode(k: int) -> Iterator:
        tasks = [
            (str(item.path), str(item.depth) if item.depth is not None else None, depth_kind, resolution)
            for item in items[k * shard_size : (k + 1) * shard_size]
        ]
        if executor is None:
            return map(decode_input, tasks)
        return executor.map(decode_input, tasks, chunksize=4)

    total = sum(len(items[k * shard_size : (k + 1) * shard_size]) for k in todo)
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    ) if progress else nullcontext()
    with bar:
        task = bar.add_task(f"Preparing {len(todo)} shard(s)", total=total) if progress else None
        pending = decode(todo[0])
        for n, k in enumerate(todo):
            results = pending
            if n + 1 < len(todo):  # decode the next shard while this one is finished and written
                pending = decode(todo[n + 1])
            start = k * shard_size
            samples, skipped, need_depth = [], [], []
            for offset, (png, depth_npy, error) in enumerate(results):
                item = items[start + offset]
                if progress:
                    bar.advance(task)
                if error is not None:
                    if strict:
                        raise PrepareError(f"{error} (--strict; without it bad files are skipped and listed)")
                    skipped.append({"source": item.source, "error": error})
                    continue
                if depth_npy is None and estimator is not None:
                    need_depth.append(len(samples))
                samples.append(fmt.EncodedSample(fmt.sample_key(start + offset), item.class_id, png, depth_npy, item.source))
            if need_depth:
                _estimate_depth(samples, need_depth, estimator, depth_batch_size, resolution)
            entry = fmt.write_shard(output / fmt.shard_name(k), samples)
            entry["skipped"] = skipped
            entries[k] = entry
            on_shard()


def _estimate_depth(samples: List, which: Sequence[int], estimator: DepthEstimator, batch_size: int, size: int) -> None:
    """Fill ``depth_npy`` of ``samples[which]`` from the model, in batches of the shard's own images
    (batches never cross shards, so a shard's bytes do not depend on the others)."""
    import dataclasses
    import io

    import numpy as np
    from PIL import Image


    for start in range(0, len(which), batch_size):
        chunk = which[start : start + batch_size]
        images = []
        for i in chunk:
            with Image.open(io.BytesIO(samples[i].png)) as pil:
                images.append(np.array(pil.convert("RGB")))
        for i, disparity in zip(chunk, estimator(images, size)):
            samples[i] = dataclasses.replace(samples[i], depth_npy=encode_disparity(disparity))

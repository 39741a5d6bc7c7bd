"""The token cache of stage 2: the dataset encoded to code grids by the frozen stage-1 encoder, built
once and reused while the stage-1 checkpoint and the images are unchanged (their fingerprint), each
rank of a ``torchrun`` encoding its share of the chunks. The cache's files and their checks are
:mod:`~vq3d_nerfstudio.stage2.data`'s."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

from vq3d_nerfstudio.checks import nerfstudio_checkpoint_problem
from vq3d_nerfstudio.data.dataparser import Vq3dImagesDataParserConfig
from vq3d_nerfstudio.data.dataset import Vq3dImageDataset
from vq3d_nerfstudio.data.shard_dataset import is_prepared_folder
from vq3d_nerfstudio.errors import Vq3dError
from vq3d_nerfstudio.files import file_sha256, write_atomic
from vq3d_nerfstudio.model_index import (
    WEIGHTS_FILE,
    check_named_run_config,
    is_package,
    resolve_model,
    run_config_problem,
)
from vq3d_nerfstudio.stage1.package import load_package
from vq3d_nerfstudio.stage2.data import (
    CACHE_VERSION,
    SPLITS,
    ShardSplit,
    TokenCache,
    TokenCacheError,
    assemble_cache,
    chunk_ranges,
    encode_split,
    listing_digest,
    load_token_cache,
)
from vq3d_nerfstudio.stage2.distributed import Dist


def default_cache_dir(folder: Path, data: Path) -> Path:
    """``<folder>/token_cache-<hash of the data path>`` (``folder``: the stage-1 run's)."""
    tag = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:12]
    return folder / f"token_cache-{tag}"


def rebuild_hint(cache_dir: Path) -> str:
    """How to rebuild a damaged cache given as ``--token-cache`` alone: the command with the stage-1
    run (and data) its ``meta.json`` names, when it is readable and that run's ``config.yml`` passes
    :func:`~vq3d_nerfstudio.model_index.run_config_problem` (the hint must not have the user vouch for
    a file that runs code); a placeholder otherwise."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text(encoding="utf-8"))
        stage1, data = meta.get("stage1_config"), meta.get("data")
    except (OSError, ValueError, AttributeError):
        stage1 = data = None
    safe = isinstance(stage1, str) and Path(stage1).is_file() and run_config_problem(Path(stage1)) is None
    stage1 = stage1 if safe else "<stage-1 run>/config.yml"
    data = f" --data {data}" if isinstance(data, str) else ""
    return f"; rebuild it with vq3d-train-stage2 --stage1-config {stage1}{data} --token-cache {cache_dir}"


def recorded_stage1(stage1_config: Optional[Path], cache: TokenCache) -> Optional[str]:
    """The stage-1 model the checkpoints record (``vq3d sample`` decodes with it): the cache's. A
    run ``config.yml`` that the ``meta.json`` of a cache given alone (``stage1_config`` None) names,
    not the user, is read with a safe loader first, and refused (``PackageError``) when it holds
    Python tags beyond nerfstudio's config classes (loading it would run code)."""
    recorded = cache.meta.get("stage1_config")
    if not isinstance(recorded, str) or not recorded:
        return None
    if stage1_config is None and Path(recorded).is_file():
        check_named_run_config(Path(recorded), cache.path / "meta.json", "--stage1-config")
    return recorded


def prepare_token_cache(
    stage1_config: Optional[Path], data: Optional[Path], token_cache: Optional[Path], output_dir: Path, dist: Dist,
    chunk_size: int, batch_size: int, num_workers: int,
) -> TokenCache:
    """The token cache of ``vq3d-train-stage2``'s options of the same names (``--stage1-config``,
    ``--data``, ``--token-cache``, ``--output-dir``, ``--encode-chunk-size``, ``--encode-batch-size``,
    ``--num-workers``): reused when its fingerprint matches, else the dataset is encoded (each rank
    its share of the chunks, resuming finished ones) and assembled. Problems are one-line
    ``Vq3dError``s (a damaged cache given alone: with the command that rebuilds it)."""
    if stage1_config is None:
        if token_cache is None:
            raise Vq3dError("pass --stage1-config <stage-1 run>/config.yml (or --token-cache DIR)")
        try:
            return load_token_cache(token_cache)
        except TokenCacheError as err:
            raise TokenCacheError(f"{err}{rebuild_hint(token_cache)}") from None
    from rich.progress import Progress

    stage1_path = stage1_config if stage1_config.is_file() else resolve_model(str(stage1_config))
    if is_package(stage1_path):  # a model package: no run, no dataset of its own
        if data is None:
            raise Vq3dError(f"{stage1_path} is a model package, which holds no dataset; pass --data IMAGES")
        model, info = load_package(stage1_path, str(dist.device))
        checkpoint_path, stage1_step = stage1_path / WEIGHTS_FILE, info["provenance"].get("step") or 0
        data = Path(data)
        parser_config = Vq3dImagesDataParserConfig(
            data=data, image_size=model.config.image_size, depth_kind="none", canonical_camera=model.canonical_camera,
        )
        cache_home = output_dir  # a package folder may be read-only (a shipped model)
    else:
        from nerfstudio.utils.eval_utils import eval_setup

        def check_checkpoint(config):  # an empty or truncated checkpoint: one line, not torch.load's traceback
            problem = nerfstudio_checkpoint_problem(config.get_checkpoint_dir(), config.load_step)
            if problem is not None:
                raise Vq3dError(problem)
            return config

        stage1, pipeline, checkpoint_path, stage1_step = eval_setup(
            stage1_path, test_mode="inference", update_config_callback=check_checkpoint
        )
        model = pipeline.model.to(dist.device)
        stage1_parser = stage1.pipeline.datamanager.dataparser
        data = Path(data or stage1_parser.data)
        if isinstance(stage1_parser, Vq3dImagesDataParserConfig):
            parser_config = dataclasses.replace(stage1_parser, data=data, depth_kind="none")
        else:  # stage 1 trained through another nerfstudio dataparser: read its images as a plain folder
            parser_config = Vq3dImagesDataParserConfig(
                data=data, image_size=model.config.image_size, depth_kind="none", canonical_camera=model.canonical_camera,
            )
        cache_home = stage1_path.parent
    if not model.quantizer.has_codes:
        raise Vq3dError(
            f"{stage1_config} has continuous tokens (no-quantizer) and no codes "
            "for stage 2 to model; train stage 1 with fsq-quantizer (or vq-quantizer)"
        )

    if is_prepared_folder(data):  # `vq3d prepare` shards: every sample, read by offset
        datasets = {s: ShardSplit(data, s, parser_config.eval_fraction, parser_config.image_size) for s in SPLITS}
        listings = {s: datasets[s].fingerprint() for s in SPLITS}
        class_names = datasets["train"].class_names
    else:
        parser = parser_config.setup()
        outputs = {split: parser.get_dataparser_outputs(split) for split in SPLITS}
        datasets = {split: Vq3dImageDataset(outputs[split]) for split in SPLITS}
        listings = {
            s: [listing_digest(outputs[s].image_filenames), outputs[s].metadata.get("class_ids")] for s in SPLITS
        }
        class_names = list(outputs["train"].metadata.get("class_names") or [])
    cache_dir = token_cache or default_cache_dir(cache_home, data)
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "version": CACHE_VERSION,
                "checkpoint": file_sha256(Path(checkpoint_path)),
                "images": listings,
                "classes": class_names,
                "image_size": parser_config.image_size,
            }
        ).encode()
    ).hexdigest()
    meta_file = cache_dir / "meta.json"
    why_rebuild = f"The stage-1 checkpoint, the images or their classes changed: rebuilding the token cache {cache_dir}"
    if meta_file.exists():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            same = isinstance(meta, dict) and meta.get("fingerprint") == fingerprint
            cache = load_token_cache(cache_dir) if same else None  # a changed cache is not read
        except TokenCacheError as err:
            why_rebuild, cache = f"{err}: rebuilding it", None
        except (OSError, ValueError) as err:  # ValueError: not JSON, not UTF-8
            why_rebuild, cache = f"{meta_file}: unreadable ({err}); the token cache is damaged: rebuilding it", None
        if cache is not None:
            if dist.is_main:
                print(f"Reusing the token cache {cache_dir} (same stage-1 checkpoint and images)")
            cache.meta["stage1_config"] = str(stage1_path.resolve())  # the run the user named, whatever meta.json names
            return cache
    parts = cache_dir / "parts"
    if dist.is_main:
        if meta_file.exists():
            print(why_rebuild)
            meta_file.unlink()
        stamp = parts / "fingerprint"
        if parts.exists() and (not stamp.exists() or stamp.read_text() != fingerprint):
            import shutil

            shutil.rmtree(parts)
        parts.mkdir(parents=True, exist_ok=True)
        write_atomic(stamp, fingerprint.encode("utf-8"))
    dist.barrier()
    mine = {
        split: sum(b - a for c, (a, b) in enumerate(chunk_ranges(len(datasets[split]), chunk_size)) if c % dist.world_size == dist.rank)
        for split in SPLITS
    }
    encode = lambda images: model.encode_to_indices(images.to(dist.device))  # noqa: E731
    with Progress(disable=not dist.is_main) as progress:
        for split in SPLITS:
            task = progress.add_task(f"Encoding {split} images to tokens", total=mine[split])
            encode_split(
                encode, datasets[split], parts, split, chunk_size, batch_size, num_workers, dist.rank, dist.world_size,
                on_images=lambda n, t=task: progress.advance(t, n),
            )
    dist.barrier()
    if dist.is_main:
        meta = {
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "codebook_size": int(model.config.quantizer.codebook_size),
            "grid": list(model.index_shape),  # (h, w), or (h, w, G) with G codes per token
            "class_names": class_names,
            "num_classes": max(1, len(class_names)),
            "stage1_config": str(stage1_path.resolve()),
            "stage1_checkpoint": str(Path(checkpoint_path).resolve()),
            "stage1_step": int(stage1_step),
            "data": str(data.resolve()),
        }
        assemble_cache(cache_dir, {s: len(datasets[s]) for s in SPLITS}, chunk_size, meta["codebook_size"], meta)
        print(f"Wrote the token cache {cache_dir}")
    dist.barrier()
    return load_token_cache(cache_dir)

"""Sampling 3D scenes: stage-2 code grids for a class label, decoded by stage 1 into NeRFs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from vq3d_nerfstudio.errors import PackageError, Vq3dError
from vq3d_nerfstudio.export.video import to_uint8, write_image
from vq3d_nerfstudio.files import safe_file_names
from vq3d_nerfstudio.model_index import check_named_run_config, is_package
from vq3d_nerfstudio.stage2.checkpoint import CheckpointError, load_model
from vq3d_nerfstudio.stage2.transformer import TokenTransformer, sample_tokens

UNCONDITIONAL = ("none", "null", "uncond", "unconditional")


class SampleError(Vq3dError, ValueError):
    """Bad sampling settings (class label, stage-1 / stage-2 mismatch): one line for the user."""


@dataclass
class SamplingSettings:
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    cfg_scale: float = 1.0
    use_kv_cache: bool = True


def resolve_class(label: str, class_names: Sequence[str], num_classes: int) -> int:
    """A class id from ``'3'``, a class name, or ``'none'`` (the null class: unconditional)."""
    text = str(label).strip()
    if text.lower() in UNCONDITIONAL:
        return num_classes
    if text in class_names:
        return list(class_names).index(text)
    try:
        value = int(text)
    except ValueError:
        known = ", ".join(list(class_names)[:20]) + (" ..." if len(class_names) > 20 else "")
        raise SampleError(
            f"class label {text!r} is neither a class id in [0, {num_classes}) nor a class name"
            + (f" ({known})" if known else "") + "; or pass 'none' for unconditional samples"
        ) from None
    if not 0 <= value < num_classes:
        raise SampleError(f"class label {value} is out of range: this model has {num_classes} class(es), 0-{num_classes - 1}; or 'none'")
    return value


def class_label_name(class_id: int, class_names: Sequence[str], num_classes: int) -> str:
    if class_id == num_classes:
        return "unconditional"
    if not class_names and num_classes == 1:
        return "sample"  # data without classes
    return class_names[class_id] if class_id < len(class_names) else f"class{class_id}"


def class_file_name(class_id: int, class_names: Sequence[str], num_classes: int) -> str:
    """The file-name part of class ``class_id``'s samples: its :func:`class_label_name`, made safe
    (:func:`~vq3d_nerfstudio.files.safe_file_names`: ``cars/sedan`` -> ``cars_sedan``, ``../../ESC``
    -> ``ESC``) and distinct among the labels of the model's classes and ``unconditional``."""
    labels = [class_label_name(i, class_names, num_classes) for i in range(num_classes + 1)]
    return safe_file_names(labels, [f"class{i}" for i in range(num_classes)] + ["unconditional"])[class_id]


def check_compatible(info: Dict, stage1_model) -> None:
    """Stop before any work when the stage-2 model was trained on another codebook, token grid or number
    of codes per token."""
    if not stage1_model.quantizer.has_codes:
        raise SampleError(
            "the stage-1 model has continuous tokens (no-quantizer) and no codes to decode; pass the stage-1 "
            "run the stage-2 model was trained on (--stage1-config)"
        )
    vocab, grid = int(info["model"]["vocab_size"]), list(info["grid"])
    if vocab != int(stage1_model.config.quantizer.codebook_size):
        raise SampleError(
            f"the stage-2 model predicts {vocab} codes but the stage-1 model has a codebook of "
            f"{stage1_model.config.quantizer.codebook_size}; pass the stage-1 run it was trained on (--stage1-config)"
        )
    wanted = list(stage1_model.index_shape)
    if grid != wanted:
        describe = lambda g: "x".join(map(str, g[:2])) + (f" tokens of {g[2]} codes" if len(g) > 2 else " tokens of 1 code")  # noqa: E731
        raise SampleError(
            f"the stage-2 model writes {describe(grid)} but the stage-1 model reads {describe(wanted)}; "
            "pass the matching stage-1 run (--stage1-config)"
        )


class SceneSampler:
    """A stage-2 transformer bound to a stage-1 model: ``sample(class_id, n)`` -> code grids."""

    def __init__(self, transformer: TokenTransformer, info: Dict, stage1_model) -> None:
        check_compatible(info, stage1_model)
        self.transformer = transformer.to(stage1_model.device)
        self.info = info
        self.stage1_model = stage1_model

    @property
    def class_names(self) -> List[str]:
        return list(self.info.get("class_names") or [])

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_classes)

    @classmethod
    def from_checkpoint(cls, stage2_checkpoint: Path, stage1_model) -> "SceneSampler":
        transformer, info, _ = load_model(stage2_checkpoint)
        return cls(transformer, info, stage1_model)

    def resolve(self, label: str) -> int:
        return resolve_class(label, self.class_names, self.num_classes)

    @torch.no_grad()
    def sample(self, class_id: int, num: int, settings: SamplingSettings, generator: Optional[torch.Generator] = None,
               batch_size: Optional[int] = None, on_batch: Optional[Callable[[int], None]] = None) -> torch.Tensor:
        """``(num, h, w)`` (``(num, h, w, G)``) code grids of class ``class_id`` (``num_classes`` =
        unconditional), drawn ``batch_size`` at a time (default: all at once): the memory of a batch
        (its attention KV cache: layers x 2 x batch x sequence x width floats, twice with guidance) is
        bounded whatever ``num`` is. Batch b draws from ``generator`` after batch b - 1, so the first
        batch's grids are those of ``sample(class_id, batch_size)``. ``on_batch(n)`` after each batch of n.
        A token's G codes are consecutive in the sampled sequence."""
        step = num if batch_size is None else max(1, int(batch_size))
        grids = []
        for start in range(0, num, step):
            count = min(step, num - start)
            classes = torch.full((count,), int(class_id), dtype=torch.long)
            codes = sample_tokens(
                self.transformer, classes, settings.temperature, settings.top_k, settings.top_p,
                settings.cfg_scale, generator, settings.use_kv_cache,
            )
            grids.append(codes.cpu().reshape(count, *self.stage1_model.index_shape))
            if on_batch is not None:
                on_batch(count)
        return torch.cat(grids) if grids else torch.zeros(0, *self.stage1_model.index_shape, dtype=torch.long)


def stage1_config_of(info: Dict, override: Optional[Path], info_file: Optional[Path] = None) -> Path:
    """The stage-1 model a stage-2 checkpoint decodes with: ``override`` (the user's
    ``--stage1-config``, taken as given), else the run's ``config.yml`` or the package folder the
    checkpoint's ``info_file`` (its config.json) records. A recorded ``config.yml`` is read with a safe
    loader first: one that holds Python tags beyond nerfstudio's config classes is refused
    (:func:`~vq3d_nerfstudio.model_index.check_named_run_config`)."""
    if override is not None:
        return override
    recorded = info.get("stage1_config")
    path = Path(recorded) if isinstance(recorded, str) and recorded else None
    if path is None or not (path.is_file() or is_package(path)):
        raise CheckpointError(
            f"the stage-1 model {path} this stage-2 model was trained on is not there; pass --stage1-config "
            "<run>/config.yml (or --model <package>)"
        )
    if path.is_file():
        try:
            check_named_run_config(path, info_file or Path("the stage-2 checkpoint's config.json"), "--stage1-config")
        except PackageError as err:
            raise CheckpointError(str(err)) from None
    return path


def balanced_classes(num: int, label: str, class_names: Sequence[str], num_classes: int) -> List[int]:
    """``num`` labels: ``'all'`` cycles through every class (class-balanced, as FID protocols on
    ImageNet draw 50 per class), otherwise one label for all."""
    if str(label).strip().lower() == "all":
        return [i % num_classes for i in range(num)]
    return [resolve_class(label, class_names, num_classes)] * num


@torch.no_grad()
def render_sample_views(
    sampler: SceneSampler,
    cameras,
    view_names: Sequence[str],
    out_dirs: Dict[str, Path],
    classes: Sequence[int],
    settings: SamplingSettings,
    seed: int,
    batch_size: int = 16,
    prefix: str = "sample",
    on_sample=None,
) -> None:
    """Sample a scene per class label (batches of ``batch_size``, seeded), render it from each camera
    and write ``out_dirs[view_names[i]]/<prefix>_<n>.png``."""
    model = sampler.stage1_model
    generator = torch.Generator().manual_seed(seed)
    for folder in out_dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(classes), batch_size):
        chunk = list(classes[start : start + batch_size])
        codes = []
        for class_id in sorted(set(chunk)):  # one sampling batch per class in the chunk
            codes.append((class_id, sampler.sample(class_id, chunk.count(class_id), settings, generator)))
        number = start
        for class_id, grids in codes:
            for grid in grids:
                model.set_scene_indices(grid, key=("sample", number))
                for i, name in enumerate(view_names):
                    rgb = model.get_outputs_for_camera(cameras[i : i + 1])["rgb"].clamp(0, 1).cpu()
                    write_image(out_dirs[name] / f"{prefix}_{number:06d}.png", to_uint8(rgb))
                number += 1
                if on_sample is not None:
                    on_sample()

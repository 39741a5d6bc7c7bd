"""`vq3d-images` dataparser: collections of single, unposed images (+ optional depth).

Every image gets the same canonical camera (:class:`~vq3d_nerfstudio.geometry.poses.CanonicalCamera`,
``metadata["canonical_camera"]``; nerfstudio/OpenGL convention: at ``(0, 0, d)`` looking at the
origin, pinhole, square, ``fov_deg`` horizontal field of view). Four layouts are read:

- a folder of ``vq3d synth`` scenes (``*/transforms.json``): frame 0 of each scene, with its depth;
- an ImageNet-style folder of class subfolders: class name = folder name, class id = its index in the
  sorted folder names (stable while the set of classes stays the same);
- a flat folder of images;
- a ``vq3d prepare`` output (``index.json`` + tar shards): training streams from the shards; the
  outputs list only a bounded eval set and a training preview (see
  :mod:`vq3d_nerfstudio.data.shard_dataset`).

A folder that is itself one nerfstudio scene (``transforms.json`` at its top) is refused in one line
pointing at ``nerfstudio-data`` (:mod:`vq3d_nerfstudio.data.views` turns any nerfstudio dataparser into
single images). For scene folders ``metadata["scene_files"]`` lists each image's ``transforms.json``
(multi-view supervision reads the other frames from it).

Depth is an ``.npy`` beside each image with the same stem (z-depth in world units, or relative
disparity, larger = nearer); its kind comes from ``--depth-kind``, ``vq3d_meta.json`` in the data
folder, or the scenes' ``transforms.json``. The train/eval split hashes each image's relative path,
so adding images never moves old ones between splits.

This module must not import nerfstudio's datamanagers or pipelines: it is named by the
``nerfstudio.dataparser_configs`` entry point and is imported by every ``ns-*`` command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Type

import torch
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.plugins.registry_dataparser import DataParserSpecification

from vq3d_nerfstudio.checks import NonNegativeInt, PositiveFloat, PositiveInt, ranged
from vq3d_nerfstudio.data import shard_dataset as sd
from vq3d_nerfstudio.data.folders import DepthKind, ImageRecord, scan_image_folder, sibling_depth_kind, split_fraction
from vq3d_nerfstudio.data.shard_dataset import is_prepared_folder
from vq3d_nerfstudio.data.shard_format import read_index
from vq3d_nerfstudio.errors import DatasetError
from vq3d_nerfstudio.geometry.cameras import canonical_cameras
from vq3d_nerfstudio.geometry.poses import CanonicalCamera


@dataclass
class Vq3dImagesDataParserConfig(DataParserConfig):
    """Single unposed images from a folder: flat, ImageNet-style class folders, or `vq3d synth` scenes."""

    _target: Type = field(default_factory=lambda: Vq3dImagesDataParser)
    data: Path = Path("data/synth")
    """Folder of images (flat, class subfolders, or `vq3d synth` scenes)."""
    image_size: PositiveInt = 64
    """Images are centre-cropped and resized to this square size; must equal the model's image size."""
    depth_kind: DepthKind = "auto"
    """Depth files (`<image stem>.npy`): 'z-depth' (world units), 'disparity' (relative, larger = nearer),
    'none' (ignore depth), or 'auto' (read vq3d_meta.json / transforms.json; no depth files -> none)."""
    eval_fraction: ranged(float, 0, 1, high_open=True) = 0.05
    """Fraction of images held out for evaluation, chosen by a hash of each file's path."""
    canonical_camera: CanonicalCamera = field(default_factory=CanonicalCamera)
    """The camera every image is seen by; must equal the model's (--pipeline.model.canonical-camera.*).
    Change only together with the data."""
    scene_extent: PositiveFloat = 3.0
    """Half-width of the scene box reported to nerfstudio (world units); the field itself is unbounded."""
    shard_eval_images: NonNegativeInt = 256
    """Prepared shards only: held-out images that ns-eval, eval batches, the viewer and ns-render can
    show (the first ones in shard order; read from disk when used, never all of the held-out split)."""
    shard_preview_images: NonNegativeInt = 64
    """Prepared shards only: training images that the viewer's 'train' split, its camera frustums and
    `ns-render --camera-idx` can show (the last ones in shard order). Training itself streams every
    training image from the shards."""

    def __setstate__(self, state: dict) -> None:
        """A run's ``config.yml`` written when the camera was two fields (``camera_distance``,
        ``fov_deg``) loads them as its :class:`CanonicalCamera`. Removal: at version 0.2.0, when runs
        saved before the canonical camera was one object (issue 28) no longer need to load."""
        state = dict(state)
        if "canonical_camera" not in state:
            default = CanonicalCamera()
            state["canonical_camera"] = CanonicalCamera(
                state.pop("camera_distance", default.distance), state.pop("fov_deg", default.fov_deg)
            )
        self.__dict__.update(state)


@dataclass
class Vq3dImagesDataParser(DataParser):
    """Builds canonical cameras and per-image metadata; images are read lazily by the dataset."""

    config: Vq3dImagesDataParserConfig

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        if is_prepared_folder(Path(self.config.data)):
            return self._shard_outputs(split)
        records, class_names, meta_kind = scan_image_folder(Path(self.config.data))
        depth_kind = self._resolve_depth_kind(records, meta_kind)
        is_eval = [split_fraction(r.key) < self.config.eval_fraction for r in records]
        if not any(is_eval) and self.config.eval_fraction > 0:
            # Tiny collections: hold out the single image with the smallest key, still stable.
            is_eval[min(range(len(records)), key=lambda i: split_fraction(records[i].key))] = True
        if all(is_eval) and len(records) > 1:
            raise DatasetError(f"{self.config.data}: every image fell in the eval split; lower --eval-fraction")
        want_eval = split != "train"
        chosen = [r for r, e in zip(records, is_eval) if e == want_eval] or records
        camera = self.config.canonical_camera
        cameras = canonical_cameras(len(chosen), self.config.image_size, camera.distance, camera.fov_deg)
        extent = self.config.scene_extent
        metadata: Dict = {
            "depth_filenames": [r.depth for r in chosen] if depth_kind != "none" else None,
            "depth_kind": depth_kind,
            "class_ids": [r.class_id for r in chosen],
            "class_names": class_names,
            "image_keys": [r.key for r in chosen],
            "canonical_camera": camera,
            "scene_files": [r.scene for r in chosen] if all(r.scene is not None for r in chosen) else None,
        }
        return DataparserOutputs(
            image_filenames=[r.image for r in chosen],
            cameras=cameras,
            scene_box=SceneBox(aabb=torch.tensor([[-extent] * 3, [extent] * 3], dtype=torch.float32)),
            metadata=metadata,
        )

    def _shard_outputs(self, split: str) -> DataparserOutputs:
        """A ``vq3d prepare`` output: the bounded eval set ('val'/'test') or training preview
        ('train'), plus what the datamanager needs to stream the training split
        (``metadata["shard_root"]``, ``["shard_index"]``, ``["shard_held_out"]``)."""
        cfg, root = self.config, Path(self.config.data)
        if cfg.shard_eval_images < 1 or cfg.shard_preview_images < 1:
            raise DatasetError("--shard-eval-images and --shard-preview-images must be >= 1")
        index = read_index(root)
        sd.check_resolution(root, index, cfg.image_size)
        depth_kind = sd.shard_depth_kind(index, cfg.depth_kind, root)
        rule = sd.held_out_rule(root, index, cfg.eval_fraction)
        preview = sd.preview_locations(root, index, rule, cfg.shard_preview_images)
        if not preview:
            raise DatasetError(f"{root}: every image fell in the eval split; lower --eval-fraction")
        chosen = preview
        if split != "train":
            # No held-out images (eval_fraction 0): evaluate on the preview, as a folder evaluates on all.
            chosen = sd.eval_locations(root, index, rule, cfg.shard_eval_images) or preview
        extent = cfg.scene_extent
        metadata: Dict = {
            "depth_filenames": None,
            "depth_kind": depth_kind,
            "class_ids": [loc.class_id for loc in chosen],
            "class_names": list(index["class_names"]),
            "image_keys": [loc.source for loc in chosen],
            "canonical_camera": cfg.canonical_camera,
            "shard_root": root,
            "shard_index": {k: v for k, v in index.items() if k not in ("shards", "ignored")},
            "shard_held_out": rule,
            "shard_samples": chosen,
        }
        return DataparserOutputs(
            image_filenames=[root / loc.shard / f"{loc.key}.png" for loc in chosen],
            cameras=canonical_cameras(
                len(chosen), cfg.image_size, cfg.canonical_camera.distance, cfg.canonical_camera.fov_deg
            ),
            scene_box=SceneBox(aabb=torch.tensor([[-extent] * 3, [extent] * 3], dtype=torch.float32)),
            metadata=metadata,
        )

    def _resolve_depth_kind(self, records: List[ImageRecord], meta_kind: Optional[str]) -> str:
        return sibling_depth_kind(
            self.config.depth_kind, [(r.image, r.depth) for r in records], meta_kind, required=True, gaps_filled=False,
            unknown_fix="pass --depth-kind z-depth|disparity|none (or write vq3d_meta.json)",
            missing_fix="add it or pass --depth-kind none",
        )


vq3d_images_dataparser = DataParserSpecification(
    config=Vq3dImagesDataParserConfig(),
    description="Single unposed images (flat folder, class folders, or `vq3d synth` scenes) with optional depth.",
)

"""`vq3d-images` dataparser: collections of single, unposed images (+ optional depth).

Every image gets the same canonical camera (nerfstudio/OpenGL convention: at ``(0, 0, d)`` looking
at the origin, pinhole, square, ``fov_deg`` horizontal field of view). Four layouts are read:

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

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Type

import torch
from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.plugins.registry_dataparser import DataParserSpecification

from vq3d_nerfstudio.data.synth import focal_length

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DepthKind = Literal["auto", "z-depth", "disparity", "none"]


class DatasetError(ValueError):
    """A problem with the user's data; the message names the file and the fix."""


def canonical_camera_to_world(distance: float) -> torch.Tensor:
    """``[3, 4]`` camera-to-world of the canonical camera: identity rotation, at ``(0, 0, distance)``."""
    c2w = torch.eye(4)[:3]
    c2w[2, 3] = distance
    return c2w


def pinhole_cameras(
    camera_to_worlds: torch.Tensor, fx: float, fy: float, cx: float, cy: float, width: int, height: int
) -> Cameras:
    """Pinhole cameras sharing one set of intrinsics (pixels) at ``[N, 3, 4]`` OpenGL poses."""
    num = camera_to_worlds.shape[0]
    return Cameras(
        camera_to_worlds=camera_to_worlds,
        fx=torch.full((num, 1), float(fx)),
        fy=torch.full((num, 1), float(fy)),
        cx=torch.full((num, 1), float(cx)),
        cy=torch.full((num, 1), float(cy)),
        width=torch.full((num, 1), int(width), dtype=torch.long),
        height=torch.full((num, 1), int(height), dtype=torch.long),
        camera_type=CameraType.PERSPECTIVE,
    )


def square_pinhole_cameras(camera_to_worlds: torch.Tensor, image_size: int, fov_deg: float) -> Cameras:
    """Square pinhole cameras with ``fov_deg`` horizontal field of view at ``[N, 3, 4]`` poses."""
    focal = focal_length(image_size, fov_deg)
    return pinhole_cameras(camera_to_worlds, focal, focal, image_size / 2, image_size / 2, image_size, image_size)


def canonical_cameras(num: int, image_size: int, distance: float, fov_deg: float) -> Cameras:
    """``num`` identical canonical cameras (the pose is broadcast, not copied)."""
    return square_pinhole_cameras(canonical_camera_to_world(distance)[None].expand(num, 3, 4), image_size, fov_deg)


def split_fraction(relative_path: str) -> float:
    """A stable number in [0, 1) from an image's path: the split key."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 2**32


@dataclass
class ImageRecord:
    """One image of the collection."""

    image: Path
    depth: Optional[Path]
    class_id: int
    key: str  # path relative to the data folder, POSIX form
    scene: Optional[Path] = None  # the scene's transforms.json (scene folders only)


def is_image_file(path: Path) -> bool:
    """An image file by its name. A symlink with an image name counts even when it leads nowhere
    (broken, or a loop): reading it then fails, and the file is reported instead of vanishing."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
        return False
    return path.is_file() or (path.is_symlink() and not path.is_dir())


def _relative_key(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, POSIX form (``..`` parts when it lies outside)."""
    return Path(os.path.relpath(path, root)).as_posix()


def _scan_scenes(root: Path, scene_files: List[Path]) -> Tuple[List[ImageRecord], List[str], Optional[str]]:
    """Frame 0 of each scene folder. Scenes whose ``transforms.json`` all carry a ``class_name``
    (``vq3d synth`` writes one) get class ids in sorted-name order; otherwise none have a class."""
    records, kinds, scene_classes = [], set(), []
    for transforms_path in scene_files:
        try:
            meta = json.loads(transforms_path.read_text(encoding="utf-8"))
            frame = meta["frames"][0]
            image = transforms_path.parent / frame["file_path"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as err:
            raise DatasetError(f"{transforms_path}: not a readable scene ({err!r}); fix or remove the folder") from err
        depth = transforms_path.parent / frame["depth_file_path"] if "depth_file_path" in frame else None
        if "depth_kind" in meta:
            kinds.add(meta["depth_kind"])
        scene_classes.append(meta.get("class_name"))
        records.append(ImageRecord(image, depth, -1, _relative_key(image, root), transforms_path))
    if len(kinds) > 1:
        raise DatasetError(f"{root}: scenes disagree on depth_kind {sorted(kinds)}; make them agree")
    names: List[str] = []
    if all(isinstance(name, str) for name in scene_classes):
        names = sorted(set(scene_classes))
        for record, name in zip(records, scene_classes):
            record.class_id = names.index(name)
    return records, names, (kinds.pop() if kinds else None)


def scan_image_folder(root: Path) -> Tuple[List[ImageRecord], List[str], Optional[str]]:
    """Find the images under ``root``.

    Files are images by their extension (:data:`IMAGE_EXTENSIONS`, any case; hidden files skipped);
    whether they decode is found when they are read. Inside class folders the search recurses into
    real subfolders but not into symlinked ones, so a symlink loop cannot make it run forever; a class
    folder may itself be a symlink. Paths may hold spaces and any Unicode.

    Returns:
        ``(records, class_names, depth_kind_from_metadata)``; class names are empty when the folder
        has no class subfolders.

    Raises:
        DatasetError: no such folder, nothing that looks like an image in it, an unreadable
            ``vq3d_meta.json`` or scene, or a folder that cannot be listed.
    """
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root}: is a file, not a folder; pass --data <folder of images> (e.g. {root.parent})")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; pass --data <folder of images>")
    try:
        return _scan(root)
    except OSError as err:  # permissions, a folder vanishing while it is listed, ...
        where = err.filename or root
        raise DatasetError(f"{where}: cannot list the data folder ({err.strerror or err}); check its permissions") from err


def _scan(root: Path) -> Tuple[List[ImageRecord], List[str], Optional[str]]:
    if (root / "transforms.json").is_file():
        raise DatasetError(
            f"{root}: is one nerfstudio scene (transforms.json at its top), not a folder of images or of scenes; "
            f"train on its views with `ns-train <method> nerfstudio-data --data {root}` (each view one input; "
            "--depth-unit-scale-factor 1 when its depth files are in world units), or pass the folder that holds "
            "the scene folders"
        )
    scene_files = sorted(root.glob("*/transforms.json"))
    meta_kind = None
    meta_file = root / "vq3d_meta.json"
    if meta_file.exists():
        try:
            meta_kind = json.loads(meta_file.read_text(encoding="utf-8")).get("depth_kind")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise DatasetError(
                f"{meta_file}: not a JSON object ({type(err).__name__}); write {{\"depth_kind\": \"z-depth\"}} "
                "(or \"disparity\"), or delete the file"
            ) from err
    if scene_files:
        records, names, scene_kind = _scan_scenes(root, scene_files)
        return records, names, meta_kind or scene_kind
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    class_dirs = [d for d in class_dirs if any(is_image_file(p) for p in d.rglob("*"))]
    records: List[ImageRecord] = []
    if class_dirs:
        for class_id, class_dir in enumerate(class_dirs):
            for image in sorted(p for p in class_dir.rglob("*") if is_image_file(p)):
                records.append(ImageRecord(image, None, class_id, image.relative_to(root).as_posix()))
        names = [d.name for d in class_dirs]
    else:
        for image in sorted(p for p in root.iterdir() if is_image_file(p)):
            records.append(ImageRecord(image, None, -1, image.name))
        names = []
    for record in records:
        candidate = record.image.with_suffix(".npy")
        record.depth = candidate if candidate.exists() else None
    if not records:
        others = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.name != meta_file.name)
        found = (
            f"it holds {len(others)} other entr{'y' if len(others) == 1 else 'ies'} ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}), none an image"
            if others else "it is empty"
        )
        raise DatasetError(
            f"{root}: no images found ({found}); put {', '.join(IMAGE_EXTENSIONS)} files in it (flat, or in class "
            "subfolders), or pass --data <folder of images>"
        )
    return records, names, meta_kind


@dataclass
class Vq3dImagesDataParserConfig(DataParserConfig):
    """Single unposed images from a folder: flat, ImageNet-style class folders, or `vq3d synth` scenes."""

    _target: Type = field(default_factory=lambda: Vq3dImagesDataParser)
    data: Path = Path("data/synth")
    """Folder of images (flat, class subfolders, or `vq3d synth` scenes)."""
    image_size: int = 64
    """Images are centre-cropped and resized to this square size; must equal the model's image size."""
    depth_kind: DepthKind = "auto"
    """Depth files (`<image stem>.npy`): 'z-depth' (world units), 'disparity' (relative, larger = nearer),
    'none' (ignore depth), or 'auto' (read vq3d_meta.json / transforms.json; no depth files -> none)."""
    eval_fraction: float = 0.05
    """Fraction of images held out for evaluation, chosen by a hash of each file's path."""
    camera_distance: float = 2.0
    """Distance of the canonical camera from the pivot (world units). Change only together with the data."""
    fov_deg: float = 50.0
    """Horizontal field of view of the canonical camera, degrees."""
    scene_extent: float = 3.0
    """Half-width of the scene box reported to nerfstudio (world units); the field itself is unbounded."""
    shard_eval_images: int = 256
    """Prepared shards only: held-out images that ns-eval, eval batches, the viewer and ns-render can
    show (the first ones in shard order; read from disk when used, never all of the held-out split)."""
    shard_preview_images: int = 64
    """Prepared shards only: training images that the viewer's 'train' split, its camera frustums and
    `ns-render --camera-idx` can show (the last ones in shard order). Training itself streams every
    training image from the shards."""


@dataclass
class Vq3dImagesDataParser(DataParser):
    """Builds canonical cameras and per-image metadata; images are read lazily by the dataset."""

    config: Vq3dImagesDataParserConfig

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        from vq3d_nerfstudio.data.shard_dataset import is_prepared_folder

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
        cameras = canonical_cameras(
            len(chosen), self.config.image_size, self.config.camera_distance, self.config.fov_deg
        )
        extent = self.config.scene_extent
        metadata: Dict = {
            "depth_filenames": [r.depth for r in chosen] if depth_kind != "none" else None,
            "depth_kind": depth_kind,
            "class_ids": [r.class_id for r in chosen],
            "class_names": class_names,
            "image_keys": [r.key for r in chosen],
            "camera_distance": self.config.camera_distance,
            "fov_deg": self.config.fov_deg,
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
        from vq3d_nerfstudio.data import shard_dataset as sd
        from vq3d_nerfstudio.data.shards import read_index

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
            "camera_distance": cfg.camera_distance,
            "fov_deg": cfg.fov_deg,
            "shard_root": root,
            "shard_index": {k: v for k, v in index.items() if k not in ("shards", "ignored")},
            "shard_held_out": rule,
            "shard_samples": chosen,
        }
        return DataparserOutputs(
            image_filenames=[root / loc.shard / f"{loc.key}.png" for loc in chosen],
            cameras=canonical_cameras(len(chosen), cfg.image_size, cfg.camera_distance, cfg.fov_deg),
            scene_box=SceneBox(aabb=torch.tensor([[-extent] * 3, [extent] * 3], dtype=torch.float32)),
            metadata=metadata,
        )

    def _resolve_depth_kind(self, records: List[ImageRecord], meta_kind: Optional[str]) -> str:
        kind = self.config.depth_kind
        if kind == "none":
            return "none"
        with_depth = [r for r in records if r.depth is not None]
        if kind == "auto":
            if not with_depth:
                return "none"
            if meta_kind not in ("z-depth", "disparity"):
                raise DatasetError(
                    f"{with_depth[0].depth}: depth files found but their kind is unknown; "
                    "pass --depth-kind z-depth|disparity|none (or write vq3d_meta.json)"
                )
            kind = meta_kind
        missing = [r for r in records if r.depth is None]
        if missing:
            raise DatasetError(
                f"{missing[0].image}: no depth file ({missing[0].image.with_suffix('.npy').name}) although "
                f"{len(with_depth)} other images have one; add it or pass --depth-kind none"
            )
        return kind


vq3d_images_dataparser = DataParserSpecification(
    config=Vq3dImagesDataParserConfig(),
    description="Single unposed images (flat folder, class folders, or `vq3d synth` scenes) with optional depth.",
)

"""Image collections on disk: which files are images, the layouts ``vq3d-images`` reads (flat,
ImageNet-style class folders, ``vq3d synth`` scene folders), which depth files beside them are used,
and the hash split of an image's path."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional, Sequence, Tuple

from vq3d_nerfstudio.errors import DatasetError


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

DepthKind = Literal["auto", "z-depth", "disparity", "none"]
"""What the depth files beside the images hold: 'z-depth' (world units), 'disparity' (relative,
larger = nearer), 'none' (ignore them), or 'auto' (the kind the folder's metadata names)."""


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


def sibling_depth_kind(
    requested: DepthKind,
    images: Sequence[Tuple[Path, Optional[Path]]],
    meta_kind: Optional[str],
    *,
    required: bool,
    gaps_filled: bool,
    unknown_fix: str,
    missing_fix: str,
) -> str:
    """The kind of the depth files of ``images`` (``(image, depth file or None)`` pairs, as scanned),
    'none' when they are not used: the one rule of the dataparser and ``vq3d prepare``.

    'none' asks for none; 'auto' uses them when there are any, as the kind ``meta_kind``
    (``vq3d_meta.json`` / the scenes' ``transforms.json``) names. A named kind with no files at all
    is an error when ``required`` (training was told to use depth that is not there), else it gives
    'none'. Images without a file beside ones with are an error unless ``gaps_filled`` (a depth
    model estimates theirs). Errors are one :class:`DatasetError` line ending in the caller's fix
    (``unknown_fix``: the kind is unknown; ``missing_fix``: an image has no file), since the options
    that fix them differ between the commands.
    """
    with_depth = [depth for _, depth in images if depth is not None]
    if requested == "none" or (not with_depth and (requested == "auto" or not required)):
        return "none"
    kind = meta_kind if requested == "auto" else requested
    if kind not in ("z-depth", "disparity"):
        raise DatasetError(f"{with_depth[0]}: depth files found but their kind is unknown; {unknown_fix}")
    missing = [image for image, depth in images if depth is None]
    if missing and not gaps_filled:
        raise DatasetError(
            f"{missing[0]}: no depth file ({missing[0].with_suffix('.npy').name}) although {len(with_depth)} "
            f"other images have one; {missing_fix}"
        )
    return kind

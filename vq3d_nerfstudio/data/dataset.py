"""Dataset of single images, read lazily from disk, centre-cropped and resized to the model size."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.data.datasets.base_dataset import InputDataset
from PIL import Image, ImageOps

from vq3d_nerfstudio.data.dataparser import DatasetError


def center_crop_box(width: int, height: int) -> Tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the largest centred square."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def load_image(path: Path, size: int) -> torch.Tensor:
    """Read any common image (EXIF orientation applied, greyscale/RGBA/CMYK converted to RGB),
    centre-crop to a square and resize to ``size``.

    Returns:
        ``[size, size, 3]`` float32 in [0, 1].
    """
    try:
        with Image.open(path) as pil:
            pil = ImageOps.exif_transpose(pil)
            if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(pil, dtype=np.float32)
                pil = Image.fromarray(np.clip(array / max(array.max(), 1.0) * 255, 0, 255).astype(np.uint8))
            pil = pil.convert("RGB")
            pil = pil.crop(center_crop_box(*pil.size))
            if pil.size != (size, size):
                pil = pil.resize((size, size), resample=Image.Resampling.BICUBIC, reducing_gap=3.0)
            array = np.asarray(pil, dtype=np.float32) / 255.0
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read image ({err}); replace or remove the file") from err
    return torch.from_numpy(array.copy())


def load_disparity(path: Path, kind: str, image_hw: Tuple[int, int], size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read a depth ``.npy`` and return disparity ``[size, size, 1]`` and a validity mask.

    ``kind`` is 'z-depth' (world units; ``inf`` = nothing hit -> disparity 0) or 'disparity'
    (relative, larger = nearer). Non-finite disparities and non-positive depths are masked out.
    """
    try:
        depth = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read depth ({err}); write a float32 .npy array") from err
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2 or depth.shape != image_hw:
        raise DatasetError(
            f"{path}: depth has shape {depth.shape} but its image is {image_hw[0]}x{image_hw[1]}; "
            "save depth at the image's resolution"
        )
    depth = depth.astype(np.float32)
    if kind == "z-depth":
        valid = depth > 0  # inf (sky) is valid: disparity 0; NaN and <= 0 are not
        disparity = np.where(valid, 1.0 / np.where(valid, depth, 1.0), 0.0)
    else:
        valid = np.isfinite(depth)
        disparity = np.where(valid, depth, 0.0)
    height, width = image_hw
    left, top, right, bottom = center_crop_box(width, height)
    disp = torch.from_numpy(np.ascontiguousarray(disparity[top:bottom, left:right]))[None, None]
    mask = torch.from_numpy(np.ascontiguousarray(valid[top:bottom, left:right])).float()[None, None]
    if disp.shape[-1] != size:
        mode = "area" if disp.shape[-1] > size else "bilinear"
        weighted = F.interpolate(disp * mask, size=(size, size), mode=mode)
        coverage = F.interpolate(mask, size=(size, size), mode=mode)
        disp = weighted / coverage.clamp_min(1e-6)
        mask = coverage > 0.999
    return disp[0].permute(1, 2, 0).float(), mask[0].permute(1, 2, 0).bool()


def image_size_of(path: Path) -> Tuple[int, int]:
    """``(height, width)`` after EXIF orientation, without decoding pixels."""
    with Image.open(path) as pil:
        width, height = pil.size
        orientation = pil.getexif().get(0x0112, 1)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


class Vq3dImageDataset(InputDataset):
    """Items: ``image`` ``[S, S, 3]`` float in [0, 1], ``image_idx``, ``class_id`` (-1 when unknown),
    and with depth ``disparity`` ``[S, S, 1]`` plus ``disparity_mask`` ``[S, S, 1]`` bool.

    Nothing is cached: a 1.28M-image collection never sits in memory.
    """

    exclude_batch_keys_from_device = []

    def __init__(self, dataparser_outputs: DataparserOutputs, scale_factor: float = 1.0):
        if "shard_root" in dataparser_outputs.metadata:
            raise DatasetError(
                f"{dataparser_outputs.metadata['shard_root']}: prepared shards are streamed by the datamanager "
                "(or read with ShardReader / ShardImageDataset), not per file; point --data at the image folder"
            )
        super().__init__(dataparser_outputs, scale_factor)
        self.image_size = int(self.cameras.width[0, 0])
        self.depth_kind: str = self.metadata.get("depth_kind", "none")
        self.depth_filenames: Optional[list] = self.metadata.get("depth_filenames")
        self.class_ids: list = self.metadata.get("class_ids", [-1] * len(self))

    def get_data(self, image_idx: int, image_type: str = "float32") -> Dict:
        path = self._dataparser_outputs.image_filenames[image_idx]
        data: Dict = {
            "image_idx": image_idx,
            "image": load_image(path, self.image_size),
            "class_id": torch.tensor(self.class_ids[image_idx], dtype=torch.long),
        }
        if self.depth_filenames is not None:
            depth_path = self.depth_filenames[image_idx]
            disp, mask = load_disparity(depth_path, self.depth_kind, image_size_of(path), self.image_size)
            data["disparity"] = disp
            data["disparity_mask"] = mask
        return data

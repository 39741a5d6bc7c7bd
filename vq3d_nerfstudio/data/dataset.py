"""Dataset of single images, read lazily from disk, centre-cropped and resized to the model size.

Reading is where bad files meet the code, so the readers here turn every way a file can be bad into
one :class:`~vq3d_nerfstudio.data.dataparser.DatasetError` whose message starts with the file and
ends with the fix:

- :func:`load_image`: any image Pillow reads, normalised to 8-bit RGB as stored, without colour management (EXIF
  orientation applied; greyscale, palette, CMYK, 16-bit and float converted; transparency composited
  over white, see :data:`ALPHA_BACKGROUND`);
- :func:`load_depth_array` / :func:`load_disparity`: a depth ``.npy`` checked for format, dtype and
  size, with the validity rule of each depth kind documented on :func:`disparity_from_depth`.

:class:`Vq3dImageDataset` skips a bad file during training (the item is replaced by the next
readable image and the skipped file travels with the item, see ``SKIPPED_KEY``) unless it is
``strict``.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.data.datasets.base_dataset import InputDataset
from PIL import Image

from vq3d_nerfstudio.checks import ranged, renamed
from vq3d_nerfstudio.errors import DatasetError
from vq3d_nerfstudio.stage1.losses import canonical_disparity, disparity_anchors

ImageSource = Union[Path, str, IO[bytes]]

ALPHA_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited over white. Images with transparency are mostly cut-out objects
(product shots, renders of ShapeNet / Objaverse-style assets) made to be seen on a white page; white
is what their authors saw, and a black background would merge with dark objects and shadows. The
stored colour of a fully transparent pixel is arbitrary (often black, sometimes garbage) and is never
used."""

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
"""16-bit greyscale: read as ``value / 65535`` (the format's full range), so a dark photo stays dark."""

SUPPORTED_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I", "F")
"""Pillow modes read (plus :data:`SIXTEEN_BIT_MODES`). Others (LAB, HSV) are refused with a message:
converting them needs colour management that a silent fallback would get wrong."""

#: EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

SKIPPED_KEY = "skipped"
"""Item key listing the files skipped to produce it: one ``"<path>\\t<reason>"`` line per file,
``""`` when none. It rides through the DataLoader (collated into a list of strings), so files met by
worker processes are reported by the main process (see ``Vq3dDataManager``)."""

MAX_REPLACEMENT_TRIES = 64
"""A bad item is replaced by the next readable image; after this many bad files in a row the data is
taken to be wrong as a whole and the error is raised."""


def center_crop_box(width: int, height: int) -> Tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the largest centred square."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _label(source: ImageSource, label: Optional[str]) -> str:
    if label is not None:
        return label
    return str(source) if isinstance(source, (str, Path)) else "<image data>"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _exif_orientation(pil: Image.Image) -> int:
    """The EXIF orientation tag (1-8); 1 when absent or when the EXIF block is malformed (the pixels
    are still good: show them as stored rather than refuse the photo)."""
    try:
        value = pil.getexif().get(0x0112, 1)
    except Exception:  # Pillow raises many types on a malformed EXIF block
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _bomb_reason(err: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(err))
    pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (
        f"{pixels}, over Pillow's decompression-bomb limit of {limit:,} (a small file that would expand to "
        "gigabytes in memory); if the image is genuine, downscale it (e.g. to 4096 px on the long side), "
        "otherwise remove it"
    )


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb * a + ALPHA_BACKGROUND * (1 - a)`` in exact integer arithmetic, rounded; uint8 in and out."""
    rgb32, a32 = rgb.astype(np.uint32), alpha.astype(np.uint32)[..., None]
    background = np.asarray(ALPHA_BACKGROUND, dtype=np.uint32)
    return ((rgb32 * a32 + background * (255 - a32) + 127) // 255).astype(np.uint8)


def _to_rgb(pil: Image.Image, label: str) -> Image.Image:
    """Decoded pixels of any supported mode -> an RGB image (8 bits a channel)."""
    mode = pil.mode
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(pil).astype(np.float64)
        if mode == "F":
            # 32-bit float images: the [0, 1] convention (what imaging tools write for float data).
            low, high = 0.0, 1.0
        else:
            # "I" is 32-bit integer storage; the images that arrive in it hold 16-bit data
            # (16-bit PGM / PNG in older Pillow versions), so read it as 16-bit and refuse the rest.
            low, high = 0.0, 65535.0
        if values.size and not (np.isfinite(values).all() and values.min() >= low and values.max() <= high):
            finite = values[np.isfinite(values)]
            shown = f"{finite.min():g}..{finite.max():g}" if finite.size else "no finite values"
            kind = "float" if mode == "F" else "32-bit integer"
            raise DatasetError(
                f"{label}: {kind} image with values {shown}{'' if finite.size == values.size else ' and NaN/inf'}, "
                f"outside {low:g}..{high:g}; save it as an 8- or 16-bit PNG"
            )
        return Image.fromarray(np.round(values / high * 255.0).astype(np.uint8)).convert("RGB")
    if mode not in SUPPORTED_MODES:
        raise DatasetError(f"{label}: colour mode {mode} is not supported; save the image as RGB (sRGB) PNG or JPEG")
    has_alpha = "A" in pil.getbands() or "a" in pil.getbands() or "transparency" in pil.info
    if mode == "P" and pil.palette is not None and pil.palette.mode == "RGBA":
        has_alpha = True
    if has_alpha:
        rgba = np.asarray(pil.convert("RGBA"))
        return Image.fromarray(_composite(rgba[..., :3], rgba[..., 3]))
    return pil.convert("RGB")


def read_rgb(source: ImageSource, label: Optional[str] = None) -> np.ndarray:
    """Decode a whole image as displayed: ``[H, W, 3]`` uint8 RGB.

    EXIF orientation is applied (a malformed EXIF block is ignored). Greyscale and palette images
    become grey / palette colours; CMYK uses Pillow's conversion ``255 (1 - C)(1 - K)`` (embedded ICC
    profiles are not applied); 16-bit greyscale is ``round(v / 65535 * 255)``, never stretched to the
    image's own maximum; 32-bit integer images must hold 0..65535 (read as 16-bit) and float images
    0..1; transparency (an alpha band, or a palette / colour-key ``transparency``) is composited over
    :data:`ALPHA_BACKGROUND`.

    Raises:
        DatasetError: ``"<file>: cannot read image (<reason>); <fix>"`` for empty, truncated or
            non-image files, decompression bombs, unsupported modes and anything else Pillow rejects.
    """
    return np.asarray(_read_rgb_image(source, label))


def _read_rgb_image(source: ImageSource, label: Optional[str] = None) -> Image.Image:
    """:func:`read_rgb` as an RGB Pillow image (no copy through numpy on the training path)."""
    label = _label(source, label)
    if isinstance(source, (str, Path)):
        try:
            empty = Path(source).stat().st_size == 0
        except OSError as err:
            reason = _one_line(err.strerror or err)
            raise DatasetError(f"{label}: cannot read image ({reason}); replace or remove the file") from err
        if empty:
            raise DatasetError(f"{label}: cannot read image (empty file, 0 bytes); replace or remove the file")
    try:
        with Image.open(source) as pil:
            transpose = _EXIF_TRANSPOSE.get(_exif_orientation(pil))
            pil.load()
            if transpose is not None:
                pil = pil.transpose(transpose)
            return _to_rgb(pil, label)
    except DatasetError:
        raise
    except Image.DecompressionBombError as err:
        raise DatasetError(f"{label}: cannot read image ({_bomb_reason(err)})") from err
    except Image.UnidentifiedImageError as err:
        raise DatasetError(
            f"{label}: cannot read image (cannot identify the image format: not an image, or one Pillow does not "
            "read); replace or remove the file"
        ) from err
    except MemoryError as err:
        raise DatasetError(f"{label}: cannot read image (out of memory decoding it); downscale or remove the file") from err
    except Exception as err:  # decoders raise OSError, SyntaxError, struct.error, ... on bad data
        reason = _one_line(f"{type(err).__name__}: {err}" if not isinstance(err, OSError) else err)
        raise DatasetError(f"{label}: cannot read image ({reason}); replace or remove the file") from err


def load_image(source: ImageSource, size: int, label: Optional[str] = None) -> torch.Tensor:
    """Read an image (see :func:`read_rgb` for what is accepted and how it is converted), centre-crop
    it to a square and resize it (bicubic) to ``size``.

    Args:
        source: a path, or a binary file object (an upload).
        size: output side in pixels.
        label: the name errors give (default: the path).

    Returns:
        ``[size, size, 3]`` float32 in [0, 1], multiples of 1/255.

    Raises:
        DatasetError: the file cannot be read; the message names it and the fix.
    """
    pil = _read_rgb_image(source, label)
    pil = pil.crop(center_crop_box(*pil.size))
    if pil.size != (size, size):
        pil = pil.resize((size, size), resample=Image.Resampling.BICUBIC, reducing_gap=3.0)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)


def image_size_of(path: Path) -> Tuple[int, int]:
    """``(height, width)`` after EXIF orientation, without decoding pixels.

    Raises:
        DatasetError: the file is not an image Pillow can open.
    """
    try:
        with Image.open(path) as pil:
            width, height = pil.size
            orientation = _exif_orientation(pil)
    except Image.DecompressionBombError as err:
        raise DatasetError(f"{path}: cannot read image ({_bomb_reason(err)})") from err
    except Exception as err:  # as read_rgb
        raise DatasetError(f"{path}: cannot read image ({_one_line(err)}); replace or remove the file") from err
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


# ---- depth ---------------------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"
_SAVE_HINT = "save it with np.save(path, depth.astype(np.float32))"


def load_depth_array(path: Path, image_hw: Tuple[int, int]) -> np.ndarray:
    """Read a depth ``.npy`` as ``[H, W]`` float32, checked against its image's ``(height, width)``.

    Accepted: ``[H, W]`` or ``[H, W, 1]`` arrays of float (16/32/64 bit) or integer dtype (e.g.
    millimetres in uint16), converted to float32 (values beyond float32's range become +-inf).
    Refused, each with one message naming the file: not a ``.npy`` (text, ``.npz``, empty, truncated),
    object arrays (pickled Python objects are never loaded), bool / complex / string / structured /
    datetime dtypes, and any other shape.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as err:
        raise DatasetError(f"{path}: cannot read depth ({_one_line(err.strerror or err)}); {_SAVE_HINT}") from err
    if head != _NPY_MAGIC:
        what = "empty file" if not head else ".npz archive, not .npy" if head.startswith(b"PK") else "no NumPy .npy header"
        raise DatasetError(f"{path}: cannot read depth ({what}); {_SAVE_HINT}")
    try:
        depth = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "Object arrays" in str(err) or "pickle" in str(err):
            raise DatasetError(
                f"{path}: depth is an object array (Python objects, dtype=object), not numbers; {_SAVE_HINT}"
            ) from err
        raise DatasetError(f"{path}: cannot read depth (damaged or truncated: {_one_line(err)}); {_SAVE_HINT}") from err
    except Exception as err:  # EOFError, OSError, ... on a damaged header
        raise DatasetError(f"{path}: cannot read depth ({type(err).__name__}: {_one_line(err)}); {_SAVE_HINT}") from err
    if depth.dtype.kind not in "fiu":
        what = {"b": "booleans (a mask?)", "c": "complex numbers", "V": "structured records", "U": "strings",
                "S": "bytes", "M": "dates", "m": "time spans", "O": "Python objects"}.get(depth.dtype.kind, "non-numbers")
        raise DatasetError(f"{path}: depth has dtype {depth.dtype} ({what}); {_SAVE_HINT}")
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.shape != tuple(image_hw):
        raise DatasetError(
            f"{path}: depth has shape {depth.shape} but its image is {image_hw[0]}x{image_hw[1]} (height x width); "
            "save depth as an HxW array at the image's resolution"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        return depth.astype(np.float32)


def load_depth_image(path: Path, image_hw: Tuple[int, int]) -> np.ndarray:
    """A depth image (16-bit PNG, 32-bit TIFF: what nerfstudio's captures store, in the units their
    dataparser states) as ``[H, W]`` float32, checked against its image's ``(height, width)``."""
    try:
        with Image.open(path) as pil:
            depth = np.asarray(pil).astype(np.float32)
    except Exception as err:  # as read_rgb
        raise DatasetError(f"{path}: cannot read depth image ({_one_line(err)}); save depth as a 16-bit PNG or .npy") from err
    if depth.ndim == 3:
        depth = depth[..., 0]
    if depth.shape != tuple(image_hw):
        raise DatasetError(
            f"{path}: depth has shape {depth.shape} but its image is {image_hw[0]}x{image_hw[1]} (height x width); "
            "save depth at the image's resolution"
        )
    return depth


def disparity_from_depth(depth: np.ndarray, kind: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(disparity, valid)`` from a float32 depth array, both ``[H, W]`` (float32, bool).

    The validity rule, per ``kind``:

    - ``'z-depth'`` (world units): valid where ``z >= float32 tiny`` (~1.18e-38): positive, not NaN,
      and not so small that ``1/z`` overflows. ``+inf`` is valid (nothing was hit: disparity 0).
      Zero, negative, NaN and -inf are invalid.
    - ``'disparity'`` (relative, larger = nearer): valid where finite. Negative values are valid:
      relative disparity (from a monocular model) is only defined up to scale and shift, and each
      image's own percentiles map it onto the canonical scene (:class:`RelativeDisparityConfig`), so a
      negative offset is legitimate.

    Invalid pixels get disparity 0 and never count in the depth loss.
    """
    if kind == "z-depth":
        valid = depth >= np.finfo(np.float32).tiny
        with np.errstate(divide="ignore"):
            disparity = np.where(valid, 1.0 / np.where(valid, depth, 1.0), 0.0)
    elif kind == "disparity":
        valid = np.isfinite(depth)
        disparity = np.where(valid, depth, 0.0)
    else:
        raise ValueError(f"depth kind must be 'z-depth' or 'disparity', got {kind!r}")
    return disparity.astype(np.float32), valid


def check_some_depth_valid(path: Path, depth: np.ndarray, valid: np.ndarray, kind: str) -> None:
    """``DatasetError`` naming ``path`` when no pixel of ``depth`` is valid (``valid``, by the rule of
    :func:`disparity_from_depth`): such a file supervises nothing, so it is a bad file, not a silent
    depth loss of 0. The message says what the values are; for negative z-depth, that it looks like
    OpenGL camera-space z (the camera looks down -z, so everything in front of it is negative)."""
    if valid.any():
        return
    with np.errstate(invalid="ignore"):
        counts = {
            "NaN": int(np.isnan(depth).sum()), "-inf": int(np.isneginf(depth).sum()),
            "+inf": int(np.isposinf(depth).sum()), "zero": int((depth == 0).sum()),
            "negative": int((np.isfinite(depth) & (depth < 0)).sum()),
        }
    counts["positive but too small"] = depth.size - sum(counts.values())
    found = {name: n for name, n in counts.items() if n}
    if len(found) == 1:
        what = f"all {depth.size} values are {next(iter(found))}"
    else:
        what = ", ".join(f"{n} {name}" for name, n in found.items()) + f" of {depth.size} values"
    if kind == "z-depth" and counts["negative"] + counts["-inf"]:
        fix = ("negative z-depth looks like OpenGL camera-space z, where the camera looks down -z; save -z "
               "(the distance in front of the camera, > 0)")
    elif kind == "z-depth":
        fix = "save z-depth > 0 where measured (0 or NaN only where unknown), or remove this image and its depth"
    else:
        fix = "save finite disparity (larger = nearer) where known, or remove this image and its depth"
    raise DatasetError(f"{path}: depth has no valid pixel ({what}); {fix}")


def load_disparity(
    path: Path, kind: str, image_hw: Tuple[int, int], size: int, depth_scale: float = 1.0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read a depth ``.npy`` (:func:`load_depth_array`) and return disparity ``[size, size, 1]``
    float32 (finite everywhere, 0 where unknown) and its validity mask ``[size, size, 1]`` bool, on the
    same centre crop as the image. ``depth_scale`` multiplies z-depth first (e.g. millimetres to world
    units, then into an image's canonical frame); a 16-bit PNG/TIFF depth image is read as z-depth too.

    ``kind`` and the validity rule: :func:`disparity_from_depth`. Resizing averages valid pixels only
    (area when shrinking, bilinear when enlarging); an output pixel is valid when every source pixel
    that contributes to it is.
    """
    depth = load_depth_array(path, image_hw) if Path(path).suffix.lower() == ".npy" else load_depth_image(path, image_hw)
    if depth_scale != 1.0:
        if kind != "z-depth":
            raise ValueError("depth_scale applies to z-depth only")
        depth = depth * np.float32(depth_scale)
    disparity, valid = disparity_from_depth(depth, kind)
    check_some_depth_valid(path, depth, valid, kind)
    height, width = image_hw
    left, top, right, bottom = center_crop_box(width, height)
    disp = torch.from_numpy(np.ascontiguousarray(disparity[top:bottom, left:right]))[None, None]
    mask = torch.from_numpy(np.ascontiguousarray(valid[top:bottom, left:right]))[None, None]
    if disp.shape[-1] != size:
        # float64: a weighted mean of float32 values stays inside float32's range
        mode = "area" if disp.shape[-1] > size else "bilinear"
        weight = mask.double()
        weighted = F.interpolate(disp.double() * weight, size=(size, size), mode=mode)
        coverage = F.interpolate(weight, size=(size, size), mode=mode)
        mask = coverage > 1.0 - 1e-6
        disp = torch.where(mask, weighted / coverage.clamp_min(1e-12), torch.zeros_like(weighted))
    return disp[0].permute(1, 2, 0).float(), mask[0].permute(1, 2, 0)


MOVED_FROM = "--pipeline.model.relative-disparity-"
"""The flags' prefix when these options were the model's (tyro takes aliases verbatim, so each
alias is the whole flag). Removal: with the other old flags, at version 0.2.0."""


@dataclass
class RelativeDisparityConfig:
    """The depth loss's target for relative pseudo-GT disparity (depth kind 'disparity'): each image's
    robust range mapped onto the canonical scene's disparity. The target depends on the data alone, so
    the dataset computes it once per image as it reads the depth (:meth:`target`); the model takes
    the item's disparity as its target as is, metric or relative."""

    percentiles: renamed(ranged(Tuple[float, float], 0, 100), MOVED_FROM + "percentiles") = (5.0, 95.0)
    """Relative pseudo-GT disparity (depth kind 'disparity': what a monocular network gives a photo,
    unknown scale and shift per image): these percentiles of each image's valid pixels ..."""
    target_range: renamed(ranged(Tuple[float, float], 0), MOVED_FROM + "range") = (0.0, 0.83)
    """... are mapped onto this (far, near) disparity of the canonical scene. 0 puts the farthest 5%
    at infinity (sky, distant background); 0.83 puts the nearest 5% 1.2 units from the camera (0.8
    units in front of the pivot): in the median synthetic scene the 95th percentile of the true
    disparity is 0.83 (ground 0.5 below the camera, seen at the bottom edge). The target depends on
    the pseudo-GT only: a flat or inverted NeRF cannot match it (fitting the
    pseudo-GT to the render instead scores flat geometry zero), and it is invariant to a * d + b (a > 0)
    of the pseudo-GT."""

    def target(self, disparity: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """One image's relative disparity ``[S, S, 1]`` and its valid mask ``[S, S, 1]`` bool ->
        ``(target, mask)``: the canonical scene's disparity ``[S, S, 1]``
        (:func:`~vq3d_nerfstudio.stage1.losses.canonical_disparity` with the anchors
        :func:`~vq3d_nerfstudio.stage1.losses.disparity_anchors` of the valid pixels), and the mask, all
        False when the anchors coincide (a flat pseudo-GT says nothing about depth). Every pixel is
        mapped, invalid ones (0) too, so the map is one affine function of the pseudo-GT (the
        discriminator's disparity, normalised per image, sees the same shape)."""
        low, high = disparity_anchors(disparity[None], mask[None], self.percentiles)
        pixels = disparity.reshape(-1, 1)
        target, ok = canonical_disparity(pixels, low.expand(len(pixels)), high.expand(len(pixels)), self.target_range)
        return target.reshape(disparity.shape), mask & ok.reshape(mask.shape)


MIN_VALID_DEPTH_FRACTION = 0.01
"""Below this fraction of valid depth pixels in the batches seen so far, training warns (once): the
depth loss then hardly sees any depth although the dataset declares it."""


class DepthCoverage:
    """Counts valid depth pixels in the batches of a dataset that declares depth and warns once, on
    stderr, when fewer than :data:`MIN_VALID_DEPTH_FRACTION` of them are valid (per file, a depth with
    no valid pixel at all is already refused by :func:`check_some_depth_valid`)."""

    def __init__(self, depth_kind: str = "none"):
        self.depth_kind = depth_kind
        self.valid = 0
        self.total = 0
        self.warned = False

    def add(self, batch: Dict) -> None:
        """Count ``batch``'s input-image depth mask (``disparity_mask``, or view 0 of ``view_disparity_mask``)."""
        mask = batch.get("disparity_mask")
        if mask is None and "view_disparity_mask" in batch:
            mask = batch["view_disparity_mask"][:, 0]
        if mask is None or mask.numel() == 0:
            return
        self.valid += int(mask.sum())
        self.total += mask.numel()
        fraction = self.valid / self.total
        if not self.warned and fraction < MIN_VALID_DEPTH_FRACTION:
            self.warned = True
            hint = ""
            if self.depth_kind == "z-depth":
                hint = " (z-depth must be > 0; negative values look like OpenGL camera-space z: save -z)"
            print(
                f"vq3d: warning: only {fraction:.2%} of the depth pixels in the batches so far are valid "
                f"({self.valid} of {self.total}); the depth loss sees almost no depth - check the depth files{hint}",
                file=sys.stderr, flush=True,
            )


class Vq3dImageDataset(InputDataset):
    """Items: ``image`` ``[S, S, 3]`` float in [0, 1], ``image_idx``, ``class_id`` (-1 when unknown),
    ``skipped`` (see ``SKIPPED_KEY``), and with depth ``disparity`` ``[S, S, 1]`` plus
    ``disparity_mask`` ``[S, S, 1]`` bool: the depth loss's target, metric disparity as read, or
    relative pseudo-GT already mapped onto the canonical scene by ``relative_disparity`` (its
    :meth:`RelativeDisparityConfig.target`; default: its defaults).

    Nothing is cached: a 1.28M-image collection never sits in memory.

    ``dataset[i]`` (what DataLoaders call) never fails on one bad file unless ``strict``: an item
    whose image or depth cannot be read is replaced by the next readable one (its own ``image_idx``)
    and the bad file is listed in the item's ``skipped``; files found bad are remembered by this copy
    of the dataset (each DataLoader worker has its own) and passed over at once afterwards.
    :meth:`get_data` reads exactly item ``i`` and raises :class:`DatasetError`.
    """

    exclude_batch_keys_from_device = []

    def __init__(
        self, dataparser_outputs: DataparserOutputs, scale_factor: float = 1.0, strict: bool = False,
        relative_disparity: Optional[RelativeDisparityConfig] = None,
    ):
        if "shard_root" in dataparser_outputs.metadata:
            raise DatasetError(
                f"{dataparser_outputs.metadata['shard_root']}: prepared shards are streamed by the datamanager "
                "(or read with ShardReader / ShardImageDataset), not per file; point --data at the image folder"
            )
        super().__init__(dataparser_outputs, scale_factor)
        self.image_size = int(self.cameras.width[0, 0])
        self.depth_kind: str = self.metadata.get("depth_kind", "none")
        self.depth_filenames: Optional[list] = self.metadata.get("depth_filenames")
        self.relative_disparity = relative_disparity or RelativeDisparityConfig()
        self.class_ids: list = self.metadata.get("class_ids", [-1] * len(self))
        self.strict = strict
        self.bad_files: Dict[int, str] = {}  # index -> "<path>\t<reason>", found by this copy

    def get_data(self, image_idx: int, image_type: str = "float32") -> Dict:
        path = self._dataparser_outputs.image_filenames[image_idx]
        data: Dict = {
            "image_idx": image_idx,
            "image": load_image(path, self.image_size),
            "class_id": torch.tensor(self.class_ids[image_idx], dtype=torch.long),
        }
        if self.depth_filenames is not None:
            depth_path = self.depth_filenames[image_idx]
            scales = self.metadata.get("depth_scales")  # set for posed data: into each image's canonical frame
            scale = 1.0 if scales is None else float(scales[image_idx])
            disp, mask = load_disparity(depth_path, self.depth_kind, image_size_of(path), self.image_size, scale)
            if self.depth_kind == "disparity":
                disp, mask = self.relative_disparity.target(disp, mask)
            data["disparity"] = disp
            data["disparity_mask"] = mask
        return data

    def __getitem__(self, image_idx: int) -> Dict:
        return item_or_next_readable(self, image_idx, lambda i: str(self._dataparser_outputs.image_filenames[i]))


def skip_entry(name: str, err: Exception) -> str:
    """A bad file's line in an item's ``skipped`` (see ``SKIPPED_KEY``): ``"<name>\\t<reason>"``."""
    return f"{name}\t{_one_line(err)}"


def nothing_readable(skipped: Sequence[str]) -> DatasetError:
    """The error once :data:`MAX_REPLACEMENT_TRIES` files in a row (or all there are) were bad: the
    first one's reason and how many followed it."""
    first_reason = skipped[0].split("\t", 1)[1]
    return DatasetError(
        f"{first_reason} - and the {len(skipped) - 1} images after it could not be read either; "
        "check the data folder (run `vq3d prepare` on it for a full report of bad files)"
        if len(skipped) > 1 else first_reason
    )


def item_or_next_readable(dataset: InputDataset, image_idx: int, name_of: Callable[[int], str]) -> Dict:
    """``dataset.get_data(image_idx)`` with the ``skipped`` entry; the policy for a bad file of any
    dataset with ``strict`` and a ``bad_files`` dict (index -> its ``skipped`` line, remembered by
    this copy of the dataset). ``strict``: its :class:`DatasetError` is raised; otherwise the next
    readable item is returned, and the bad ones on the way (named by ``name_of(index)``) are listed in
    its ``skipped``."""
    if dataset.strict:
        return {**dataset.get_data(image_idx), SKIPPED_KEY: ""}
    skipped: List[str] = []
    count = len(dataset)
    for attempt in range(min(count, MAX_REPLACEMENT_TRIES + 1)):
        index = (image_idx + attempt) % count
        if index in dataset.bad_files:
            skipped.append(dataset.bad_files[index])
            continue
        try:
            data = dataset.get_data(index)
        except DatasetError as err:
            dataset.bad_files[index] = skip_entry(name_of(index), err)
            skipped.append(dataset.bad_files[index])
            continue
        data[SKIPPED_KEY] = "\n".join(skipped)
        return data
    if not skipped:
        raise IndexError(f"image {image_idx} of an empty dataset")
    raise nothing_readable(skipped)

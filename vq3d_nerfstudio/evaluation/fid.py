"""FID (Heusel et al. 2017) and Inception Score (Salimans et al. 2016) on folders of images.

A thin layer over the libraries: torch-fidelity's FID Inception-v3 (the TensorFlow graph
``2015-12-05`` ported to PyTorch; pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` and
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` are the same weights, same keys and
sha256 prefix) computes the features, and torchmetrics' ``FrechetInceptionDistance`` and
``InceptionScore`` the scores. This module adds the folders (the project's image reading, a progress
bar), the weights (read once by :func:`~vq3d_nerfstudio.files.load_weights`, never unpickled), and
one pass of the network per image for both scores.

Pre-processing is torch-fidelity's, the TF graph's own: uint8 images are resized to 299x299 with
TF 1.x's bilinear resize (no half-pixel centres, no antialiasing) and mapped with ``(x - 128) / 128``.
pytorch-fid, which this project's earlier FID numbers followed, resizes with torch's half-pixel
bilinear and maps ``2 x / 255 - 1``: at 299 px the network's inputs differ by at most 0.008 (0.4 % of
the [-1, 1] range), at other sizes the resize differs too, so FIDs are close to, not equal to,
pytorch-fid's (16 + 16 images of 64 px, random weights, 2048-d: 9.75 here, 9.59 with pytorch-fid's
pre-processing). Compare numbers made by one tool. Images are read as training reads
them (:func:`~vq3d_nerfstudio.data.dataset.read_rgb`: EXIF orientation applied, alpha over white).

FID from fewer than ~10k images is biased upwards: compare numbers only at equal sample counts.
"""

from __future__ import annotations

import io
import itertools
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from vq3d_nerfstudio.data.dataset import read_rgb
from vq3d_nerfstudio.data.folders import IMAGE_EXTENSIONS, is_image_file
from vq3d_nerfstudio.errors import DatasetError
from vq3d_nerfstudio.files import WeightsUnavailable, load_weights

if TYPE_CHECKING:  # torchmetrics loads when a score is computed, not when this module is imported
    from torchmetrics.image.fid import FrechetInceptionDistance

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_HASH_PREFIX = "6726825d"  # first hex digits of the file's sha256, checked on download
# File names the same weights have in the torch hub cache: pytorch-fid's, then torch-fidelity's copy.
_CACHED_NAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
_NEEDED = "FID needs the Inception weights pt_inception-2015-12-05"

FEATURE_DIMS = (64, 192, 768, 2048)
"""Feature sizes the network can stop at (pytorch-fid's ``--dims``); only 2048 is the standard FID."""
NUM_CLASSES = 1008


class InceptionUnavailable(WeightsUnavailable):
    """The FID Inception weights are not on this machine (or the file is not those weights)."""


class ImageFolderError(DatasetError):
    """A folder of images that cannot be scored; the message names the folder or file."""


# ---------------------------------------------------------------------------------------------------
# The network.


class FIDInception(nn.Module):
    """torch-fidelity's FID Inception-v3 holding ``state``, frozen, in eval mode.

    torch-fidelity's constructor always loads weights itself (from its URL, or with
    ``torch.load(path, weights_only=False)``, which would run code hidden in a file): it is handed an
    in-memory copy of ``state``, a dict of tensors already read safely, never the user's file.

    ``feature_dim`` < 2048 stops early at a shallower pool (pytorch-fid's ``--dims``): cheaper, but not
    the standard FID, and without the logits the Inception Score needs.

    Raises:
        ValueError: ``feature_dim`` not in :data:`FEATURE_DIMS`.
        RuntimeError: ``state`` does not fit the network (torch's ``load_state_dict`` message).
    """

    def __init__(self, state: Dict[str, torch.Tensor], feature_dim: int = 2048) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if feature_dim not in FEATURE_DIMS:
            raise ValueError(f"feature_dim must be one of {FEATURE_DIMS}, not {feature_dim}")
        self.feature_dim = feature_dim
        layers = [str(feature_dim)] + (["logits_unbiased"] if feature_dim == 2048 else [])
        buffer = io.BytesIO()
        torch.save(state, buffer)  # tensors only: unpickling these bytes runs nothing
        buffer.seek(0)
        self.network = FeatureExtractorInceptionV3("inception-v3-compat", layers, feature_extractor_weights_path=buffer)

    def train(self, mode: bool = True) -> "FIDInception":
        return super().train(False)  # batch norms always use the stored statistics

    @property
    def device(self) -> torch.device:
        return self.network.fc.weight.device

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Features and logits of ``[N, 3, H, W]`` uint8 RGB images (any size; resized to 299 inside).

        Returns:
            ``[N, feature_dim]`` float32 pooled features, and (only when ``feature_dim`` is 2048) the
            ``[N, 1008]`` logits without the classifier's bias, as the reference IS code computes them.
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        outputs = self.network(images)
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)


def default_weights_path() -> Path:
    """Where pytorch-fid caches the weights: ``$TORCH_HOME/hub/checkpoints/pt_inception-...pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _CACHED_NAMES[0]


def find_weights(weights_path: Optional[Path] = None) -> Optional[Path]:
    """The weights file to use: ``weights_path`` if given (existing or not), else the first of the
    hub-cache names (pytorch-fid's, torch-fidelity's) that exists, else None."""
    if weights_path is not None:
        return Path(weights_path)
    cached = [default_weights_path().with_name(name) for name in _CACHED_NAMES]
    return next((path for path in cached if path.is_file()), None)


def load_inception(weights_path: Optional[Path] = None, download: bool = False, feature_dim: int = 2048) -> FIDInception:
    """The FID network with its weights, from ``weights_path`` (a ``.pth`` state dict or a
    ``.safetensors`` copy), else the torch hub cache, else (when ``download``) fetched from
    pytorch-fid's release into the cache. Raises :class:`InceptionUnavailable`, naming the place and
    the URL, when there is no such file, it is not a plain state dict (nothing in it is run), or it
    does not hold these weights."""
    path = find_weights(weights_path) or default_weights_path()
    download = download and weights_path is None
    state = load_weights(path, _NEEDED, WEIGHTS_URL, download, WEIGHTS_HASH_PREFIX, error=InceptionUnavailable)
    try:
        return FIDInception(state, feature_dim)
    except RuntimeError as err:
        summary = str(err).splitlines()[0][:200]
        raise InceptionUnavailable(f"{path}: does not hold the FID Inception weights ({summary})") from None


# ---------------------------------------------------------------------------------------------------
# Scores from features, through torchmetrics.


class PrecomputedFeatures(nn.Identity):
    """The ``feature=`` module handed to torchmetrics' metrics: :class:`FIDInception` gives the pool
    features and the logits in one pass, so the metrics' ``update`` receives features, not images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # read by FrechetInceptionDistance instead of a dummy forward


def fid_metric(feature_dim: int) -> FrechetInceptionDistance:
    """An empty torchmetrics ``FrechetInceptionDistance`` over ``[N, feature_dim]`` features (its
    ``update(features, real=...)``), keeping the real set across ``reset()``. Float64 sums; the
    distance is ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 sum sqrt(eig(S1 S2))`` (Heusel et al. 2017, eq. 6)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=PrecomputedFeatures(feature_dim), reset_real_features=False)


def inception_score(logits: torch.Tensor, num_splits: int = 10) -> Tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` (Salimans et al. 2016, sec. 4) by torchmetrics'
    ``InceptionScore``: ``p(y)`` is the mean of ``p(y|x)`` within each chunk of the shuffled images.

    torchmetrics shuffles with torch's global generator; here the order is fixed (seed 0, the global
    generator left as it was), so one set always gets one score. Chunks are ``torch.chunk``'s: of
    ``ceil(N / num_splits)`` images, so there may be fewer than ``num_splits``.

    Args:
        logits: ``[N, C]`` class logits (for the standard IS: the FID network's unbiased logits).
        num_splits: chunks scored separately (10 in the reference code), 1 <= num_splits <= N.

    Returns:
        ``(mean, std)`` of the per-chunk scores, from 1 (every image gets the same distribution) to C;
        std is the unbiased one (torch's ``std``; pytorch-fid and torch-fidelity divide by the number of
        chunks, not one less), 0 when there is one chunk.
    """
    from torchmetrics.image.inception import InceptionScore

    if logits.ndim != 2 or not 1 <= num_splits <= len(logits):
        raise ValueError(f"need logits [N, C] with N >= num_splits >= 1, got {tuple(logits.shape)} and {num_splits}")
    with warnings.catch_warnings():  # "will save all extracted features in buffer": they are already in memory
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=nn.Identity(), splits=num_splits)
    metric.update(logits.double().cpu())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mean, std = metric.compute()
    num_chunks = math.ceil(len(logits) / math.ceil(len(logits) / num_splits))
    return float(mean), float(std) if num_chunks > 1 else 0.0


# ---------------------------------------------------------------------------------------------------
# Folders.


def list_images(folder: Path) -> List[Path]:
    """Images under ``folder``, recursively, in sorted order: the files ``vq3d-images`` would read
    (:func:`~vq3d_nerfstudio.data.folders.is_image_file`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageFolderError(f"{folder}: not a folder of images")
    paths = sorted(p for p in folder.rglob("*") if is_image_file(p) and p.is_file())
    if not paths:
        raise ImageFolderError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or its subfolders")
    return paths


def read_image(path: Path) -> torch.Tensor:
    """``[3, H, W]`` uint8 RGB, whole (no crop, no resize), read as training reads images
    (:func:`~vq3d_nerfstudio.data.dataset.read_rgb`: EXIF orientation, any mode, alpha over white)."""
    try:
        array = read_rgb(path)
    except DatasetError as err:
        raise ImageFolderError(str(err)) from err
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


@torch.no_grad()
def compute_folder_features(
    folder: Path, network: FIDInception, batch_size: int = 50, progress: bool = True
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run every image under ``folder`` (see :func:`list_images`) through ``network`` on its device.

    Images of any sizes may be mixed: consecutive images of one size go through together, and the
    network resizes each batch to 299 itself.

    Returns:
        ``[N, feature_dim]`` features and ``[N, 1008]`` logits (None when ``feature_dim`` < 2048),
        float64 on the CPU, rows in :func:`list_images` order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = list_images(folder)
    features, logits = [], []

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(paths), batch_size):
            images = [read_image(path) for path in paths[start : start + batch_size]]
            for _, same_size in itertools.groupby(images, key=lambda image: image.shape):
                yield torch.stack(list(same_size)).to(network.device)  # (B, 3, H, W) uint8

    def run(batch: torch.Tensor) -> None:
        batch_features, batch_logits = network(batch)
        features.append(batch_features.double().cpu())
        if batch_logits is not None:
            logits.append(batch_logits.double().cpu())

    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, transient=True) as bar:
            task = bar.add_task(f"Inception features of {folder}", total=len(paths))
            for batch in batches():
                run(batch)
                bar.advance(task, len(batch))
    else:
        for batch in batches():
            run(batch)
    return torch.cat(features), (torch.cat(logits) if logits else None)


def folder_statistics(
    folder: Path, network: FIDInception, batch_size: int = 50, progress: bool = True
) -> FrechetInceptionDistance:
    """A :func:`fid_metric` holding the real set under ``folder``, for :func:`fid_between_folders`'s
    ``real_statistics`` (the running sums, not the features: one real set, several fake sets)."""
    features, _ = compute_folder_features(folder, network, batch_size, progress)
    if len(features) < 2:
        raise ImageFolderError(f"{folder}: FID needs at least 2 images, found {len(features)}")
    metric = fid_metric(network.feature_dim)
    metric.update(features, real=True)
    return metric


def fid_between_folders(
    real: Optional[Path],
    fake: Path,
    network: FIDInception,
    batch_size: int = 50,
    num_splits: int = 10,
    real_statistics: Optional[FrechetInceptionDistance] = None,
    progress: bool = True,
) -> Dict[str, float]:
    """FID of the images under ``fake`` against those under ``real``, and the Inception Score of ``fake``.

    Args:
        real: folder of real images; ignored (may be None) when ``real_statistics`` is given.
        fake: folder of generated images.
        network: from :func:`load_inception` (or an :class:`FIDInception` of random weights in tests),
            on any device.
        num_splits: IS chunks, lowered to the number of fake images when there are fewer.
        real_statistics: the real set as :func:`folder_statistics` returns it, to score several fake sets
            (e.g. one per rendered view) against one real set without reading it again; its fake half
            is reset here.

    Returns:
        ``{"fid", "num_fake"}``, ``"num_real"`` when the real folder was read, and ``"inception_score"``,
        ``"inception_score_std"`` when the network gives logits (``feature_dim`` 2048).
    """
    result: Dict[str, float] = {}
    if real_statistics is None:
        if real is None:
            raise ValueError("pass the real folder or its statistics")
        real_statistics = folder_statistics(real, network, batch_size, progress)
        result["num_real"] = int(real_statistics.real_features_num_samples)
    fake_features, fake_logits = compute_folder_features(fake, network, batch_size, progress)
    if len(fake_features) < 2:
        raise ImageFolderError(f"{fake}: FID needs at least 2 images, found {len(fake_features)}")
    result["num_fake"] = len(fake_features)
    real_statistics.reset()  # the fake half only (reset_real_features=False)
    real_statistics.update(fake_features, real=False)
    result["fid"] = float(real_statistics.compute())
    if fake_logits is not None:
        score, std = inception_score(fake_logits, min(num_splits, len(fake_logits)))
        result.update(inception_score=score, inception_score_std=std)
    return result

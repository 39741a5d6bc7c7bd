"""FID (Heusel et al. 2017) and Inception Score (Salimans et al. 2016) on folders of images.

The feature network is the FID Inception-v3: the TensorFlow graph ``2015-12-05`` ported to PyTorch
by pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``; torch-fidelity's copy,
``weights-inception-2015-12-05-6726825d.pth``, has the same keys and sha256 prefix), with the TF
graph's quirks (average pools that do not count padding, a max pool in the last block, 1008
classes). Built here on torchvision's Inception blocks with pytorch-fid's parameter names, so that
file loads as is and the numbers are comparable with papers that use pytorch-fid.

Pre-processing follows pytorch-fid: images in [0, 1] are resized to 299x299 (bilinear,
``align_corners=False``, no antialiasing) and mapped to [-1, 1]. (torch-fidelity instead resizes
uint8 images like TF 1.x and maps with ``(x - 128) / 128``, so its FIDs differ slightly.) Images
are read as stored on disk, EXIF orientation ignored, as pytorch-fid does.

FID from fewer than ~10k images is biased upwards: compare numbers only at equal sample counts.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from vq3d_nerfstudio.data.dataset import read_rgb
from vq3d_nerfstudio.data.folders import IMAGE_EXTENSIONS, is_image_file
from vq3d_nerfstudio.errors import DatasetError
from vq3d_nerfstudio.files import try_download

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
WEIGHTS_HASH_PREFIX = "6726825d"  # first hex digits of the file's sha256, checked on download
# File names the same weights have in the torch hub cache: pytorch-fid's, then torch-fidelity's copy.
_CACHED_NAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")

INPUT_SIZE = 299
FEATURE_DIMS = (64, 192, 768, 2048)
"""Feature sizes the network can stop at (pytorch-fid's ``--dims``); only 2048 is the standard FID."""
NUM_CLASSES = 1008


class InceptionUnavailable(RuntimeError):
    """The FID Inception weights are not on this machine (or the file is not those weights)."""


class ImageFolderError(ValueError):
    """A folder of images that cannot be scored; the message names the folder or file."""


# ---------------------------------------------------------------------------------------------------
# Pure functions on features.


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``[N, D]`` features -> mean ``[D]`` and unbiased covariance ``[D, D]`` (float64), as pytorch-fid."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of shape [N >= 2, D], got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):

        ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``

    The matrix square root is ``scipy.linalg.sqrtm``, as in pytorch-fid. When the product is singular
    (fewer samples than dimensions) and sqrtm returns non-finite values or a clearly complex diagonal,
    both covariances are offset by ``eps * I`` and the root is taken again; imaginary parts left by
    round-off (diagonal within 1e-3 of real) are dropped.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )

    def nearly_real(root: np.ndarray) -> bool:
        return bool(np.isfinite(root).all()) and np.allclose(np.diagonal(root).imag, 0, atol=1e-3)

    with warnings.catch_warnings():  # "matrix is singular": handled below, as pytorch-fid does
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not nearly_real(covmean):
            offset = np.eye(len(mu1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not nearly_real(covmean):
            raise ValueError(
                "the covariances' product has no usable square root even with an eps offset "
                f"(largest imaginary part {np.max(np.abs(covmean.imag)):.3g}); use more images"
            )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean).real)


def inception_score(logits: np.ndarray, num_splits: int = 10) -> Tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` (Salimans et al. 2016, sec. 4), ``p(y)`` the mean
    of ``p(y|x)`` within each of ``num_splits`` consecutive chunks.

    Args:
        logits: ``[N, C]`` class logits (for the standard IS: the FID network's unbiased logits).
        num_splits: chunks scored separately (10 in the reference code); each needs >= 1 sample.

    Returns:
        ``(mean, std)`` of the per-chunk scores; from 1 (every image gets the same distribution) to C.
    """
    from scipy.special import log_softmax

    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or not 1 <= num_splits <= len(logits):
        raise ValueError(f"need logits [N, C] with N >= num_splits >= 1, got {logits.shape} and {num_splits}")
    log_p = log_softmax(logits, axis=1)  # (N, C)
    scores = []
    for chunk in np.array_split(log_p, num_splits):
        log_marginal = np.log(np.exp(chunk).mean(axis=0, keepdims=True))  # (1, C)
        kl = (np.exp(chunk) * (chunk - log_marginal)).sum(axis=1)  # (n,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------------
# The network.


class _FIDInceptionA(InceptionA):
    """torchvision's block with TF's average pool, which leaves the zero padding out of the mean."""

    def _forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), branch3x3dbl, self.branch_pool(pool)]


class _FIDInceptionC(InceptionC):
    """torchvision's block with TF's average pool (padding not counted)."""

    def _forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(pool)]


class _FIDInceptionE(InceptionE):
    """torchvision's block with the TF graph's pool: average (padding not counted) in Mixed_7b, max in
    Mixed_7c (a quirk of that graph, kept because the weights were trained with it)."""

    def __init__(self, in_channels: int, use_max_pool: bool) -> None:
        super().__init__(in_channels)
        self.use_max_pool = use_max_pool

    def _forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.use_max_pool:
            pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pool)]


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (pytorch-fid's architecture and parameter names), frozen, in eval mode.

    Built with random weights (He-normal convolutions, identity batch norms, so features stay O(1)
    through the depth): use :func:`load_inception` for the real ones. ``feature_dim`` < 2048 stops
    early at a shallower pool (pytorch-fid's ``--dims``): cheaper, but not the standard FID.
    """

    def __init__(self, feature_dim: int = 2048) -> None:
        super().__init__()
        if feature_dim not in FEATURE_DIMS:
            raise ValueError(f"feature_dim must be one of {FEATURE_DIMS}, not {feature_dim}")
        self.feature_dim = feature_dim
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = _FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = _FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = _FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = _FIDInceptionE(1280, use_max_pool=False)
        self.Mixed_7c = _FIDInceptionE(2048, use_max_pool=True)
        self.fc = nn.Linear(2048, NUM_CLASSES)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        return super().train(False)  # batch norms always use the stored statistics

    @staticmethod
    def resize(images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, 3, 299, 299]``, bilinear as pytorch-fid (identity at 299)."""
        if images.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
            return images
        return F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Features and logits of ``[N, 3, H, W]`` RGB images in [0, 1] (any size; resized to 299).

        Returns:
            ``[N, feature_dim]`` pooled features, and (only when ``feature_dim`` is 2048) the
            ``[N, 1008]`` logits without the classifier's bias, as the reference IS code computes them.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        x = 2.0 * self.resize(images.to(self.fc.weight.dtype)) - 1.0  # (N, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        if self.feature_dim == 64:
            return x.mean(dim=(2, 3)), None
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        if self.feature_dim == 192:
            return x.mean(dim=(2, 3)), None
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e):
            x = block(x)  # (N, 768, 17, 17) at the end
        if self.feature_dim == 768:
            return x.mean(dim=(2, 3)), None
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        features = x.mean(dim=(2, 3))  # (N, 2048)
        return features, features @ self.fc.weight.T  # (N, 2048), (N, 1008)


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


def load_inception(
    weights_path: Optional[Path] = None, download: bool = False, feature_dim: int = 2048
) -> FIDInceptionV3:
    """The FID network with its weights, from ``weights_path``, else the torch hub cache, else (when
    ``download``) fetched from pytorch-fid's release into the cache. Raises :class:`InceptionUnavailable`,
    naming the place and the URL, when there is no such file or it does not hold these weights."""
    path = find_weights(weights_path)
    if path is None and download:
        path = default_weights_path()
        try_download(WEIGHTS_URL, path, hash_prefix=WEIGHTS_HASH_PREFIX)
    if path is None or not path.is_file():
        where = path if path is not None else default_weights_path()
        raise InceptionUnavailable(
            f"FID needs the Inception weights pt_inception-2015-12-05 at {where}; download {WEIGHTS_URL} "
            "there (or pass the file's path)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file gets the same one-line error
        raise InceptionUnavailable(f"{path}: not a readable state dict ({err})") from err
    network = FIDInceptionV3(feature_dim)
    try:
        network.load_state_dict(state)
    except (RuntimeError, AttributeError) as err:
        summary = str(err).splitlines()[0][:200]
        raise InceptionUnavailable(f"{path}: does not hold the FID Inception weights ({summary})") from err
    return network


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
    """``[3, H, W]`` float32 RGB in [0, 1], whole (no crop, no resize), read as training reads
    images (:func:`~vq3d_nerfstudio.data.dataset.read_rgb`: EXIF orientation, any mode, alpha over white)."""
    try:
        array = read_rgb(path).astype(np.float32) / 255.0
    except DatasetError as err:
        raise ImageFolderError(str(err)) from err
    return torch.from_numpy(array).permute(2, 0, 1)


@torch.no_grad()
def compute_folder_features(
    folder: Path, network: FIDInceptionV3, batch_size: int = 50, progress: bool = True
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Run every image under ``folder`` (see :func:`list_images`) through ``network`` on its device.

    Images of any sizes may be mixed: each is resized to 299 by the network's own resize.

    Returns:
        ``[N, feature_dim]`` features and ``[N, 1008]`` logits (None when ``feature_dim`` < 2048),
        float64, rows in :func:`list_images` order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = list_images(folder)
    device = network.fc.weight.device
    features, logits = [], []

    def batches():
        for start in range(0, len(paths), batch_size):
            chunk = [read_image(path).to(device) for path in paths[start : start + batch_size]]
            yield torch.cat([network.resize(image[None]) for image in chunk])  # (B, 3, 299, 299)

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
    return torch.cat(features).numpy(), (torch.cat(logits).numpy() if logits else None)


def folder_statistics(
    folder: Path, network: FIDInceptionV3, batch_size: int = 50, progress: bool = True
) -> Tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a folder's features, for :func:`fid_between_folders`'s ``real_statistics``."""
    features, _ = compute_folder_features(folder, network, batch_size, progress)
    if len(features) < 2:
        raise ImageFolderError(f"{folder}: FID needs at least 2 images, found {len(features)}")
    return feature_statistics(features)


def fid_between_folders(
    real: Optional[Path],
    fake: Path,
    network: FIDInceptionV3,
    batch_size: int = 50,
    num_splits: int = 10,
    real_statistics: Optional[Tuple[np.ndarray, np.ndarray]] = None,
    progress: bool = True,
) -> Dict[str, float]:
    """FID of the images under ``fake`` against those under ``real``, and the Inception Score of ``fake``.

    Args:
        real: folder of real images; ignored (may be None) when ``real_statistics`` is given.
        fake: folder of generated images.
        network: from :func:`load_inception` (or a random :class:`FIDInceptionV3` in tests), on any device.
        num_splits: IS chunks, lowered to the number of fake images when there are fewer.
        real_statistics: ``(mu, sigma)`` of the real set from :func:`folder_statistics`, to score several
            fake sets (e.g. one per rendered view) against one real set without reading it again.

    Returns:
        ``{"fid", "num_fake"}``, ``"num_real"`` when the real folder was read, and ``"inception_score"``,
        ``"inception_score_std"`` when the network gives logits (``feature_dim`` 2048).
    """
    result: Dict[str, float] = {}
    if real_statistics is None:
        if real is None:
            raise ValueError("pass the real folder or its statistics")
        real_features, _ = compute_folder_features(real, network, batch_size, progress)
        if len(real_features) < 2:
            raise ImageFolderError(f"{real}: FID needs at least 2 images, found {len(real_features)}")
        real_statistics = feature_statistics(real_features)
        result["num_real"] = len(real_features)
    fake_features, fake_logits = compute_folder_features(fake, network, batch_size, progress)
    if len(fake_features) < 2:
        raise ImageFolderError(f"{fake}: FID needs at least 2 images, found {len(fake_features)}")
    result["num_fake"] = len(fake_features)
    result["fid"] = frechet_distance(*real_statistics, *feature_statistics(fake_features))
    if fake_logits is not None:
        score, std = inception_score(fake_logits, min(num_splits, len(fake_logits)))
        result.update(inception_score=score, inception_score_std=std)
    return result

"""FID and Inception Score: closed forms, pytorch-fid's sqrtm formula and torch-fidelity's IS as
references, the weights loader, folders, and `vq3d fid`.

No Inception weights exist on this machine: every network here holds random weights, and the CLI
reads a state dict of such a network saved by the test.
"""

import json
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import cli, random_inception_state
from PIL import Image

from vq3d_nerfstudio.evaluation.fid import (
    WEIGHTS_HASH_PREFIX,
    WEIGHTS_URL,
    FIDInception,
    ImageFolderError,
    InceptionUnavailable,
    compute_folder_features,
    default_weights_path,
    fid_between_folders,
    fid_metric,
    folder_statistics,
    inception_score,
    load_inception,
)
from vq3d_nerfstudio.files import WeightsUnavailable, load_weights


def blob_images(num: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``[num, 3, size, size]`` smooth random colour fields, on the uint8 grid (PNG round trip is exact)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num, 3, 4, 4, generator=generator)
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (images * 255).round() / 255


def save_pngs(images: torch.Tensor, folder, prefix: str = "img"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(array).save(folder / f"{prefix}_{i:03d}.png")
    return folder


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """The project's FID (torchmetrics) of two ``[N, D]`` feature sets."""
    metric = fid_metric(real.shape[1])
    metric.update(torch.as_tensor(real, dtype=torch.float64), real=True)
    metric.update(torch.as_tensor(fake, dtype=torch.float64), real=False)
    return float(metric.compute())


def sqrtm_fid(real: np.ndarray, fake: np.ndarray, eps: float = 1e-6) -> float:
    """Reference: pytorch-fid's formula, ``tr (S1 S2)^(1/2)`` by ``scipy.linalg.sqrtm`` (both covariances
    offset by ``eps I`` when the product is singular and the root is not finite), real part."""
    from scipy import linalg

    mu1, mu2 = real.mean(axis=0), fake.mean(axis=0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = eps * np.eye(len(mu1))
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A random FID network's state dict, saved as the published weights file is."""
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(random_inception_state(1), path)
    return path


@pytest.fixture(scope="module")
def net64(weights_file):
    """The network's first convolutions only (pytorch-fid's 64-d pool): fast, same input pipeline."""
    return load_inception(weights_file, feature_dim=64)


# --- Fréchet distance -----------------------------------------------------------------------------


def axis_points(mu, variances) -> np.ndarray:
    """``2 D`` points ``mu +- c_i e_i`` whose mean is ``mu`` and whose unbiased covariance is
    ``diag(variances)``: axis i holds ``2 c_i^2 / (2 D - 1)``, and no point is off two axes at once."""
    mu, variances = np.asarray(mu, dtype=float), np.asarray(variances, dtype=float)
    num = 2 * len(mu)
    offsets = np.diag(np.sqrt(variances * (num - 1) / 2))
    return np.concatenate([mu + offsets, mu - offsets])


def test_fid_of_gaussians_matches_the_closed_form():
    # 1-D: (mu1 - mu2)^2 + s1 + s2 - 2 sqrt(s1 s2) = (1 - 3)^2 + 4 + 1 - 2 * 2 = 5
    assert fid(axis_points([1.0], [4.0]), axis_points([3.0], [1.0])) == pytest.approx(5.0, rel=1e-9)
    # Diagonal: |d mu|^2 + sum (sqrt(s1) - sqrt(s2))^2 = (1 + 0 + 4) + ((1 - 2)^2 + (2 - 2)^2 + (3 - 1)^2) = 10
    real, fake = axis_points([1.0, 0.0, -2.0], [1.0, 4.0, 9.0]), axis_points([0.0, 0.0, 0.0], [4.0, 4.0, 1.0])
    np.testing.assert_allclose(np.cov(real, rowvar=False), np.diag([1.0, 4.0, 9.0]), atol=1e-12)
    assert fid(real, fake) == pytest.approx(10.0, rel=1e-9)
    assert fid(real, real) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("num_samples", [200, 10], ids=["full-rank", "singular"])
def test_fid_matches_pytorch_fids_sqrtm_formula(num_samples):
    """torchmetrics takes tr sqrt(S1 S2) from the eigenvalues of S1 S2; pytorch-fid (and this project
    before) from scipy's sqrtm. With 10 samples in 16-d both covariances are singular. Measured
    agreement on 2048-d features of 16 images each (random Inception): 1.8e-6 relative."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(num_samples, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(num_samples, 16)) @ rng.normal(size=(16, 16)) + 0.5
    scale = np.trace(np.cov(a, rowvar=False) + np.cov(b, rowvar=False))
    expected = sqrtm_fid(a, b)
    assert fid(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-6 * scale)
    assert fid(b, a) == pytest.approx(expected, rel=1e-6, abs=1e-6 * scale)


# --- Inception Score ------------------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(torch.zeros(40, 1008), num_splits=4)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_evenly_spread_predictions_is_the_number_of_classes():
    labels = torch.arange(40) % 10  # p(y) uniform over 10 classes, each p(y|x) one-hot
    mean, std = inception_score(50.0 * torch.eye(10)[labels], num_splits=1)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == 0.0  # one chunk: no spread


def test_inception_score_matches_torch_fidelity_and_is_the_same_every_run():
    """Reference: torch-fidelity's IS on the same logits in the order torchmetrics shuffles them into
    (``torch.randperm`` after seed 0). torch-fidelity's std divides by the number of chunks k, torch's
    by k - 1: ours is its std times sqrt(k / (k - 1))."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.from_numpy(np.random.default_rng(0).normal(scale=3.0, size=(40, 1008)))
    torch.manual_seed(0)
    order = torch.randperm(40)
    reference = isc_features_to_metric(logits[order], splits=5, shuffle=False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    mean, std = inception_score(logits, num_splits=5)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is left alone
    assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(reference["inception_score_std"] * np.sqrt(5 / 4), rel=1e-6)
    assert inception_score(logits, num_splits=5) == (mean, std)
    one_chunk = isc_features_to_metric(logits, splits=1, shuffle=False)["inception_score_mean"]
    assert inception_score(logits, num_splits=1)[0] == pytest.approx(one_chunk, rel=1e-9)


# --- The network and its weights ------------------------------------------------------------------


def test_network_maps_pixels_like_the_tf_graph_and_gives_unbiased_logits(weights_file):
    """64-d features by hand from the state dict: (u - 128) / 128, three conv + batch norm (eps 1e-3) +
    relu, a 3x3 stride-2 max pool, the spatial mean; at 299 px nothing is resized. The 2048-d network
    also gives the logits as ``features @ fc.weight.T`` (no bias, as the reference IS code)."""
    state = torch.load(weights_file, weights_only=True)
    torch.manual_seed(2)
    u = (torch.rand(2, 3, 299, 299) * 255).to(torch.uint8)
    x = (u.float() - 128) / 128
    for name, stride, padding in (("Conv2d_1a_3x3", 2, 0), ("Conv2d_2a_3x3", 1, 0), ("Conv2d_2b_3x3", 1, 1)):
        x = F.conv2d(x, state[f"{name}.conv.weight"], stride=stride, padding=padding)
        bn = {key: state[f"{name}.bn.{key}"] for key in ("running_mean", "running_var", "weight", "bias")}
        x = F.relu(F.batch_norm(x, **bn, training=False, eps=1e-3))
    expected = F.max_pool2d(x, kernel_size=3, stride=2).mean(dim=(2, 3))  # (2, 64)
    with torch.no_grad():
        features, logits = FIDInception(state, feature_dim=64)(u)
    assert logits is None
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        features, logits = FIDInception(state)(u[:1, :, :75, :75])  # resized to 299 inside
    assert features.shape == (1, 2048) and logits.shape == (1, 1008)
    torch.testing.assert_close(logits, features @ state["fc.weight"].T, rtol=1e-5, atol=1e-5)


def test_weights_come_from_the_path_then_the_hub_cache_then_a_download(weights_file, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    assert default_weights_path() == tmp_path / "hub" / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[1]

    with pytest.raises(InceptionUnavailable, match="pt_inception-2015-12-05") as missing:
        load_inception(feature_dim=64)
    assert WEIGHTS_URL in str(missing.value) and str(default_weights_path()) in str(missing.value)
    with pytest.raises(InceptionUnavailable, match="nope.pth"):
        load_inception(tmp_path / "nope.pth", feature_dim=64)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionUnavailable, match="garbage.pth: not a readable state dict"):
        load_inception(garbage, feature_dim=64)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(InceptionUnavailable, match="wrong.pth: does not hold the FID Inception weights"):
        load_inception(wrong, feature_dim=64)

    calls = []

    def fake_download(url, destination, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        shutil.copyfile(weights_file, destination)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    loaded = load_inception(download=True, feature_dim=64)
    assert calls == [(WEIGHTS_URL, WEIGHTS_HASH_PREFIX)] and default_weights_path().is_file()
    expected = torch.load(weights_file, weights_only=True)
    torch.testing.assert_close(loaded.network.Conv2d_1a_3x3.conv.weight, expected["Conv2d_1a_3x3.conv.weight"])
    load_inception(download=True, feature_dim=64)  # now cached: no second download
    assert len(calls) == 1


def test_a_safetensors_copy_of_the_weights_gives_the_same_network(weights_file, net64, tmp_path):
    from safetensors.torch import save_file

    copy = tmp_path / "inception.safetensors"
    save_file(torch.load(weights_file, weights_only=True), str(copy))
    u = (torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(load_inception(copy, feature_dim=64)(u)[0], net64(u)[0], rtol=0, atol=0)


class RunsCode:
    """Unpickled with the full unpickler, this creates ``marker`` (what a hostile weights file does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_a_weights_file_that_would_run_code_is_refused_unrun(weights_file, tmp_path):
    """Valid weights plus one pickled object whose unpickling runs a shell command: every loader
    (the FID network, LPIPS, the loader itself) refuses the file in one line, and the command never runs."""
    from vq3d_nerfstudio.stage1.perceptual import LPIPS, LPIPSUnavailable

    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.pth"
    torch.save({**torch.load(weights_file, weights_only=True), "extra": RunsCode(marker)}, hostile)
    with pytest.raises(InceptionUnavailable, match="hostile.pth: not a readable state dict.*nothing in it was run") as err:
        load_inception(hostile, feature_dim=64)
    assert "\n" not in str(err.value) and "system" in str(err.value)  # names what it refused
    with pytest.raises(LPIPSUnavailable, match="hostile.pth: not a readable state dict"):
        LPIPS("alex", hostile)
    with pytest.raises(WeightsUnavailable, match="hostile.pth"):
        load_weights(hostile, "a test needs weights")
    assert not marker.exists()


def test_the_loader_wants_a_dict_of_tensors(tmp_path):
    odd = tmp_path / "odd.pth"
    torch.save({"weight": torch.zeros(2), "step": 3}, odd)  # plain types pass weights_only, still no state dict
    with pytest.raises(WeightsUnavailable, match="odd.pth: not a state dict"):
        load_weights(odd, "a test needs weights")
    with pytest.raises(WeightsUnavailable, match=r"^a test needs weights at .*missing.pth; pass the file's path$"):
        load_weights(tmp_path / "missing.pth", "a test needs weights")


# --- Folders and FID ------------------------------------------------------------------------------


def test_folder_features_read_every_image_as_stored(net64, tmp_path):
    """Recursive, any supported suffix and size, other files ignored; the same as the network on the
    pixels read by PIL, one image at a time, whatever the batch size."""
    rng = np.random.default_rng(0)
    arrays = {
        "a.png": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        "sub/b.PNG": rng.integers(0, 256, (24, 40, 3), dtype=np.uint8),
        "sub/deeper/c.jpg": rng.integers(0, 256, (30, 30, 3), dtype=np.uint8),
        "sub/deeper/d.png": rng.integers(0, 256, (30, 30, 3), dtype=np.uint8),
    }
    for name, array in arrays.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    features, logits = compute_folder_features(tmp_path, net64, batch_size=3, progress=False)
    assert features.shape == (4, 64) and features.dtype == torch.float64 and logits is None
    with torch.no_grad():
        for row, name in zip(features, sorted(arrays)):
            with Image.open(tmp_path / name) as pil:
                pixels = torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1)
            expected, _ = net64(pixels[None])
            torch.testing.assert_close(row, expected[0].double(), rtol=1e-5, atol=1e-6)


def test_empty_folders_and_unreadable_images_are_one_clear_error(net64, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="empty: no images"):
        compute_folder_features(tmp_path / "empty", net64, progress=False)
    with pytest.raises(ImageFolderError, match="missing: not a folder"):
        compute_folder_features(tmp_path / "missing", net64, progress=False)
    save_pngs(blob_images(2), tmp_path / "bad")
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageFolderError, match=r"broken\.png: cannot read image"):
        compute_folder_features(tmp_path / "bad", net64, progress=False)


def test_fid_between_folders_matches_the_reference_is_zero_for_a_copy_and_grows_with_noise(net64, tmp_path):
    images = blob_images(24)
    real = save_pngs(images, tmp_path / "real")
    real_features, _ = compute_folder_features(real, net64, 7, progress=False)
    scale = float(torch.trace(torch.cov(real_features.T)))
    statistics = folder_statistics(real, net64, 7, progress=False)

    # the same images as a second folder, read in other batches: FID 0 up to round-off
    copy = save_pngs(images, tmp_path / "copy")
    same = fid_between_folders(None, copy, net64, batch_size=16, real_statistics=statistics, progress=False)
    assert same["num_fake"] == 24 and "inception_score" not in same  # 64-d features: no logits
    assert abs(same["fid"]) < 1e-6 * scale

    generator = torch.Generator().manual_seed(3)
    fids = [same["fid"]]
    for noise in (0.05, 0.3):
        noisy = (images + noise * torch.randn(images.shape, generator=generator)).clamp(0, 1)
        folder = save_pngs(noisy, tmp_path / f"noisy{noise}")
        fake_features, _ = compute_folder_features(folder, net64, progress=False)
        # one real set, several fake sets: the statistics are reused
        result = fid_between_folders(None, folder, net64, real_statistics=statistics, progress=False)
        assert result["fid"] == pytest.approx(sqrtm_fid(real_features.numpy(), fake_features.numpy()), rel=1e-6)
        fids.append(result["fid"])
    assert fids[0] + 1e-2 * scale < fids[1] < fids[2], (fids, scale)
    # the real folder read here, not passed as statistics: the same number
    result = fid_between_folders(real, folder, net64, batch_size=5, progress=False)
    assert result["num_real"] == result["num_fake"] == 24 and result["fid"] == pytest.approx(fids[2], rel=1e-9)


class MeanColour(torch.nn.Module):
    """A stand-in for the network (the 2048-d one takes seconds per score here): each image's mean
    colour in [0, 1] as 3-d features, and 20 times it as class logits."""

    feature_dim = 3
    device = torch.device("cpu")

    def forward(self, images):
        colour = images.double().mean(dim=(2, 3)) / 255  # (N, 3)
        return colour, 20 * colour


def test_fid_between_folders_scores_the_fake_sets_logits(tmp_path):
    real = save_pngs(blob_images(6, seed=1), tmp_path / "real")
    fake_images = blob_images(6, seed=2)
    fake = save_pngs(fake_images, tmp_path / "fake")
    result = fid_between_folders(real, fake, MeanColour(), num_splits=2, progress=False)
    colours = (fake_images * 255).round().double().mean(dim=(2, 3)) / 255  # the PNGs' uint8 pixels
    real_colours = (blob_images(6, seed=1) * 255).round().double().mean(dim=(2, 3)) / 255
    assert result["fid"] == pytest.approx(sqrtm_fid(real_colours.numpy(), colours.numpy()), rel=1e-6)
    mean, std = inception_score(20 * colours, num_splits=2)
    assert result["inception_score"] == pytest.approx(mean, rel=1e-9) and result["inception_score_std"] == std
    assert result["inception_score"] > 1  # the colours differ, so do the predictions
    # 10 splits lowered to the 6 images: each chunk one image, whose p(y) is its own p(y|x): KL 0, IS 1
    result = fid_between_folders(real, fake, MeanColour(), num_splits=10, progress=False)
    assert result["inception_score"] == pytest.approx(1.0, abs=1e-12) and result["inception_score_std"] == 0.0


# --- `vq3d fid` -----------------------------------------------------------------------------------


def test_vq3d_fid_without_weights_is_one_clear_error(tmp_path, cli_env):
    save_pngs(blob_images(3), tmp_path / "real")
    save_pngs(blob_images(3, seed=1), tmp_path / "fake")
    env = dict(cli_env, TORCH_HOME=str(tmp_path / "torch-home"))  # an empty hub cache
    output = tmp_path / "fid.json"
    result = subprocess.run(
        [cli("vq3d"), "fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
         "--output", str(output)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vq3d fid: error: "), result.stderr
    assert WEIGHTS_URL in lines[0] and str(tmp_path / "torch-home") in lines[0] and "--download" in lines[0]
    assert not output.exists()


def test_vq3d_fid_end_to_end_with_a_weights_file(weights_file, tmp_path, cli_env):
    """The same 10 images as real and as (nested) fake set: FID is 0 whatever the network. The 192-d
    pool keeps it cheap (the full network is checked above)."""
    images = blob_images(10, seed=4)
    save_pngs(images, tmp_path / "real")
    save_pngs(images, tmp_path / "fake" / "class_0", prefix="sample")
    output = tmp_path / "out" / "fid.json"
    result = subprocess.run(
        [cli("vq3d"), "fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
         "--inception-weights", str(weights_file), "--feature-dim", "192", "--batch-size", "4", "--device", "cpu",
         "--output", str(output)],
        env=cli_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scores = json.loads(output.read_text())
    assert scores["num_real"] == scores["num_fake"] == 10 and scores["feature_dim"] == 192
    assert abs(scores["fid"]) < 1e-3
    assert "inception_score" not in scores  # needs the 2048-d pool's logits
    assert scores["inception_weights"] == str(weights_file)
    assert "FID (192-d)" in result.stdout and "Wrote" in result.stdout

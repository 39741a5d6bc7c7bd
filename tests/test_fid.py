"""FID and Inception Score: closed forms, torch-fidelity as the reference, folders, and `vq3d fid`.

No Inception weights exist on this machine: every network here is randomly initialised, and the CLI
reads a state dict of such a network saved by the test.
"""

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import cli
from PIL import Image

from vq3d_nerfstudio.evaluation.fid import (
    WEIGHTS_HASH_PREFIX,
    WEIGHTS_URL,
    FIDInceptionV3,
    ImageFolderError,
    InceptionUnavailable,
    compute_folder_features,
    default_weights_path,
    feature_statistics,
    fid_between_folders,
    frechet_distance,
    inception_score,
    load_inception,
)


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


@pytest.fixture(scope="module")
def net64():
    """The network's first convolutions only (pytorch-fid's 64-d pool): fast, same input pipeline."""
    torch.manual_seed(0)
    return FIDInceptionV3(feature_dim=64)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """A full, randomly initialised FID network's state dict, saved as the weights file would be."""
    torch.manual_seed(1)
    network = FIDInceptionV3()
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(network.state_dict(), path)
    return path, network


# --- Fréchet distance -----------------------------------------------------------------------------


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # 1-D: (mu1 - mu2)^2 + s1 + s2 - 2 sqrt(s1 s2) = (1 - 3)^2 + 4 + 1 - 2 * 2 = 5
    fid = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]]))
    assert fid == pytest.approx(5.0)
    # Diagonal: |d mu|^2 + sum (sqrt(s1) - sqrt(s2))^2 = (1 + 0 + 4) + ((1 - 2)^2 + (2 - 2)^2 + (3 - 1)^2) = 10
    mu1, mu2 = np.array([1.0, 0.0, -2.0]), np.zeros(3)
    fid = frechet_distance(mu1, np.diag([1.0, 4.0, 9.0]), mu2, np.diag([4.0, 4.0, 1.0]))
    assert fid == pytest.approx(10.0)


@pytest.mark.parametrize("num_samples", [200, 10], ids=["full-rank", "singular"])
def test_frechet_distance_matches_torch_fidelity_eigenvalue_formula(num_samples):
    """Reference: torch-fidelity computes tr sqrt(s1 s2) from the eigenvalues of s1 s2, not sqrtm.
    With 10 samples in 16-d both covariances are singular (the eps-offset path may be taken)."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    a = rng.normal(size=(num_samples, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(num_samples, 16)) @ rng.normal(size=(16, 16)) + 0.5
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    reference = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    expected = reference["frechet_inception_distance"]
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-5 * np.trace(s1 + s2))
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-6, abs=1e-5 * np.trace(s1 + s2))


def test_feature_statistics_are_mean_and_unbiased_covariance():
    features = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mu, sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, [2.0, 2.0])
    # var x = (4 + 0 + 4) / 2 = 4, var y = (1 + 1 + 4) / 2 = 3, cov = (-2 * -1 + 0 + 2 * 2) / 2 = 3
    np.testing.assert_allclose(sigma, [[4.0, 3.0], [3.0, 3.0]])


# --- Inception Score ------------------------------------------------------------------------------


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.zeros((40, 1008)), num_splits=4)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_evenly_spread_predictions_is_the_number_of_classes():
    labels = np.arange(40) % 10  # every split of 10 consecutive samples holds each class once
    logits = 50.0 * np.eye(10)[labels]
    mean, std = inception_score(logits, num_splits=4)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.default_rng(0).normal(scale=3.0, size=(40, 1008))
    reference = isc_features_to_metric(torch.from_numpy(logits), splits=5, shuffle=False)
    mean, std = inception_score(logits, num_splits=5)
    assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(reference["inception_score_std"], rel=1e-6)


# --- The network ----------------------------------------------------------------------------------


def test_network_matches_torch_fidelity_inception_with_the_same_weights(random_weights, monkeypatch):
    """Reference: torch-fidelity's port of the same TF graph, handed the same state dict (its loader
    is patched; it would download otherwise). It takes uint8 u and maps (u - 128) / 128; ours maps
    2x - 1, so x = u / 256 gives both the same input. 299 px: no resize on either side."""
    import torch_fidelity.feature_extractor_inceptionv3 as reference_module

    path, _ = random_weights
    state = torch.load(path, weights_only=True)
    monkeypatch.setattr(reference_module, "load_state_dict_from_url", lambda *args, **kwargs: state)
    layers = ["64", "192", "768", "2048", "logits_unbiased"]
    reference = reference_module.FeatureExtractorInceptionV3("inception-v3-compat", layers)
    torch.manual_seed(2)
    u = (torch.rand(2, 3, 299, 299) * 255).to(torch.uint8)
    with torch.no_grad():
        expected = dict(zip(layers, reference(u)))
        for dim in (64, 192, 768):
            network = FIDInceptionV3(dim)
            network.load_state_dict(state)
            features, logits = network(u.float() / 256)
            assert logits is None
            torch.testing.assert_close(features, expected[str(dim)], rtol=1e-4, atol=1e-5)
        features, logits = load_inception(path)(u.float() / 256)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    torch.testing.assert_close(features, expected["2048"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, expected["logits_unbiased"], rtol=1e-4, atol=1e-5)  # no fc bias


def test_weights_come_from_the_path_then_the_hub_cache_then_a_download(random_weights, tmp_path, monkeypatch):
    path, network = random_weights
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    assert default_weights_path() == tmp_path / "hub" / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[1]

    with pytest.raises(InceptionUnavailable, match="pt_inception-2015-12-05") as missing:
        load_inception()
    assert WEIGHTS_URL in str(missing.value) and str(default_weights_path()) in str(missing.value)
    with pytest.raises(InceptionUnavailable, match="nope.pth"):
        load_inception(tmp_path / "nope.pth")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionUnavailable, match="garbage.pth: not a readable state dict"):
        load_inception(garbage)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(InceptionUnavailable, match="wrong.pth: does not hold the FID Inception weights"):
        load_inception(wrong)

    calls = []

    def fake_download(url, destination, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        shutil.copyfile(path, destination)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    loaded = load_inception(download=True)
    assert calls == [(WEIGHTS_URL, WEIGHTS_HASH_PREFIX)] and default_weights_path().is_file()
    torch.testing.assert_close(loaded.fc.weight, network.fc.weight)
    load_inception(download=True)  # now cached: no second download
    assert len(calls) == 1


# --- Folders and FID ------------------------------------------------------------------------------


def test_folder_features_read_every_image_as_stored(net64, tmp_path):
    """Recursive, any supported suffix and size, other files ignored; same as the network on the
    pixels read by PIL, one image at a time, whatever the batch size."""
    rng = np.random.default_rng(0)
    arrays = {
        "a.png": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        "sub/b.PNG": rng.integers(0, 256, (24, 40, 3), dtype=np.uint8),
        "sub/deeper/c.jpg": rng.integers(0, 256, (30, 30, 3), dtype=np.uint8),
    }
    for name, array in arrays.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    features, logits = compute_folder_features(tmp_path, net64, batch_size=2, progress=False)
    assert features.shape == (3, 64) and logits is None
    with torch.no_grad():
        for row, name in zip(features, sorted(arrays)):
            with Image.open(tmp_path / name) as pil:
                pixels = torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255)
            expected, _ = net64(pixels.permute(2, 0, 1)[None])
            np.testing.assert_allclose(row, expected[0].double().numpy(), rtol=1e-5, atol=1e-6)


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


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(net64, tmp_path):
    images = blob_images(24)
    real_features, _ = compute_folder_features(save_pngs(images, tmp_path / "real"), net64, 7, progress=False)
    mu, sigma = feature_statistics(real_features)
    scale = np.trace(sigma)

    # the same images as a second folder, read in other batches: FID 0 up to round-off
    copy = save_pngs(images, tmp_path / "copy")
    same = fid_between_folders(None, copy, net64, batch_size=16, real_statistics=(mu, sigma), progress=False)
    assert same["num_fake"] == 24 and "inception_score" not in same  # 64-d features: no logits
    assert abs(same["fid"]) < 1e-3 * scale

    generator = torch.Generator().manual_seed(3)
    fids = [same["fid"]]
    for noise in (0.05, 0.3):
        noisy = (images + noise * torch.randn(images.shape, generator=generator)).clamp(0, 1)
        with torch.no_grad():
            features, _ = net64(noisy)
        fids.append(frechet_distance(mu, sigma, *feature_statistics(features.double().numpy())))
    assert fids[0] + 1e-2 * scale < fids[1] < fids[2], (fids, scale)


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


def test_vq3d_fid_end_to_end_with_a_weights_file(random_weights, tmp_path, cli_env):
    """The same 10 images as real and as (nested) fake set: FID is 0 whatever the network. The 192-d
    pool keeps it cheap (sqrtm at 2048-d takes 15-40 s on this CPU; all pools are checked above)."""
    path, _ = random_weights
    images = blob_images(10, seed=4)
    save_pngs(images, tmp_path / "real")
    save_pngs(images, tmp_path / "fake" / "class_0", prefix="sample")
    output = tmp_path / "out" / "fid.json"
    result = subprocess.run(
        [cli("vq3d"), "fid", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
         "--inception-weights", str(path), "--feature-dim", "192", "--batch-size", "4", "--device", "cpu",
         "--output", str(output)],
        env=cli_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scores = json.loads(output.read_text())
    assert scores["num_real"] == scores["num_fake"] == 10 and scores["feature_dim"] == 192
    assert abs(scores["fid"]) < 1e-3
    assert "inception_score" not in scores  # needs the 2048-d pool's logits
    assert "FID (192-d)" in result.stdout and "Wrote" in result.stdout

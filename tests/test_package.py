"""Model packages (issue 24): config.json + model.safetensors, loaded without the run, its data or
pickle; names resolved; every broken package one line."""

import json
import pickle
import shutil
import subprocess

import numpy as np
import pytest
import torch
from helpers import FAST, cli, run, tiny_model, write_image

from vq3d_nerfstudio import model_index
from vq3d_nerfstudio.errors import PackageError
from vq3d_nerfstudio.geometry.poses import CanonicalCamera
from vq3d_nerfstudio.stage1 import package as pkg
from vq3d_nerfstudio.stage1.adversarial import AdversarialConfig
from vq3d_nerfstudio.stage1.quantizer import FSQConfig, NoQuantizerConfig, VQConfig


@pytest.mark.parametrize(
    "quantizer", [VQConfig(size=32, code_dim=8), FSQConfig(levels=(8, 5, 5), groups=2), NoQuantizerConfig()], ids=["vq", "fsq", "none"]
)
def test_a_model_config_goes_through_json_unchanged(quantizer):
    model = tiny_model(quantizer=quantizer, triplane_margin_source="replicate")
    text = json.dumps(pkg.config_to_json(model.config))
    back = pkg.config_from_json(json.loads(text), pkg.Path("config.json"), model.config.canonical_camera)
    for name in pkg.config_to_json(model.config):
        assert getattr(back, name) == getattr(model.config, name), name
    assert type(back.quantizer) is type(quantizer) and back.quantizer.codebook_size == quantizer.codebook_size


def write_tiny_package(folder, dtype=torch.float32, **overrides):
    model = tiny_model(
        metadata={"canonical_camera": CanonicalCamera(2.5, 40.0), "depth_kind": "disparity", "class_names": ["a", "b"]},
        canonical_camera=CanonicalCamera(2.5, 40.0), **overrides,
    )
    pkg.write_package_files(folder, model, {"source_run": "test", "step": 1, "revision": "test"}, {"description": "a test model"}, dtype)
    return model


def test_a_package_rebuilds_the_same_model_without_pickle(tmp_path, monkeypatch):
    model = write_tiny_package(tmp_path / "p").eval()
    # nothing on the loading path may unpickle
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    loaded, info = pkg.load_package(tmp_path / "p")
    assert info["data"] == {"camera_distance": 2.5, "fov_deg": 40.0, "depth_kind": "disparity", "class_names": ["a", "b"]}
    # the non-default canonical camera comes back, down to the tri-plane's frustum
    assert loaded.config.canonical_camera == CanonicalCamera(2.5, 40.0) == loaded.layout.camera
    assert loaded.camera_distance == 2.5 and loaded.fov_deg == 40.0 and loaded.adversarial.discriminator is None
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    image = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.encode_to_indices(image), model.encode_to_indices(image))


def test_half_weights_load_as_float32_within_half_precision(tmp_path):
    model = write_tiny_package(tmp_path / "p", torch.float16)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["dtype"] == "float16"
    loaded, _ = pkg.load_package(tmp_path / "p")
    for key, value in model.state_dict().items():
        got = loaded.state_dict()[key]
        if value.is_floating_point():
            assert got.dtype == torch.float32
            assert torch.allclose(got, value, rtol=1e-3, atol=1e-4), key  # float16: 11 significant bits


def test_the_discriminator_is_left_out(tmp_path):
    model = write_tiny_package(tmp_path / "p", adversarial=AdversarialConfig(loss_mult=0.1, resolution=8))
    assert any(k.startswith("adversarial.discriminator.") for k in model.state_dict())
    from safetensors.torch import load_file

    assert not any("discriminator" in k for k in load_file(str(tmp_path / "p" / "model.safetensors")))
    loaded, info = pkg.load_package(tmp_path / "p")
    assert loaded.adversarial.discriminator is None and info["model"]["adversarial"]["loss_mult"] == 0.1
    assert loaded.config.adversarial == AdversarialConfig(loss_mult=0.0, resolution=8)  # the rest as written


class Boom:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def break_weights_truncated(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def break_weights_pickle(folder):
    with open(folder / "model.safetensors", "wb") as f:
        pickle.dump({"x": Boom(folder.parent / "pwned")}, f)


def edit_config(change):
    def broken(folder):
        info = json.loads((folder / "config.json").read_text())
        change(info)
        (folder / "config.json").write_text(json.dumps(info))

    return broken


BROKEN = {
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors: missing"),
    "truncated weights": (break_weights_truncated, "model.safetensors: not a complete safetensors file"),
    "a pickle named .safetensors": (break_weights_pickle, "model.safetensors: not a complete safetensors file"),
    "no config": (lambda f: (f / "config.json").unlink(), "config.json: missing"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{oops"), "config.json: not readable JSON"),
    "another version": (edit_config(lambda i: i.update(version=99)), "package version 99, this install reads version 1"),
    "unknown field": (edit_config(lambda i: i["model"].update(warp_drive=True)), "unknown fields ['warp_drive']"),
    "missing field": (edit_config(lambda i: i["model"].pop("hidden_dim")), "missing fields ['hidden_dim']"),
    "missing data": (edit_config(lambda i: i["data"].pop("fov_deg")), "'data' lacks fov_deg"),
    "unknown quantizer": (edit_config(lambda i: i["model"]["quantizer"].update(type="magic")), "needs a 'type' of"),
    "shapes that do not fit": (edit_config(lambda i: i["model"].update(triplane_channels=8)), "tensors do not fit config.json"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_package_is_one_error_naming_the_file(tmp_path, case):
    folder = tmp_path / "p"
    write_tiny_package(folder)
    breaker, message = BROKEN[case]
    breaker(folder)
    with pytest.raises(PackageError) as err:
        pkg.load_package(folder)
    text = str(err.value)
    assert message in text and str(folder) in text and "\n" not in text
    assert not (tmp_path / "pwned").exists()  # the pickle never ran


def test_names_resolve_path_then_shipped_then_user_folder_then_hub(tmp_path, monkeypatch):
    shipped, home = tmp_path / "shipped", tmp_path / "home"
    write_tiny_package(shipped / "alpha")
    write_tiny_package(home / "models" / "beta")
    write_tiny_package(home / "models" / "alpha")  # a shipped name wins over the user folder's
    monkeypatch.setattr(model_index, "SHIPPED_DIR", shipped)
    monkeypatch.setenv("VQ3D_HOME", str(home))
    assert model_index.resolve_model("alpha") == shipped / "alpha"
    assert model_index.resolve_model("beta") == home / "models" / "beta"
    assert model_index.resolve_model(str(home / "models" / "alpha")) == home / "models" / "alpha"  # an existing path first
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alpha").mkdir()
    with pytest.raises(PackageError, match="neither a model package"):
        model_index.resolve_model("alpha")  # an existing folder that is no package is not silently skipped
    with pytest.raises(PackageError) as err:
        model_index.resolve_model("gamma")
    assert "shipped models: alpha" in str(err.value)

    # hub ids go through huggingface_hub.snapshot_download (here a fake one that returns a local folder)
    import sys
    import types

    calls = []
    fake = types.ModuleType("huggingface_hub")
    fake.snapshot_download = lambda repo_id, **kw: calls.append(repo_id) or str(home / "models" / "beta")
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    assert model_index.resolve_model("someone/beta") == home / "models" / "beta" and calls == ["someone/beta"]

    def offline(repo_id, **kw):
        raise OSError("no network")

    fake.snapshot_download = offline
    with pytest.raises(PackageError, match="could not download from the hub"):
        model_index.resolve_model("someone/beta")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(PackageError, match="pip install huggingface_hub"):
        model_index.resolve_model("someone/beta")


def test_models_lists_the_shipped_ones(cli_env):
    result = run([cli("vq3d"), "models"], cli_env)
    assert "vq3d-tiny-synth:" in result.stdout and "held out: canonical" in result.stdout


def test_the_shipped_model_reconstructs_unseen_scenes(tmp_path, cli_env):
    """`vq3d-tiny-synth` on 4 scenes of a seed it never saw: the canonical renders are close to the
    inputs (its published held-out canonical PSNR is ~21.6 dB; 'nothing at all', a grey image, scores
    ~10 dB on these scenes), and its package loads with no run anywhere."""
    from vq3d_nerfstudio.data.synth import write_scenes
    from vq3d_nerfstudio.evaluation.metrics import psnr

    write_scenes(tmp_path / "scenes", num_scenes=4, resolution=64, num_views=1, seed=7, num_workers=1, progress=False)
    photos = sorted((tmp_path / "scenes").glob("*/images/frame_00000.png"))
    out = tmp_path / "out"
    run([cli("vq3d"), "reconstruct", "--model", "vq3d-tiny-synth", "--image", *map(str, photos), "--output-dir", str(out),
         "--num-frames", "2", "--num-points", "0"], cli_env)
    import imageio.v2 as imageio

    scores = []
    for photo in photos:
        name = "_".join(photo.with_suffix("").parts[-3:])
        render = torch.from_numpy(imageio.imread(out / f"{name}_canonical.png")).float() / 255
        scores.append(psnr(render, torch.from_numpy(imageio.imread(photo)).float() / 255))
    assert np.mean(scores) > 18.0, scores


def test_a_package_runs_every_command_after_its_run_and_data_are_gone(synth_dir, tmp_path, cli_env):
    """ns-train -> vq3d package (with a stage-2 part) -> move the package, delete the run and its
    data -> reconstruct, eval, export-splats and sample from the package give the outputs the run gave."""
    import imageio.v2 as imageio

    from vq3d_nerfstudio.scripts.common import load_run
    from vq3d_nerfstudio.stage2 import checkpoint as ckpt
    from vq3d_nerfstudio.stage2.transformer import TokenTransformer, TokenTransformerConfig

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    runs = tmp_path / "runs"
    run([cli("ns-train"), "vq3d-tiny", "--data", str(data), "--output-dir", str(runs), "--experiment-name", "p",
         "--max-num-iterations", "3", *FAST], cli_env)
    config = next(runs.glob("p/vq3d-tiny/*/config.yml"))

    # a stage-2 model fitting the run's codes (untrained: sampling is the plumbing under test)
    stage1 = load_run(config, "test").model
    net_config = TokenTransformerConfig(vocab_size=stage1.config.quantizer.codebook_size, num_classes=3,
                                        block_size=int(np.prod(stage1.index_shape)), num_layers=1, num_heads=2, embed_dim=32)
    torch.manual_seed(0)
    net = TokenTransformer(net_config)
    stage2 = tmp_path / "stage2"
    ckpt.save_checkpoint(stage2, 1, net, torch.optim.AdamW(net.parameters()), {},
                         {"model": net_config.to_dict(), "class_names": ["box", "cylinder", "sphere"],
                          "grid": list(stage1.index_shape), "stage1_config": str(config)})

    package = tmp_path / "made" / "mine"
    result = run([cli("vq3d"), "package", "--load-config", str(config), "--output", str(package),
                  "--stage2-checkpoint", str(stage2), "--description", "test"], cli_env)
    assert "Wrote the model package" in result.stdout
    again = subprocess.run([cli("vq3d"), "package", "--load-config", str(config), "--output", str(package)],
                           env=cli_env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "pass --overwrite" in again.stderr and "Traceback" not in again.stderr

    photo = shutil.copy(sorted(data.glob("*/images/frame_00000.png"))[0], tmp_path / "photo.png")
    scenes = tmp_path / "scenes"
    for scene in sorted(data.iterdir())[:2]:
        shutil.copytree(scene, scenes / scene.name)

    def outputs(tag, *source):
        out = tmp_path / tag
        run([cli("vq3d"), "reconstruct", *source, "--image", str(photo), "--output-dir", str(out / "rec"),
             "--num-frames", "2", "--num-points", "0"], cli_env)
        run([cli("vq3d"), "eval", *source, "--scenes", str(scenes), "--output", str(out / "eval.json")], cli_env)
        run([cli("vq3d"), "export-splats", *source, "--image", str(photo), "--output", str(out / "splats.ply"),
             "--num-gaussians", "500", "--report-views", "0"], cli_env)
        return out

    from_run = outputs("run", "--load-config", str(config))
    run([cli("vq3d"), "sample", "--stage2-checkpoint", str(stage2), "--stage1-config", str(config), "--num-samples", "2",
         "--num-frames", "2", "--output-dir", str(from_run / "samples")], cli_env)

    moved = tmp_path / "elsewhere" / "mine"
    shutil.move(str(package), moved)
    shutil.rmtree(runs)
    shutil.rmtree(data)
    shutil.rmtree(stage2)
    from_package = outputs("package", "--model", str(moved))
    run([cli("vq3d"), "sample", "--model", str(moved), "--num-samples", "2", "--num-frames", "2",
         "--output-dir", str(from_package / "samples")], cli_env)

    for rel in ["rec/photo_canonical.png", "rec/photo_views.png", "samples/samples.png"]:
        a, b = imageio.imread(from_run / rel).astype(int), imageio.imread(from_package / rel).astype(int)
        assert np.abs(a - b).max() <= 1, rel
    for i in range(2):
        assert np.array_equal(np.load(from_run / f"samples/box_{i:03d}_codes.npy"), np.load(from_package / f"samples/box_{i:03d}_codes.npy"))
    ours, theirs = (json.loads((o / "eval.json").read_text())["summary_by_offset_deg"] for o in (from_run, from_package))
    assert ours.keys() == theirs.keys()
    for offset in ours:
        for key, value in ours[offset].items():
            assert theirs[offset][key] == pytest.approx(value, rel=1e-4, abs=1e-4), (offset, key)
    assert (from_run / "splats.ply").read_bytes() == (from_package / "splats.ply").read_bytes()

    # a package has no dataset: a split image is one line
    bad = subprocess.run([cli("vq3d"), "render-orbit", "--model", str(moved), "--output-dir", str(tmp_path / "x")],
                         env=cli_env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "a model package holds no dataset images; pass --image" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("args, message", [
    ([], "pass one of --model NAME_OR_PATH"),
    (["--model", "no-such-model"], "no-such-model: no such file, shipped model"),
])
def test_a_missing_or_unknown_model_is_one_line(tmp_path, cli_env, args, message):
    photo = write_image(tmp_path / "x.png")
    result = subprocess.run([cli("vq3d"), "reconstruct", *args, "--image", str(photo)], env=cli_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_a_broken_package_through_the_cli_is_one_line(tmp_path, cli_env):
    folder = tmp_path / "p"
    write_tiny_package(folder)
    break_weights_pickle(folder)
    photo = write_image(tmp_path / "x.png")
    result = subprocess.run([cli("vq3d"), "reconstruct", "--model", str(folder), "--image", str(photo)],
                            env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"vq3d reconstruct: error: {folder / 'model.safetensors'}")
    assert not (tmp_path / "pwned").exists()


def test_stage2_trains_on_a_package_and_samples_through_it(synth_dir, tmp_path, cli_env):
    """vq3d-train-stage2 with the shipped model as its stage-1 input (and --data, which a package
    lacks): the token cache goes under the output folder, the checkpoint records the package, and
    vq3d sample decodes through it with no run anywhere."""
    import imageio.v2 as imageio

    out = tmp_path / "stage2"
    args = [cli("vq3d-train-stage2"), "--stage1-config", "vq3d-tiny-synth", "--output-dir", str(out), "--model", "nano",
            "--batch-size", "4", "--max-steps", "2", "--eval-every", "2", "--num-workers", "0", "--device", "cpu"]
    missing = subprocess.run(args, env=cli_env, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "holds no dataset; pass --data IMAGES" in missing.stderr and "Traceback" not in missing.stderr
    run([*args, "--data", str(synth_dir)], cli_env)
    assert len(list(out.glob("token_cache-*/meta.json"))) == 1
    info = json.loads(next(out.glob("checkpoints/step-*/config.json")).read_text())
    assert info["stage1_config"] == str(model_index.SHIPPED_DIR / "vq3d-tiny-synth")
    run([cli("vq3d"), "sample", "--stage2-checkpoint", str(out), "--num-samples", "1", "--num-frames", "2",
         "--output-dir", str(tmp_path / "samples")], cli_env)
    assert imageio.imread(tmp_path / "samples" / "samples.png").shape == (64, 64, 3)


def test_the_wheel_carries_the_shipped_models(tmp_path):
    """`pip install .` gets the shipped packages: they are package data of the wheel."""
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(repo), "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=600, cwd=tmp_path)
    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    for shipped in model_index.shipped_models():
        for path in shipped.rglob("*"):
            if path.is_file():
                assert f"vq3d_nerfstudio/models/{path.relative_to(shipped.parent).as_posix()}" in names, path

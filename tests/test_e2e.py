"""End to end through nerfstudio: train, save, reload with eval_setup, and the real CLI commands."""

import json
import subprocess
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from helpers import FAST, cli, run

from vq3d_nerfstudio.geometry.cameras import orbit_cameras
from vq3d_nerfstudio.ns.method_configs import build_trainer_config

REPO = Path(__file__).resolve().parents[1]


def test_reloaded_checkpoint_renders_the_same_image(synth_dir, tmp_path):
    from nerfstudio.utils.eval_utils import eval_setup

    config = build_trainer_config("vq3d-tiny")
    config.output_dir, config.experiment_name, config.vis = tmp_path, "reload", "tensorboard"
    config.max_num_iterations, config.steps_per_save = 4, 100
    config.steps_per_eval_batch = config.steps_per_eval_image = 2
    for group in config.optimizers.values():  # reach the decay branch: its state must load with weights_only
        if group["scheduler"] is not None:
            group["scheduler"].warm_up_end = 1
    dm = config.pipeline.datamanager
    dm.data, dm.images_per_batch, dm.rays_per_image, dm.num_workers = synth_dir, 2, 32, 0
    config.set_timestamp()
    config.save_config()
    torch.manual_seed(0)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()  # saves a checkpoint after the last step

    camera = orbit_cameras([(15.0, 5.0)], 64, 2.0, 50.0)
    model = trainer.pipeline.model.eval()
    model.show_image("eval", 0)
    before = model.get_outputs_for_camera(camera)

    _, pipeline, checkpoint, step = eval_setup(config.get_base_dir() / "config.yml", test_mode="inference")
    assert checkpoint.exists() and step == 3
    pipeline.model.show_image("eval", 0)
    after = pipeline.model.get_outputs_for_camera(camera)
    for key in ("rgb", "depth", "disparity", "accumulation"):
        assert torch.allclose(before[key], after[key], atol=1e-6), key

    # the reloaded weights matter: an untrained model renders something else
    fresh = build_trainer_config("vq3d-tiny")
    fresh.pipeline.datamanager.data = synth_dir
    torch.manual_seed(123)
    untrained = fresh.pipeline.setup(device="cpu", test_mode="inference").model.eval()
    untrained.show_image("eval", 0)
    assert not torch.allclose(untrained.get_outputs_for_camera(camera)["rgb"], after["rgb"], atol=1e-3)


@pytest.mark.parametrize("path_name", ["orbit.json", "dolly_in.json"])
def test_ns_render_camera_path_with_the_shipped_paths(trained_run, tmp_path, path_name):
    config, env = trained_run
    path_file = REPO / "configs" / "camera_paths" / path_name
    video = tmp_path / "orbit.mp4"
    run([cli("ns-render"), "camera-path", "--load-config", str(config),
         "--camera-path-filename", str(path_file), "--output-path", str(video)], env)
    frames = iio.imread(video, plugin="pyav")
    assert frames.shape == (len(json.loads(path_file.read_text())["camera_path"]), 64, 64, 3)
    # frame 0 is the canonical camera; ns-render shows the default scene (eval image 0)
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(config, test_mode="inference")
    expected = pipeline.model.get_outputs_for_camera(orbit_cameras([(0.0, 0.0)], 64, 2.0, 50.0))["rgb"]
    expected = (expected.clamp(0, 1) * 255).numpy()
    assert abs(frames[0].astype(float) - expected).mean() < 4.0  # video codec tolerance


def test_vq3d_render_orbit_writes_videos(trained_run, tmp_path):
    config, env = trained_run
    run([cli("vq3d"), "render-orbit", "--load-config", str(config), "--output-dir", str(tmp_path),
         "--num-frames", "8"], env)
    for name in ("orbit", "disparity"):
        assert iio.imread(tmp_path / f"eval_00000_{name}.mp4", plugin="pyav").shape == (8, 64, 64, 3)
    assert iio.imread(tmp_path / "eval_00000_canonical.png").shape == (64, 64, 3)


def test_ns_eval_reports_psnr(trained_run, tmp_path):
    config, env = trained_run
    out = tmp_path / "metrics.json"
    run([cli("ns-eval"), "--load-config", str(config), "--output-path", str(out)], env)
    results = json.loads(out.read_text())["results"]
    assert 0 < results["psnr"] < 60 and 0 <= results["ssim"] <= 1


def test_render_orbit_bad_index_is_one_line(trained_run, tmp_path):
    config, env = trained_run
    result = subprocess.run([cli("vq3d"), "render-orbit", "--load-config", str(config), "--image-index", "999",
                             "--output-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "no eval image 999" in result.stderr


def test_vq3d_console_script_runs_synth(tmp_path, cli_env):
    result = run([cli("vq3d"), "--help"], cli_env)
    assert "synth" in result.stdout and "render-orbit" in result.stdout
    run([cli("vq3d"), "synth", str(tmp_path / "s"), "--num-scenes", "2", "--resolution", "16", "--num-views", "2"],
        cli_env)
    scenes = sorted((tmp_path / "s").glob("scene_*/transforms.json"))
    assert len(scenes) == 2
    assert len(json.loads(scenes[0].read_text())["frames"]) == 2


def test_vq3d_eval_on_synth_scenes(trained_run, synth_dir, tmp_path):
    config, env = trained_run
    out = tmp_path / "eval.json"
    # torch hub cache with no AlexNet: LPIPS is skipped with a note naming where the weights go
    env = dict(env, TORCH_HOME=str(tmp_path / "empty_torch_home"))
    renders = tmp_path / "renders"
    result = run([cli("vq3d"), "eval", "--load-config", str(config), "--scenes", str(synth_dir), "--output", str(out),
                  "--load-step", "5", "--save-renders", str(renders)], env)
    assert "Wrote" in result.stdout
    assert "LPIPS skipped" in result.stdout and "alexnet-owt-7be5be79.pth" in result.stdout
    report = json.loads(out.read_text())
    assert len(report["scenes"]) == 24
    summary = report["summary_by_offset_deg"]
    assert set(summary) == {"0", "10", "20"}  # synth frames: input, yaw -20, yaw -10
    assert summary["0"]["count"] == 24 and "still_psnr" in summary["20"]
    assert 0 < summary["20"]["psnr"] < 60 and summary["0"]["abs_rel"] >= 0
    assert summary["0"]["depth_spread"] > 0 and "lpips" not in summary["0"]
    # what one image allows (synth scenes have depth), and the objects apart (synth writes their masks)
    assert summary["20"]["ceiling_psnr"] > summary["20"]["still_psnr"] and "gap_gained" in summary["20"]
    assert 0 < summary["20"]["covisible_fraction"] < 1 and "covisible_psnr" in summary["20"]
    assert "fg_psnr" in summary["0"] and 0 <= summary["0"]["fg_delta1"] <= 1
    # every scored frame's render, named after its scene folder and image
    scene = sorted(synth_dir.glob("scene_*"))[3]
    frames = sorted((scene / "images").glob("*.png"))
    assert sorted(p.name for p in (renders / scene.name).iterdir()) == sorted(
        [f.name for f in frames] + [f"{f.stem}_depth.npy" for f in frames])
    size = iio.imread(frames[0]).shape
    assert iio.imread(renders / scene.name / frames[0].name).shape == size
    depth = np.load(renders / scene.name / f"{frames[0].stem}_depth.npy")
    assert depth.shape == size[:2] and depth.dtype == np.float32 and (depth > 0).all()


def test_vq3d_eval_lpips_with_cached_weights_and_bad_step(trained_run, tmp_path):
    import torchvision

    config, env = trained_run
    torch_home = tmp_path / "torch_home"
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(),
               torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    env = dict(env, TORCH_HOME=str(torch_home))
    scenes = tmp_path / "scenes"
    from vq3d_nerfstudio.data.synth import write_scenes

    write_scenes(scenes, num_scenes=1, resolution=32, num_views=3, seed=3, num_workers=1, progress=False)
    out = tmp_path / "eval.json"
    result = run([cli("vq3d"), "eval", "--load-config", str(config), "--scenes", str(scenes), "--output", str(out)], env)
    assert "LPIPS skipped" not in result.stdout
    summary = json.loads(out.read_text())["summary_by_offset_deg"]
    assert summary["0"]["lpips"] >= 0 and summary["20"]["still_lpips"] > 0
    bad = subprocess.run([cli("vq3d"), "eval", "--load-config", str(config), "--scenes", str(scenes), "--load-step", "4"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "step-000000004.ckpt does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_render_orbit_of_a_real_photo(trained_run, tmp_path):
    from skimage import data as skdata

    config, env = trained_run
    photo = tmp_path / "astronaut.jpg"
    iio.imwrite(photo, skdata.astronaut())  # 512x512 real photo shipped with scikit-image
    run([cli("vq3d"), "render-orbit", "--load-config", str(config), "--image", str(photo),
         "--output-dir", str(tmp_path / "out"), "--num-frames", "4"], env)
    assert iio.imread(tmp_path / "out" / "astronaut_orbit.mp4", plugin="pyav").shape == (4, 64, 64, 3)
    assert iio.imread(tmp_path / "out" / "astronaut_input.png").shape == (64, 64, 3)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    result = subprocess.run([cli("vq3d"), "render-orbit", "--load-config", str(config), "--image", str(bad),
                             "--output-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "notes.jpg: cannot read image" in result.stderr


def read_ply_points(path):
    import open3d as o3d

    cloud = o3d.io.read_point_cloud(str(path))
    return np.asarray(cloud.points), np.asarray(cloud.normals), np.asarray(cloud.colors)


def test_ns_export_pointcloud_of_the_shown_scene(trained_run, tmp_path):
    config, env = trained_run
    out = tmp_path / "export"
    run([cli("ns-export"), "pointcloud", "--load-config", str(config), "--output-dir", str(out),
         "--num-points", "3000", "--remove-outliers", "False", "--num-rays-per-batch", "4096"], env)
    points, normals, colors = read_ply_points(out / "point_cloud.ply")
    assert len(points) > 1000 and np.isfinite(points).all()
    # every point lies in front of the canonical camera at (0, 0, 2) looking down -z
    assert (points[:, 2] < 2.0).all()
    assert len(normals) == len(points) and np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-3)
    assert colors.min() >= 0 and colors.max() <= 1


def test_vq3d_scene_env_picks_a_photo_or_fails_in_one_line(trained_run, tmp_path):
    from PIL import Image
    from skimage import data as skdata

    config, env = trained_run
    photo = tmp_path / "coffee.png"
    Image.fromarray(skdata.coffee()).save(photo)
    out = tmp_path / "export"
    run([cli("ns-export"), "pointcloud", "--load-config", str(config), "--output-dir", str(out),
         "--num-points", "500", "--remove-outliers", "False", "--num-rays-per-batch", "2048"], dict(env, VQ3D_SCENE=str(photo)))
    assert len(read_ply_points(out / "point_cloud.ply")[0]) > 100
    bad = subprocess.run([cli("ns-export"), "pointcloud", "--load-config", str(config), "--output-dir", str(out)],
                         env=dict(env, VQ3D_SCENE=str(tmp_path / "missing.jpg")), capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "VQ3D_SCENE=" in bad.stderr and "missing.jpg" in bad.stderr and "Traceback" not in bad.stderr


def read_binary_ply(path):
    raw = path.read_bytes()
    header, body = raw.split(b"end_header\n", 1)
    count = int(header.split(b"element vertex ")[1].split(b"\n")[0])
    dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4"),
                      ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    assert len(body) == count * dtype.itemsize
    return np.frombuffer(body, dtype=dtype)


def test_vq3d_reconstruct_real_photos(trained_run, tmp_path):
    from PIL import Image
    from skimage import data as skdata

    config, env = trained_run
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skdata.astronaut()).save(photos / "astronaut.jpg")
    Image.fromarray(skdata.chelsea()).save(photos / "chelsea.png")
    out = tmp_path / "rec"
    result = run([cli("vq3d"), "reconstruct", "--load-config", str(config), "--image", str(photos),
                  "--output-dir", str(out), "--num-frames", "6", "--num-points", "2000",
                  "--contact-sheet", str(out / "sheet.png"), "--contact-sheet-scale", "1"], env)
    assert "Wrote 2 reconstruction(s)" in result.stdout
    assert iio.imread(out / "sheet.png").shape == (2 * 64, 5 * 64, 3)
    for name in ("astronaut", "chelsea"):
        assert iio.imread(out / f"{name}_orbit.mp4", plugin="pyav").shape == (6, 64, 64, 3)
        assert iio.imread(out / f"{name}_disparity.mp4", plugin="pyav").shape == (6, 64, 64, 3)
        assert iio.imread(out / f"{name}_canonical.png").shape == (64, 64, 3)
        assert iio.imread(out / f"{name}_views.png").shape == (64, 5 * 64, 3)
        cloud = read_binary_ply(out / f"{name}.ply")
        assert 0 < len(cloud) <= 2000
        xyz = np.stack([cloud["x"], cloud["y"], cloud["z"]], 1)
        assert np.isfinite(xyz).all() and (np.linalg.norm(xyz, axis=1) <= 4.0 + 1e-4).all()
        normals = np.stack([cloud["nx"], cloud["ny"], cloud["nz"]], 1)
        assert np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-3)
    # the canonical render matches rendering the same photo's NeRF in-process
    from nerfstudio.utils.eval_utils import eval_setup

    from vq3d_nerfstudio.data.dataset import load_image

    _, pipeline, _, _ = eval_setup(config, test_mode="inference")
    pipeline.model.set_scene_images(load_image(photos / "chelsea.png", 64))
    expected = pipeline.model.get_outputs_for_camera(orbit_cameras([(0.0, 0.0)], 64, 2.0, 50.0))["rgb"]
    got = iio.imread(out / "chelsea_canonical.png").astype(np.float32) / 255
    assert np.abs(got - expected.clamp(0, 1).numpy()).max() <= 1 / 255 + 1e-6


def test_vq3d_reconstruct_bad_inputs_are_one_line(trained_run, tmp_path):
    config, env = trained_run
    missing = subprocess.run([cli("vq3d"), "reconstruct", "--load-config", str(config), "--image", str(tmp_path / "nope.jpg")],
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "nope.jpg does not exist" in missing.stderr and "Traceback" not in missing.stderr
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    bad = subprocess.run([cli("vq3d"), "reconstruct", "--load-config", str(config), "--image", str(broken),
                          "--output-dir", str(tmp_path / "o"), "--num-frames", "2", "--num-points", "0"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "broken.jpg" in bad.stderr and "Traceback" not in bad.stderr


def test_vq3d_reconstruct_awkward_photos_and_paths(trained_run, tmp_path):
    from PIL import Image

    config, env = trained_run
    photos = tmp_path / "fötos mit leer"
    photos.mkdir()
    Image.new("RGBA", (30, 20), (200, 40, 40, 0)).save(photos / "ausschnitt ü.png")  # fully transparent
    Image.new("RGB", (1, 1), (0, 200, 0)).save(photos / "ein pixel.png")
    Image.fromarray(np.full((12, 12), 1000, np.uint16)).save(photos / "dunkel16.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(photos / "cmyk.jpg")
    (photos / "leer.jpg").write_bytes(b"")
    (photos / "kein bild.png").write_text("hello")
    out = tmp_path / "ausgabe ä"
    result = subprocess.run([cli("vq3d"), "reconstruct", "--load-config", str(config), "--image", str(photos),
                             "--output-dir", str(out), "--num-frames", "2", "--num-points", "0"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr  # non-zero: some photos were skipped
    assert "Wrote 4 reconstruction(s)" in result.stdout
    assert "leer.jpg: cannot read image (empty file, 0 bytes)" in result.stderr
    assert "kein bild.png: cannot read image (cannot identify" in result.stderr
    shown = iio.imread(out / "ausschnitt ü_views.png")[:, :64]  # the input as the model saw it: white
    assert shown.min() >= 254
    for name in ("ein pixel", "dunkel16", "cmyk"):
        assert (out / f"{name}_orbit.mp4").is_file()
    empty = tmp_path / "leerer ordner"
    empty.mkdir()
    none = subprocess.run([cli("vq3d"), "reconstruct", "--load-config", str(config), "--image", str(empty)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert none.returncode != 0 and "no images found in" in none.stderr and "Traceback" not in none.stderr


def test_vq3d_eval_skips_a_scene_with_bad_files_and_strict_stops(trained_run, synth_dir, tmp_path):
    import shutil

    config, env = trained_run
    scenes = tmp_path / "szenen ü"
    for i in range(3):
        shutil.copytree(synth_dir / f"scene_{i:05d}", scenes / f"scene {i}")
    meta = json.loads((scenes / "scene 1" / "transforms.json").read_text())
    frame = scenes / "scene 1" / meta["frames"][1]["file_path"]
    frame.write_bytes(frame.read_bytes()[:40])  # truncated ground truth
    (scenes / "scene 2" / meta["frames"][0]["depth_file_path"]).unlink()
    out = tmp_path / "eval.json"
    result = run([cli("vq3d"), "eval", "--load-config", str(config), "--scenes", str(scenes), "--output", str(out)], env)
    report = json.loads(out.read_text())
    assert len(report["scenes"]) == 1 and [Path(s["scene"]).parent.name for s in report["skipped"]] == ["scene 1", "scene 2"]
    assert frame.name in report["skipped"][0]["error"] and "cannot read image" in report["skipped"][0]["error"]
    assert "but missing" in report["skipped"][1]["error"]
    assert "skipped scene scene 1" in result.stderr and "skipped 2 scene(s)" in result.stderr
    strict = subprocess.run([cli("vq3d"), "eval", "--load-config", str(config), "--scenes", str(scenes), "--output",
                             str(out), "--strict"], env=env, capture_output=True, text=True, timeout=300)
    last = strict.stderr.strip().splitlines()[-1]
    assert strict.returncode != 0 and "Traceback" not in strict.stderr
    assert last.startswith("vq3d eval: error: ") and frame.name in last and last.endswith("(--strict)")


def test_ns_train_skips_a_corrupt_image_and_strict_stops_at_it(synth_dir, tmp_path, cli_env):
    """Two good synthetic images and two bad files, two images a step: every file is asked for in
    the first epoch. The run completes and names the files; with --strict it stops in one line."""
    data = tmp_path / "bilder mit ä"
    data.mkdir()
    for i in range(2):
        (data / f"gut {i}.png").write_bytes((synth_dir / f"scene_{i:05d}" / "images" / "frame_00000.png").read_bytes())
    (data / "kaputt.png").write_bytes((data / "gut 0.png").read_bytes()[:100])
    (data / "leer.jpg").write_bytes(b"")
    args = [cli("ns-train"), "vq3d-tiny", "--data", str(data), "--output-dir", str(tmp_path / "runs"),
            "--max-num-iterations", "4", *FAST, "--pipeline.datamanager.num-workers", "1"]
    parser = ["vq3d-images", "--eval-fraction", "0"]  # the dataparser's options follow its subcommand
    result = run(args + parser, cli_env)
    assert "kaputt.png: cannot read image" in result.stderr and "leer.jpg: cannot read image" in result.stderr
    assert "2 bad file(s) were skipped in this run" in result.stderr
    assert list((tmp_path / "runs").glob("**/nerfstudio_models/step-000000003.ckpt"))
    strict = subprocess.run(args + ["--pipeline.datamanager.strict", "True"] + parser, env=cli_env, capture_output=True,
                            text=True, timeout=300)
    last = strict.stderr.strip().splitlines()[-1]
    assert strict.returncode != 0 and "Traceback" not in strict.stderr
    assert last.startswith("vq3d: error: ") and ("kaputt.png" in last or "leer.jpg" in last)
    assert "--pipeline.datamanager.strict" in last


def test_ns_render_spiral_and_interpolate(trained_run, tmp_path):
    config, env = trained_run
    spiral = tmp_path / "spiral.mp4"
    run([cli("ns-render"), "spiral", "--load-config", str(config), "--output-path", str(spiral),
         "--seconds", "1", "--frame-rate", "4", "--radius", "0.3"], env)
    assert iio.imread(spiral, plugin="pyav").shape == (4, 64, 64, 3)  # frame rate x seconds
    interp = tmp_path / "interp.mp4"
    run([cli("ns-render"), "interpolate", "--load-config", str(config), "--output-path", str(interp),
         "--interpolation-steps", "1", "--frame-rate", "4", "--pose-source", "train"], env)
    assert iio.imread(interp, plugin="pyav").shape[1:] == (64, 64, 3)


def test_ns_export_tsdf_and_poisson(trained_run, tmp_path):
    config, env = trained_run
    run([cli("ns-export"), "poisson", "--load-config", str(config), "--output-dir", str(tmp_path / "poisson"),
         "--num-points", "3000", "--remove-outliers", "False", "--num-rays-per-batch", "4096", "--texture-method", "point_cloud"], env)
    assert (tmp_path / "poisson" / "poisson_mesh.ply").stat().st_size > 1000
    run([cli("ns-export"), "tsdf", "--load-config", str(config), "--output-dir", str(tmp_path / "tsdf"),
         "--resolution", "32", "--batch-size", "4", "--texture-method", "tsdf"], env, timeout=600)
    assert list((tmp_path / "tsdf").glob("*.ply"))


def test_a_config_that_does_not_fit_the_checkpoint_is_one_line(trained_run, tmp_path):
    import yaml

    config, env = trained_run
    loaded = yaml.load(config.read_text(), Loader=yaml.Loader)
    channels = len(loaded.pipeline.model.quantizer.levels)
    loaded.pipeline.model.quantizer.levels = (*loaded.pipeline.model.quantizer.levels, 2)  # another codebook: one FSQ channel more
    wrong = tmp_path / "config.yml"
    wrong.write_text(yaml.dump(loaded))
    result = subprocess.run([cli("vq3d"), "render-orbit", "--load-config", str(wrong), "--output-dir", str(tmp_path / "out")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "does not fit this config.yml" in result.stderr and f"quantizer.project_in.bias is [{channels}] in the checkpoint but [{channels + 1}]" in result.stderr
    assert not (tmp_path / "out").exists()

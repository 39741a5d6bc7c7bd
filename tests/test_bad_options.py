"""Mistakes on the command line and in the data given to the commands: each stops in one line
(exit status not 0, no traceback) before any long work, or is skipped with a warning, never a silent
wrong result. Through the real commands where the README promises the message; the shared checks
(``vq3d_nerfstudio.checks``) by hand where a subprocess would add nothing."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import typing
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST, cli, run, write_image

from vq3d_nerfstudio.checks import (
    UNPREFIXED,
    check_nerfstudio_command_line,
    check_options,
    json_file_problem,
    output_path_problem,
)
from vq3d_nerfstudio.errors import Vq3dError

REPO = Path(__file__).resolve().parents[1]


def fails_in_one_line(args, env, prefix, timeout=300):
    """Run a command that must fail: its last stderr line, checked to be its only error output."""
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(prefix), result.stderr[-3000:]
    return errors[0]


# ---- non-finite floats: every float option of every command -----------------------------------------------


def every_command():
    from vq3d_nerfstudio.scripts.cli import SUBCOMMANDS
    from vq3d_nerfstudio.stage2.train import Stage2TrainConfig

    return [*SUBCOMMANDS.values(), Stage2TrainConfig]


def instance_of(cls, folder: Path):
    """``cls`` with every required option set to an existing folder (a list of one, for list options)."""
    required = {f.name: ([folder] if "List" in str(f.type) else folder) for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return cls(**required)


def float_options(config):
    """``(option name, config with that option set to a value)`` for every float option (plain, optional,
    tuple, list), those of option groups (nested dataclasses, spelled without prefix when UNPREFIXED) included."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        set_field = lambda v, name=f.name: dataclasses.replace(config, **{name: v})  # noqa: E731
        if dataclasses.is_dataclass(value):
            prefix = "" if UNPREFIXED in getattr(hint, "__metadata__", ()) else f"{f.name}."
            for name, set_option in float_options(value):
                yield prefix + name, lambda v, set_field=set_field, set_option=set_option: set_field(set_option(v))
        elif isinstance(value, float) or (value is None and "float" in str(hint)):
            yield f.name, set_field
        elif isinstance(value, (tuple, list)) and value and all(isinstance(x, float) for x in value):
            yield f.name, lambda v, set_field=set_field, value=value: set_field(type(value)([v, *value[1:]]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_option_of_every_command_refuses_nan_and_inf(tmp_path, bad):
    seen = 0
    for cls in every_command():
        config = instance_of(cls, tmp_path)
        check_options(config)  # the defaults pass
        for name, set_to in float_options(config):
            broken = set_to(bad)
            with pytest.raises(Vq3dError) as caught:
                check_options(broken)
            option = "--" + name.replace("_", "-")
            assert str(caught.value) == f"{option} is {bad}; give a finite number"
            seen += 1
    assert seen >= 37  # counted by hand: compose 5, reconstruct 3, render-orbit 2, sample 5, fid 4,
    # interpolate 2, export-splats 8, vq3d-train-stage2 8 (eval, prepare, synth have none)


def test_non_finite_float_on_the_command_line_is_one_line(tmp_path, cli_env):
    out = tmp_path / "composite"
    line = fails_in_one_line([cli("vq3d"), "compose", "--load-config", str(tmp_path / "config.yml"), "--scene", "a.png",
                              "--object", "b.png", "--position", "nan", "0", "0", "--output-dir", str(out)],
                             cli_env, "vq3d compose: error: ")
    assert line == "vq3d compose: error: --position is nan; give a finite number" and not out.exists()


def test_ns_train_refuses_a_non_finite_option_before_making_a_run_folder(tmp_path):
    from nerfstudio.scripts.train import main as ns_train

    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny")
    config.optimizers["field"]["optimizer"].lr = float("inf")  # a dict of configs: named as tyro spells it
    config.output_dir = tmp_path / "runs"
    with pytest.raises(SystemExit, match=r"^vq3d: error: --optimizers\.field\.optimizer\.lr is inf; give a finite number$"):
        ns_train(config)
    assert not (tmp_path / "runs").exists()


# ---- counts that must be positive ------------------------------------------------------------------------


def test_counts_below_one_are_refused(tmp_path, cli_env):
    from vq3d_nerfstudio.scripts.render_orbit import RenderOrbit, RenderOrbitLoop
    from vq3d_nerfstudio.stage2.train import Stage2TrainConfig

    with pytest.raises(Vq3dError, match=r"^--num-frames must be >= 1, got 0$"):
        check_options(RenderOrbit(orbit=RenderOrbitLoop(num_frames=0)))
    with pytest.raises(Vq3dError, match=r"^--keep-checkpoints must be >= 1, got -1$"):
        check_options(Stage2TrainConfig(output_dir=tmp_path, keep_checkpoints=-1))
    check_options(RenderOrbit(orbit=RenderOrbitLoop(resolution=0)))  # 0 = the model's size: allowed
    line = fails_in_one_line([cli("vq3d"), "render-orbit", "--load-config", str(tmp_path / "config.yml"), "--fps", "0"],
                             cli_env, "vq3d render-orbit: error: ")
    assert line == "vq3d render-orbit: error: --fps must be >= 1, got 0"


def test_nerfstudio_command_lines_are_checked_before_the_work(tmp_path):
    for argv in (["ns-export", "pointcloud", "--num-points", "0"], ["/bin/ns-export", "poisson", "--num_points=0"]):
        with pytest.raises(Vq3dError, match=r"^--num-points must be >= 1, got 0$"):
            check_nerfstudio_command_line(argv)
    with pytest.raises(Vq3dError, match=r"^--num-rays-per-batch must be >= 1, got -5$"):
        check_nerfstudio_command_line(["ns-export", "pointcloud", "--num-rays-per-batch", "-5"])
    check_nerfstudio_command_line(["ns-export", "pointcloud", "--num-points", "10", "--output-dir", str(tmp_path)])
    a_file = tmp_path / "cloud.ply"
    a_file.write_text("x")
    with pytest.raises(Vq3dError, match=rf"^--output-dir: {a_file} is a file, not a folder; pass a folder$"):
        check_nerfstudio_command_line(["ns-export", "pointcloud", "--output-dir", str(a_file)])
    check_nerfstudio_command_line(["vq3d", "reconstruct", "--num-points", "0"])  # 0 skips the cloud there
    check_nerfstudio_command_line([])


# ---- output paths ----------------------------------------------------------------------------------------


def test_output_paths_that_cannot_be_written(tmp_path, monkeypatch):
    a_file = tmp_path / "a file"
    a_file.write_text("x")
    assert output_path_problem(a_file, is_folder=True) == f"{a_file} is a file, not a folder; pass a folder"
    assert output_path_problem(a_file / "sub" / "out", is_folder=True) == (
        f"{a_file} is a file, so {a_file / 'sub' / 'out'} cannot be created; pass another path")
    assert output_path_problem(tmp_path, is_folder=False) == f"{tmp_path} is a folder; pass a file name"
    assert output_path_problem(tmp_path / "new" / "deeper", is_folder=True) is None
    assert output_path_problem(tmp_path / "new.json", is_folder=False) is None
    # a folder without write permission (as root every folder is writable: simulate what access() says)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert output_path_problem(tmp_path, is_folder=True) == (
        f"cannot write in {tmp_path} (permission denied); pass a folder you can write to")
    assert output_path_problem(tmp_path / "new", is_folder=True) == (
        f"cannot create {tmp_path / 'new'}: {tmp_path} is not writable (permission denied); pass a folder you can write to")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder, so there is no unwritable folder to try")
def test_a_read_only_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert "permission denied" in output_path_problem(locked, is_folder=True)
    finally:
        locked.chmod(0o755)


def test_an_output_dir_that_is_a_file_fails_first(tmp_path, cli_env):
    a_file = tmp_path / "out.txt"
    a_file.write_text("keep me")
    photo = write_image(tmp_path / "photo.png")
    missing_config = tmp_path / "config.yml"  # would fail later, after the output check
    line = fails_in_one_line([cli("vq3d"), "reconstruct", "--load-config", str(missing_config), "--image", str(photo),
                              "--output-dir", str(a_file)], cli_env, "vq3d reconstruct: error: ")
    assert line == f"vq3d reconstruct: error: --output-dir: {a_file} is a file, not a folder; pass a folder"
    assert a_file.read_text() == "keep me"


# ---- ns-train: input errors are one line, and leave no run folder ----------------------------------------


def test_ns_train_input_errors_are_one_line_without_a_run_folder(tmp_path, synth_dir, cli_env):
    a_file = write_image(tmp_path / "photo.png")
    runs = tmp_path / "runs"
    base = [cli("ns-train"), "vq3d-tiny", "--output-dir", str(runs), "--max-num-iterations", "1", *FAST]
    line = fails_in_one_line(base + ["--data", str(a_file)], cli_env, "vq3d: error: ")
    assert line == f"vq3d: error: {a_file}: is a file, not a folder; pass --data <folder of images> (e.g. {tmp_path})"
    assert not list(runs.rglob("*"))  # the run folder that held only config.yml is gone
    line = fails_in_one_line(base + ["--data", str(synth_dir), "--pipeline.model.image-size", "32"], cli_env, "vq3d: error: ")
    assert "image size 64 != model image size 32" in line
    assert not list(runs.rglob("config.yml"))


@pytest.mark.parametrize("contents, reason", [
    ((), r"no images found \(it is empty\)"),
    (("notes.txt",), r"no images found \(it holds 1 other entry \(notes\.txt\), none an image\)"),
])
def test_ns_train_without_images_stops_in_one_line(tmp_path, contents, reason):
    """nerfstudio's ns-train main, in this process (the command line only adds parsing)."""
    from nerfstudio.scripts.train import main as ns_train

    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    data = tmp_path / "data"
    data.mkdir()
    for name in contents:
        (data / name).write_text("x")
    config = build_trainer_config("vq3d-tiny")
    config.pipeline.datamanager.data = data
    config.output_dir = tmp_path / "runs"
    config.vis = "tensorboard"
    with pytest.raises(SystemExit) as caught:
        ns_train(config)
    assert str(caught.value).startswith(f"vq3d: error: {data}: ") and "\n" not in str(caught.value)
    assert re.search(reason, str(caught.value))
    assert not list((tmp_path / "runs").rglob("*"))


def test_ns_train_strict_stops_at_a_depth_without_valid_pixels(tmp_path, cli_env):
    data = tmp_path / "tiefe"
    data.mkdir()
    (data / "vq3d_meta.json").write_text('{"depth_kind": "z-depth"}')
    for i in range(2):  # whichever split an image falls in, its depth is the first one met
        write_image(data / f"{i}.png", size=(16, 16))
        np.save(data / f"{i}.npy", np.full((16, 16), -2.0, np.float32))  # OpenGL camera-space z
    line = fails_in_one_line([cli("ns-train"), "vq3d-tiny", "--data", str(data), "--output-dir", str(tmp_path / "runs"),
                              "--max-num-iterations", "2", *FAST, "--pipeline.datamanager.strict", "True"],
                             cli_env, "vq3d: error: ")
    assert ".npy: depth has no valid pixel (all 256 values are negative); negative z-depth looks like OpenGL " \
           "camera-space z" in line and f"vq3d: error: {data}" in line
    assert line.endswith("(--pipeline.datamanager.strict True; without it bad files are skipped and reported)")


# ---- camera paths ----------------------------------------------------------------------------------------


def test_camera_path_json_problems_name_the_file(tmp_path):
    for shipped in sorted((REPO / "configs" / "camera_paths").glob("*.json")):
        assert json_file_problem(shipped) is None
    cut = tmp_path / "cut.json"
    cut.write_text('{"camera_path": [{"fov": 50')  # 27 characters: the parser stops just after them
    assert json_file_problem(cut) == f"{cut}: truncated (Expecting ',' delimiter at line 1 column 28)"
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,}')
    assert json_file_problem(bad) == f"{bad}: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 9)"
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert json_file_problem(empty) == f"{empty}: empty file, not JSON"
    assert json_file_problem(tmp_path / "none.json").startswith(f"{tmp_path / 'none.json'}: cannot read it (No such file")


# ---- through the real commands, on a trained run -----------------------------------------------------------


def test_ns_render_and_ns_export_stop_in_one_line_before_the_work(trained_run, tmp_path):
    config, env = trained_run
    video = tmp_path / "orbit.mp4"
    orbit = REPO / "configs" / "camera_paths" / "orbit.json"
    render = [cli("ns-render"), "camera-path", "--load-config", str(config), "--output-path", str(video)]
    cut = tmp_path / "pfad.json"
    cut.write_text(orbit.read_text()[:300])
    line = fails_in_one_line(render + ["--camera-path-filename", str(cut)], env, "ns-render: error: ")
    assert line.startswith(f"ns-render: error: {cut}: truncated (")
    # the synth fixture's 24 scenes hold out a few: eval:99999 is past the end
    line = fails_in_one_line(render + ["--camera-path-filename", str(orbit)], dict(env, VQ3D_SCENE="eval:99999"),
                             "vq3d: error: VQ3D_SCENE=eval:99999: the eval split has ")
    assert "give an index in range, or a photo's path" in line and not video.exists()
    export = [cli("ns-export"), "pointcloud", "--load-config", str(config)]
    line = fails_in_one_line(export + ["--num-points", "0", "--output-dir", str(tmp_path / "cloud")], env, "ns-export: error: ")
    assert line == "ns-export: error: --num-points must be >= 1, got 0"
    assert not list((tmp_path / "cloud").glob("*"))  # nerfstudio makes the folder; nothing is written into it


def test_vq3d_eval_skips_scenes_with_degenerate_cameras(trained_run, synth_dir, tmp_path):
    config, env = trained_run
    scenes = tmp_path / "scenes"
    for i in range(3):
        shutil.copytree(synth_dir / f"scene_{i:05d}", scenes / f"scene {i}")
    for i, frame in ((1, 1), (2, 0)):  # an all-zero novel frame, and an all-zero input frame
        path = scenes / f"scene {i}" / "transforms.json"
        meta = json.loads(path.read_text())
        meta["frames"][frame]["transform_matrix"] = np.zeros((4, 4)).tolist()
        path.write_text(json.dumps(meta))
    out = tmp_path / "eval.json"
    result = run([cli("vq3d"), "eval", "--load-config", str(config), "--scenes", str(scenes), "--output", str(out)], env)
    report = json.loads(out.read_text())
    assert [s["scene"] for s in report["scenes"]] == ["scene 0"]
    assert [Path(s["scene"]).parent.name for s in report["skipped"]] == ["scene 1", "scene 2"]
    for (scene, frame), skipped in zip(((1, 1), (2, 0)), report["skipped"]):
        assert f"frame {frame} (images/frame_{frame:05d}.png) transform_matrix has bottom row" in skipped["error"]
        assert f"vq3d eval: warning: skipped scene scene {scene}: " in result.stderr
    # scene 0 alone: its input view is the only 0-degree view (3 views: 0 and +-offsets)
    assert report["summary_by_offset_deg"]["0"]["count"] == 1


# ---- value ranges: every ranged option, checked in one place and shown in --help -------------------------


def config_classes():
    """Every option dataclass of every command: the vq3d subcommands (their option groups too),
    vq3d-train-stage2, and ns-train vq3d*'s model, quantizers, datamanager, dataparser and optimizer."""
    from vq3d_nerfstudio.data.datamanager import Vq3dDataManagerConfig
    from vq3d_nerfstudio.data.dataparser import Vq3dImagesDataParserConfig
    from vq3d_nerfstudio.ns.trainer import AdamWithBetasConfig
    from vq3d_nerfstudio.stage1.model import Vq3dModelConfig
    from vq3d_nerfstudio.stage1.quantizer import FSQConfig, VQConfig

    seen, todo = [], [*every_command(), Vq3dModelConfig, VQConfig, FSQConfig, Vq3dDataManagerConfig,
                      Vq3dImagesDataParserConfig, AdamWithBetasConfig]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            try:
                hints = typing.get_type_hints(cls, include_extras=True)
            except NameError:  # a nerfstudio class whose annotations do not resolve: not ours
                continue
            seen.append(cls)
            for hint in hints.values():
                todo += [t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)]
    return seen


#: numeric options that have no range: any value means something
UNBOUNDED = {"seed", "position", "object_box", "novel_yaw_deg", "report_views", "eval_num_rays_per_chunk",
             "train_num_rays_per_batch", "train_num_images_to_sample_from", "train_num_times_to_repeat_images",
             "eval_num_rays_per_batch", "eval_num_images_to_sample_from", "eval_num_times_to_repeat_images",
             "camera_res_scale_factor", "patch_size", "scale_factor",
             "scene_scale", "collider_params", "eval_image_indices"}


def test_every_numeric_option_has_a_range_that_help_shows():
    """Each int / float option (plain, optional, tuple) of our configs carries a Range at the top of its
    type, where tyro reads the help hint it adds, or is one of the few unbounded ones; nerfstudio's own
    fields (declared by its classes) are left to it."""
    from tyro.conf._confstruct import _ArgConfig

    from vq3d_nerfstudio.checks import Range

    checked = 0
    for cls in config_classes():
        hints = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if f.name.startswith("_") or f.name in UNBOUNDED or not re.search(r"\b(int|float)\b", str(hint)):
                continue
            if "Literal" in str(hint) or not any(c.__module__.startswith("vq3d_nerfstudio") and f.name in
                                                 c.__dict__.get("__annotations__", {}) for c in cls.__mro__):
                continue  # a choice of fixed values, or a nerfstudio field
            metadata = getattr(hint, "__metadata__", ())
            ranges = [m for m in metadata if isinstance(m, Range)]
            assert ranges, f"{cls.__name__}.{f.name} ({hint}) has no Range at the top of its type"
            hints_shown = [m.help_behavior_hint for m in metadata if isinstance(m, _ArgConfig) and m.help_behavior_hint]
            assert hints_shown and hints_shown[-1]("7") == f"({ranges[0].text}; default: 7)", f"{cls.__name__}.{f.name}"
            checked += 1
    assert checked >= 140  # 149 when written: every numeric option of our configs but the unbounded ones


def test_range_markers_by_hand():
    from vq3d_nerfstudio.checks import Range

    top_p = Range(0, 1, low_open=True)
    assert top_p.text == "in (0, 1]" and 0 not in top_p and 1e-9 in top_p and 1 in top_p and 1.5 not in top_p
    assert Range(0).text == ">= 0" and 0 in Range(0) and -1 not in Range(0)
    assert Range(0, low_open=True).text == "> 0" and 0 not in Range(0, low_open=True)
    assert Range(0, 90, high_open=True).text == "in [0, 90)" and 90 not in Range(0, 90, high_open=True)
    assert Range(high=1).text == "<= 1" and -5 in Range(high=1)


def test_help_shows_the_ranges(cli_env):
    result = run([cli("vq3d"), "sample", "--help"], dict(cli_env, COLUMNS="250"))
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│ --")}
    assert "(in (0, 1]; default: None)" in lines["--top-p"] + result.stdout.split("--top-p", 1)[1].split("│ --")[0]
    assert "(>= 0; default: 1.0)" in result.stdout.split("--temperature", 1)[1].split("│ --")[0]
    assert "(>= 1; default: 16)" in lines["--batch-size"] + result.stdout.split("--batch-size", 1)[1].split("│ --")[0]
    stage2 = run([cli("vq3d-train-stage2"), "--help"], dict(cli_env, COLUMNS="250")).stdout
    assert "(in [0, 1]; default: 0.1)" in stage2.split("--class-dropout", 1)[1].split("│ --")[0]
    assert "(> 0; default: 0.0003)" in stage2.split("--learning-rate", 1)[1].split("│ --")[0]


@pytest.mark.parametrize("args, message", [
    (["vq3d", "sample", "--top-p", "0"], "vq3d sample: error: --top-p must be in (0, 1], got 0.0"),
    (["vq3d", "sample", "--temperature", "-1"], "vq3d sample: error: --temperature must be >= 0, got -1.0"),
    (["vq3d", "sample", "--cfg-scale", "-2"], "vq3d sample: error: --cfg-scale must be >= 0, got -2.0"),
    (["vq3d", "fid", "--real", "r", "--num-samples", "1"], "vq3d fid: error: --num-samples must be >= 2, got 1"),
    (["vq3d", "synth", "--num-views", "9"], "vq3d synth: error: --num-views must be in [1, 7], got 9"),
    (["vq3d", "reconstruct", "--image", "a.png", "--max-point-radius", "0"],
     "vq3d reconstruct: error: --max-point-radius must be > 0, got 0.0"),
    (["vq3d", "render-orbit", "--max-elevation-deg", "90"], "vq3d render-orbit: error: --max-elevation-deg must be in [0, 90), got 90.0"),
    (["vq3d-train-stage2", "--class-dropout", "1.5"], "vq3d-train-stage2: error: --class-dropout must be in [0, 1], got 1.5"),
    (["vq3d-train-stage2", "--warmup-steps", "-5"], "vq3d-train-stage2: error: --warmup-steps must be >= 0, got -5"),
    (["vq3d-train-stage2", "--learning-rate", "-1"], "vq3d-train-stage2: error: --learning-rate must be > 0, got -1.0"),
])
def test_out_of_range_options_are_refused_before_anything_is_read_or_made(tmp_path, cli_env, args, message):
    """The checkpoint / config / data named are missing: a command that got past its options would
    say so; none does, and no output folder is made."""
    out = tmp_path / "out"
    where = ["--output-dir", str(out)] if args[1:2] != ["synth"] else [str(out)]
    named = {"sample": ["--stage2-checkpoint", str(tmp_path / "missing")],
             "reconstruct": ["--load-config", str(tmp_path / "missing.yml")],
             "render-orbit": ["--load-config", str(tmp_path / "missing.yml")]}.get(args[1], [])
    if args[0] == "vq3d-train-stage2":
        named = ["--stage1-config", str(tmp_path / "missing.yml")]
    if args[1:2] == ["fid"]:
        where = ["--output", str(out / "fid.json"), "--stage2-checkpoint", str(tmp_path / "missing")]
    line = fails_in_one_line([cli(args[0]), *args[1:], *named, *where], cli_env, message.split(" error: ")[0] + " error: ",
                             timeout=120)
    assert line == message and not out.exists()


def test_ns_train_refuses_an_out_of_range_model_option_before_making_a_run_folder(tmp_path):
    from nerfstudio.scripts.train import main as ns_train

    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny")
    config.pipeline.model.num_heads = 0
    config.output_dir = tmp_path / "runs"
    with pytest.raises(SystemExit, match=r"^vq3d: error: --pipeline\.model\.num-heads must be >= 1, got 0$"):
        ns_train(config)
    config.pipeline.model.num_heads = 2
    config.pipeline.datamanager.dataparser.eval_fraction = 1.0
    with pytest.raises(SystemExit, match=r"^vq3d: error: --pipeline\.datamanager\.dataparser\.eval-fraction must be in \[0, 1\), got 1\.0$"):
        ns_train(config)
    config.pipeline.datamanager.dataparser.eval_fraction = 0.1
    config.optimizers["field"]["optimizer"].lr = -1.0  # once a traceback at the first optimizer step
    with pytest.raises(SystemExit, match=r"^vq3d: error: --optimizers\.field\.optimizer\.lr must be > 0, got -1\.0$"):
        ns_train(config)
    assert not (tmp_path / "runs").exists()


# ---- sampling: a bounded batch, the class label first ------------------------------------------------------


class Stage1Stub:
    """What the sampler needs of a stage-1 model: its codebook, token grid and device."""

    def __init__(self):
        from types import SimpleNamespace

        self.quantizer = SimpleNamespace(has_codes=True)
        self.config = SimpleNamespace(quantizer=SimpleNamespace(codebook_size=16))
        self.index_shape = (3, 4)
        self.device = "cpu"


def test_many_samples_are_drawn_in_bounded_batches():
    import torch

    from vq3d_nerfstudio.stage2.sample import SamplingSettings, SceneSampler
    from vq3d_nerfstudio.stage2.transformer import TokenTransformer, TokenTransformerConfig

    torch.manual_seed(0)
    net = TokenTransformer(TokenTransformerConfig(vocab_size=16, num_classes=3, block_size=12, num_layers=1, num_heads=2,
                                                  embed_dim=16)).eval()
    sampler = SceneSampler(net, {"model": {"vocab_size": 16}, "grid": [3, 4]}, Stage1Stub())
    caches, done = [], []
    new_cache = net.new_cache
    net.new_cache = lambda batch: caches.append(batch) or new_cache(batch)
    settings = SamplingSettings(cfg_scale=2.0)  # guidance doubles the batch the network sees
    codes = sampler.sample(1, 5, settings, torch.Generator().manual_seed(3), batch_size=2, on_batch=done.append)
    assert codes.shape == (5, 3, 4) and done == [2, 2, 1] and caches == [4, 4, 2]
    first = sampler.sample(1, 2, settings, torch.Generator().manual_seed(3))
    assert torch.equal(codes[:2], first)  # the first batch is what sampling 2 gives
    whole = sampler.sample(1, 5, settings, torch.Generator().manual_seed(3), batch_size=8)
    assert torch.equal(whole, sampler.sample(1, 5, settings, torch.Generator().manual_seed(3)))


def test_an_out_of_range_class_label_is_refused_before_any_model_loads(tmp_path, cli_env):
    """The stage-2 checkpoint holds only its config.json (its weights are an empty file) and the
    stage-1 run it names does not exist: the label is checked first, from config.json alone."""
    step = tmp_path / "stage2" / "checkpoints" / "step-000000001"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"")
    (step / "config.json").write_text(json.dumps({
        "model": {"vocab_size": 16, "num_classes": 3, "block_size": 12}, "class_names": ["box", "cylinder", "sphere"],
        "grid": [3, 4], "stage1_config": str(tmp_path / "missing" / "config.yml")}))
    out = tmp_path / "samples"
    for label, said in (("7", "class label 7 is out of range: this model has 3 class(es), 0-2; or 'none'"),
                        ("cone", "class label 'cone' is neither a class id in [0, 3) nor a class name (box, cylinder, sphere)")):
        line = fails_in_one_line([cli("vq3d"), "sample", "--stage2-checkpoint", str(tmp_path / "stage2"), "--class-label",
                                  label, "--output-dir", str(out)], cli_env, "vq3d sample: error: ")
        assert line.startswith(f"vq3d sample: error: {said}") and not out.exists()
    line = fails_in_one_line([cli("vq3d"), "sample", "--stage2-checkpoint", str(tmp_path / "stage2"), "--class-label", "2",
                              "--output-dir", str(out)], cli_env, "vq3d sample: error: ")
    assert "model.safetensors" in line  # a label in range goes on to the weights


# ---- a hand-edited config.yml ------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, said", [
    ((r"image_size: \d+", 'image_size: "64"'), "pipeline.model.image_size is '64' (a str), not int"),
    ((r"num_heads: \d+", "num_heads: four"), "pipeline.model.num_heads is 'four' (a str), not int"),
    ((r"triplane_layout: frustum", "triplane_layout: frustrum"),
     "pipeline.model.triplane_layout is 'frustrum' (a str), not one of 'frustum', 'world'"),
])
def test_a_config_yml_field_of_the_wrong_type_is_named(tmp_path, cli_env, edit, said):
    import yaml

    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config("vq3d-tiny")
    config.output_dir = tmp_path / "outputs"
    text = yaml.dump(config)
    model_part = text.index("model: !!python/object:vq3d_nerfstudio.stage1.model.Vq3dModelConfig")
    edited, count = re.subn(edit[0], edit[1], text[model_part:], count=1)
    assert count == 1, edit[0]
    path = tmp_path / "run" / "config.yml"
    path.parent.mkdir()
    path.write_text(text[:model_part] + edited)
    line = fails_in_one_line([cli("vq3d"), "render-orbit", "--load-config", str(path), "--output-dir", str(tmp_path / "out")],
                             cli_env, "vq3d render-orbit: error: ")
    assert line == f"vq3d render-orbit: error: {path}: {said}; fix it in the file"


def test_config_types_by_hand():
    from vq3d_nerfstudio.checks import config_type_problem
    from vq3d_nerfstudio.ns.method_configs import PRESETS, build_trainer_config

    for name in PRESETS:
        assert config_type_problem(build_trainer_config(name)) is None
    config = build_trainer_config("vq3d-tiny")
    config.pipeline.datamanager.relative_disparity.target_range = (0.0, "0.8")
    assert config_type_problem(config) == (
        "pipeline.datamanager.relative_disparity.target_range is (0.0, '0.8') (a tuple), not a list of float")
    config.pipeline.datamanager.relative_disparity.target_range = (0.0, 1)  # an int where a float goes: fine
    config.pipeline.model.quantizer.levels = (8, True)
    assert config_type_problem(config) == "pipeline.model.quantizer.levels is (8, True) (a tuple), not a list of int"
    config.pipeline.model.quantizer.levels = (8, 5)
    config.pipeline.model.perceptual_weights = 3
    assert config_type_problem(config) == "pipeline.model.perceptual_weights is 3 (a int), not Path or None"


# ---- vq3d reconstruct: no empty point clouds ---------------------------------------------------------------


def test_reconstruct_without_dense_points_warns_and_writes_no_ply(trained_run, tmp_path):
    config, env = trained_run
    photo = write_image(tmp_path / "photo.png", size=(32, 32), color=(40, 120, 200))
    out = tmp_path / "out"
    result = run([cli("vq3d"), "reconstruct", "--load-config", str(config), "--image", str(photo), "--output-dir", str(out),
                  "--num-frames", "2", "--num-points", "50", "--max-point-radius", "1e-6"], env)
    assert (out / "photo_canonical.png").exists() and not (out / "photo.ply").exists()
    assert ("vq3d reconstruct: warning: photo: no point cloud written: no ray hit anything dense (accumulation >= 0.5) "
            "within --max-point-radius 1e-06 of the pivot") in result.stderr


# ---- the viewer: a malformed websocket message -------------------------------------------------------------


def test_a_malformed_websocket_message_is_one_line_and_the_client_stays_counted(capfd):
    import socket
    import time

    import msgspec
    import viser
    from viser import _messages
    from websockets.sync.client import connect

    from vq3d_nerfstudio.ns.viewer_controls import guard_viewer_messages

    guard_viewer_messages()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = viser.ViserServer(host="127.0.0.1", port=port, verbose=False)

    def clients(expected):
        for _ in range(100):  # the server's threads take a moment
            if len(server.get_clients()) == expected:
                break
            time.sleep(0.05)
        return len(server.get_clients())

    try:
        ws = connect(f"ws://127.0.0.1:{port}")
        camera = _messages.ViewerCameraMessage((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 2.0), 0.8, 1.0, (0.0, 0.0, 0.0), (0.0, 1.0, 0.0))
        ws.send(msgspec.msgpack.encode({"type": "ViewerCameraMessage", **camera.as_serializable_dict()}))
        assert clients(1) == 1  # viser counts a client once its camera arrives
        capfd.readouterr()
        for bad in (b"\x00not msgpack", "a text frame", msgspec.msgpack.encode({"type": "NoSuchMessage"})):
            ws.send(bad)
        ws.send(msgspec.msgpack.encode({"type": "ViewerCameraMessage", **camera.as_serializable_dict()}))  # still served
        time.sleep(0.3)
        assert clients(1) == 1
        ws.close()
        assert clients(0) == 0  # the connection's clean-up ran
    finally:
        server.stop()
    err = capfd.readouterr().err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("vq3d viewer: warning: ignored a malformed websocket message (")]
    assert len(warnings) == 3 and "TypeError: a str frame, not msgpack bytes" in warnings[1]

"""Files others wrote that the project reads: a stage-2 checkpoint's config.json and a token cache's
meta.json may name a stage-1 run's config.yml, which nerfstudio loads with yaml.Loader (it runs
code); class names from a checkpoint become file names. A named config.yml is read with a safe
loader first and refused in one line when it holds Python tags beyond nerfstudio's config classes;
every class name that becomes a path is made safe in one place (files.safe_file_name)."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import cli

from vq3d_nerfstudio import MOVED_MODULES
from vq3d_nerfstudio.files import safe_file_name, safe_file_names
from vq3d_nerfstudio.model_index import run_config_problem
from vq3d_nerfstudio.ns.method_configs import PRESETS, build_trainer_config
from vq3d_nerfstudio.stage1.quantizer import VQConfig
from vq3d_nerfstudio.stage2 import checkpoint as ckpt
from vq3d_nerfstudio.stage2.data import write_token_cache
from vq3d_nerfstudio.stage2.sample import class_file_name, stage1_config_of
from vq3d_nerfstudio.stage2.transformer import TokenTransformer, TokenTransformerConfig


def shell_touch(marker: Path) -> str:
    """A YAML line that runs ``touch marker`` when yaml.Loader reads it (as nerfstudio does)."""
    return f"extra: !!python/object/apply:os.system [\"touch '{marker}'\"]\n"


def hostile_config(folder: Path, marker: Path) -> Path:
    """A run's config.yml as nerfstudio writes it, plus one line that runs a shell command."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yml"
    path.write_text(yaml.dump(build_trainer_config("vq3d-tiny")) + shell_touch(marker))
    return path


def nano_checkpoint(run_dir: Path, info: dict, vocab: int = 16, num_classes: int = 2, block: int = 16) -> Path:
    """The smallest stage-2 checkpoint (untrained), with ``info`` in its config.json."""
    config = TokenTransformerConfig(vocab_size=vocab, num_classes=num_classes, block_size=block, num_layers=1,
                                    num_heads=2, embed_dim=32)
    torch.manual_seed(0)
    net = TokenTransformer(config)
    return ckpt.save_checkpoint(run_dir, 1, net, torch.optim.AdamW(net.parameters()), {}, {"model": config.to_dict(), **info})


# ---- the safe check of a named config.yml -----------------------------------------------------------
def test_the_configs_nerfstudio_writes_pass_the_check(tmp_path, trained_run):
    """Every preset, another quantizer, a run saved under the old module paths and a real run's
    config.yml hold only tags of nerfstudio's and vq3d's config classes."""
    texts = {name: yaml.dump(build_trainer_config(name)) for name in PRESETS}
    vq = build_trainer_config("vq3d-tiny")
    vq.pipeline.model.quantizer = VQConfig(size=32, code_dim=8)
    texts["vq"] = yaml.dump(vq)
    old = texts["vq3d-tiny"]
    for moved, new in MOVED_MODULES.items():
        old = old.replace(f"{new}.", f"{moved}.")
    texts["old paths"] = old
    for name, text in texts.items():
        path = tmp_path / f"{name}.yml"
        path.write_text(text)
        assert run_config_problem(path) is None, name
    assert run_config_problem(trained_run[0]) is None


@pytest.mark.parametrize("line, shown", [
    ("extra: !!python/object/apply:os.system [\"touch '{m}'\"]", "!!python/object/apply:os.system"),
    ("extra: !<tag:yaml.org,2002:python/object/apply:os.system> [\"touch '{m}'\"]", "!!python/object/apply:os.system"),
    ("extra: !!python/object/new:subprocess.Popen [[touch, '{m}']]", "!!python/object/new:subprocess.Popen"),
    # a nerfstudio function, not one of its enums
    ("extra: !!python/object/apply:nerfstudio.utils.scripts.run_command [\"touch '{m}'\"]",
     "!!python/object/apply:nerfstudio.utils.scripts.run_command"),
    ("extra: !!python/object:subprocess.Popen {{args: [touch, '{m}']}}", "!!python/object:subprocess.Popen"),
    ("_target: !!python/name:os.system ''", "!!python/name:os.system"),
    # a module imported into one of nerfstudio's, not defined there
    ("_target: !!python/name:nerfstudio.utils.scripts.subprocess ''", "!!python/name:nerfstudio.utils.scripts.subprocess"),
    ("extra: !!python/module:os ''", "!!python/module:os"),
    ("extra: !local_tag 1", "!local_tag"),
])
def test_a_config_with_other_tags_is_refused_without_running_them(tmp_path, line, shown):
    marker = tmp_path / "marker"
    path = tmp_path / "config.yml"
    path.write_text(yaml.dump(build_trainer_config("vq3d-tiny")) + line.format(m=marker) + "\n")
    problem = run_config_problem(path)
    lines = path.read_text().splitlines()
    assert problem is not None and problem.startswith(f"holds {shown} on line {len(lines)},")
    assert "loading it can run code" in problem
    assert not marker.exists()


def test_tag_directives_and_unreadable_files_are_refused(tmp_path):
    marker = tmp_path / "marker"
    directive = tmp_path / "directive.yml"
    directive.write_text(f"%TAG !p! tag:yaml.org,2002:python/\n---\na: !p!object/apply:os.system [\"touch '{marker}'\"]\n")
    assert "!!python/object/apply:os.system on line 3" in run_config_problem(directive)
    two = tmp_path / "two.yml"
    two.write_text("a: 1\n---\nb: 2\n")
    assert "not a YAML document" in run_config_problem(two)
    assert "cannot be read" in run_config_problem(tmp_path / "missing.yml")
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert run_config_problem(binary) is not None
    # the test's hostile line is live: nerfstudio's loader runs it
    live = tmp_path / "live.yml"
    live.write_text(shell_touch(marker))
    assert not marker.exists()
    yaml.load(live.read_text(), Loader=yaml.Loader)
    assert marker.exists()


def test_a_config_the_user_passes_is_taken_as_given(tmp_path):
    """--stage1-config on the command line: the user vouches for it (not read here)."""
    hostile = hostile_config(tmp_path / "run", tmp_path / "marker")
    mine = tmp_path / "mine" / "config.yml"
    assert stage1_config_of({"stage1_config": str(hostile)}, mine) == mine
    with pytest.raises(ckpt.CheckpointError, match=r"info\.json names the stage-1 run .*--stage1-config"):
        stage1_config_of({"stage1_config": str(hostile)}, None, tmp_path / "info.json")
    assert not (tmp_path / "marker").exists()


def test_a_checkpoint_naming_a_hostile_config_is_refused_in_one_line(tmp_path, cli_env):
    marker = tmp_path / "marker"
    hostile = hostile_config(tmp_path / "run", marker)
    folder = nano_checkpoint(tmp_path / "stage2", {"class_names": ["a", "b"], "grid": [4, 4], "stage1_config": str(hostile)})
    out = tmp_path / "samples"
    result = subprocess.run([cli("vq3d"), "sample", "--stage2-checkpoint", str(tmp_path / "stage2"), "--output-dir", str(out)],
                            env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vq3d sample: error: {folder / 'config.json'} names the stage-1 run {hostile}, which was not loaded")
    assert "!!python/object/apply:os.system" in last and f"pass it yourself with --stage1-config {hostile}" in last
    assert not marker.exists() and not out.exists()


def test_a_token_cache_naming_a_hostile_config_is_refused_in_one_line(tmp_path, cli_env):
    marker = tmp_path / "marker"
    hostile = hostile_config(tmp_path / "run", marker)
    rng = np.random.default_rng(0)
    splits = {split: (rng.integers(0, 16, (n, 4, 4)), rng.integers(0, 2, n)) for split, n in (("train", 16), ("eval", 4))}
    cache = write_token_cache(tmp_path / "cache", splits, 16, ["a", "b"], extra_meta={"stage1_config": str(hostile)})
    out = tmp_path / "stage2"
    result = subprocess.run([cli("vq3d-train-stage2"), "--token-cache", str(cache.path), "--output-dir", str(out),
                             "--model", "nano", "--batch-size", "8", "--max-steps", "1", "--device", "cpu"],
                            env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vq3d-train-stage2: error: {cache.path / 'meta.json'} names the stage-1 run {hostile}")
    assert "--stage1-config" in last
    assert not marker.exists() and not list(out.glob("checkpoints/step-*"))


def test_a_damaged_caches_rebuild_hint_names_only_a_config_that_passes_the_check(tmp_path):
    """The one line for a damaged cache given alone suggests rerunning with the stage-1 run its
    meta.json names: the user would vouch for that file by typing it, so a hostile one is not named."""
    from vq3d_nerfstudio.stage2.token_cache import rebuild_hint

    marker = tmp_path / "marker"
    runs = {"hostile": hostile_config(tmp_path / "hostile", marker), "plain": tmp_path / "plain" / "config.yml"}
    runs["plain"].parent.mkdir()
    runs["plain"].write_text(yaml.dump(build_trainer_config("vq3d-tiny")))
    hints = {}
    for name, run in runs.items():
        cache = tmp_path / f"cache_{name}"
        cache.mkdir()
        (cache / "meta.json").write_text(json.dumps({"stage1_config": str(run), "data": "/data/photos"}))
        hints[name] = rebuild_hint(cache)
    assert f"--stage1-config {runs['plain']} --data /data/photos" in hints["plain"]
    assert str(runs["hostile"]) not in hints["hostile"] and "--stage1-config <stage-1 run>/config.yml" in hints["hostile"]
    assert not marker.exists()


# ---- class names that become file names -------------------------------------------------------------
@pytest.mark.parametrize("name, safe", [
    ("sphere", "sphere"),
    ("sports car", "sports car"),
    ("cars/sedan", "cars_sedan"),
    ("../../ESC", "ESC"),
    ("/etc/passwd", "etc_passwd"),
    ("..\\..\\win", "win"),
    ("C:\\Windows", "C__Windows"),
    ("..", "unnamed"),
    ("", "unnamed"),
    (".hidden", "hidden"),
    ("a\nb\tc", "a b c"),
    ("evil\u202egnp.exe", "evil gnp.exe"),  # a right-to-left override
    ("con.txt", "con_.txt"),
    ("bück", "bück"),
])
def test_a_name_becomes_one_readable_file_name_part(name, safe):
    assert safe_file_name(name) == safe


def test_long_names_are_cut_and_distinct_names_stay_distinct():
    long = [("x" * 300) + "a", ("x" * 300) + "b"]
    cut = [safe_file_name(n) for n in long]
    assert cut[0] != cut[1] and all(len(c.encode()) <= 96 for c in cut)
    names = ["cars/sedan", "cars_sedan", "Car", "car", "..", "", "a", "a"]
    safe = safe_file_names(names, [f"class{i}" for i in range(len(names))])
    assert safe == ["cars_sedan-2", "cars_sedan", "Car", "car-2", "class4", "class5", "a", "a-2"]
    assert len({s.casefold() for s in safe}) == len(names)
    assert class_file_name(1, ["../../ESC", "cars/sedan"], 2) == "cars_sedan"
    assert class_file_name(2, ["unconditional", "b"], 2) == "unconditional-2"  # the null class


@pytest.mark.parametrize("label, stem", [("../../ESC", "ESC"), ("cars/sedan", "cars_sedan")])
def test_sample_writes_class_names_from_a_checkpoint_only_inside_the_output_folder(tmp_path, cli_env, label, stem):
    """A stage-2 checkpoint (untrained, for the shipped model's 16x16 codes) whose classes are
    ``../../ESC`` and ``cars/sedan``: vq3d sample writes every file inside --output-dir, named after
    the class made safe."""
    from vq3d_nerfstudio.model_index import read_package_config, resolve_model

    levels = read_package_config(resolve_model("vq3d-tiny-synth"))["model"]["quantizer"]["levels"]
    nano_checkpoint(tmp_path / "stage2", {"class_names": ["../../ESC", "cars/sedan"], "grid": [16, 16], "stage1_config": None},
                    vocab=int(np.prod(levels)), block=256)
    out = tmp_path / "a" / "b" / "samples"
    result = subprocess.run([cli("vq3d"), "sample", "--stage2-checkpoint", str(tmp_path / "stage2"), "--model", "vq3d-tiny-synth",
                             "--class-label", label, "--num-samples", "1", "--num-frames", "2", "--output-dir", str(out)],
                            env=cli_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = {p for p in tmp_path.rglob("*") if p.is_file() and (tmp_path / "stage2") not in p.parents}
    assert written and all(out in p.parents for p in written), sorted(map(str, written))
    assert {p.name for p in written} == {f"{stem}_000_{kind}" for kind in ("canonical.png", "disparity.png", "orbit.mp4",
                                                                             "disparity.mp4", "codes.npy")} | {"samples.png"}
    assert json.loads((next((tmp_path / "stage2").glob("checkpoints/step-*")) / "config.json").read_text())["class_names"][0] == "../../ESC"

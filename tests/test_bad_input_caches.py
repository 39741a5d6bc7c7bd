"""Damaged caches, checkpoints and shards (README "Bad input and interruptions"): a zero-byte or
truncated token-cache file or chunk is rebuilt when the stage-1 run is known and is one line naming
it otherwise; a mistyped cache, a stage-2 ``state.json`` without ``step`` and an empty or truncated
stage-1 checkpoint are one line; a shard sample that cannot be decoded is skipped and counted like a
bad image file (``strict`` stops in one line naming the shard and member); ``vq3d prepare --verify``
finds a modified shard, start-up finds a shard of the wrong size, and a damaged ``index.json`` says
what works, which then works; ``bad_files.txt`` is JSON lines."""

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import FAST, cli, run, write_image
from PIL import Image

from vq3d_nerfstudio.data.prepare import prepare_shards
from vq3d_nerfstudio.data.shard_format import read_bad_files, read_index
from vq3d_nerfstudio.files import file_sha256
from vq3d_nerfstudio.stage2.data import load_token_cache, write_token_cache

STAGE2 = ["--model", "nano", "--batch-size", "4", "--max-steps", "1", "--eval-every", "1", "--num-workers", "0",
          "--device", "cpu"]


def fails_in_one_line(args, env, prefix, timeout=300):
    """Run a command that must fail: exit status 1, no traceback, its last stderr line starts with ``prefix``."""
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 1, f"{args[0]} gave {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(prefix), last
    return last


# ---- the token cache ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage1_cache(trained_run, tmp_path_factory):
    """A token cache of the tiny stage-1 run, built through vq3d-train-stage2 in its own folder:
    ``(config.yml, cache folder, env, the cache's train codes)``."""
    config, env = trained_run
    cache = tmp_path_factory.mktemp("cache") / "tokens"
    run([cli("vq3d-train-stage2"), "--stage1-config", str(config), "--token-cache", str(cache),
         "--output-dir", str(cache.parent / "s2"), *STAGE2], env)
    return config, cache, env, np.load(cache / "train.codes.npy")


def test_a_damaged_cache_file_is_one_line_without_the_stage1_run_and_rebuilt_with_it(stage1_cache, tmp_path):
    config, cache, env, codes = stage1_cache
    (cache / "train.codes.npy").write_bytes(b"")  # zero bytes
    line = fails_in_one_line([cli("vq3d-train-stage2"), "--token-cache", str(cache), "--output-dir", str(tmp_path / "a"),
                              *STAGE2], env, "vq3d-train-stage2: error: ")
    assert f"{cache / 'train.codes.npy'}: unreadable (empty file, 0 bytes)" in line
    # the line gives the command that rebuilds it (meta.json names the stage-1 run); it works
    fix = line.split("rebuild it with ", 1)[1].split()
    assert fix[:3] == ["vq3d-train-stage2", "--stage1-config", str(config.resolve())]
    result = run([cli(fix[0]), *fix[1:], "--output-dir", str(tmp_path / "b"), *STAGE2], env)
    assert "train.codes.npy: unreadable (empty file, 0 bytes); the token cache is damaged: rebuilding it" in result.stdout
    assert np.array_equal(load_token_cache(cache).train.codes, codes)


def test_a_truncated_cache_file_is_rebuilt_when_the_stage1_run_is_known(stage1_cache, tmp_path):
    config, cache, env, codes = stage1_cache
    data = (cache / "eval.classes.npy").read_bytes()
    (cache / "eval.classes.npy").write_bytes(data[: len(data) - 3])
    result = run([cli("vq3d-train-stage2"), "--stage1-config", str(config), "--token-cache", str(cache),
                  "--output-dir", str(tmp_path / "s2"), *STAGE2], env)
    assert "eval.classes.npy: unreadable (" in result.stdout and "rebuilding it" in result.stdout
    assert np.array_equal(load_token_cache(cache).train.codes, codes)


def test_zero_byte_and_truncated_chunks_of_an_interrupted_encoding_are_encoded_again(stage1_cache, tmp_path):
    config, cache, env, codes = stage1_cache
    parts = cache / "parts"  # as an encoding killed after writing two damaged chunks leaves it
    parts.mkdir()
    (parts / "fingerprint").write_text(json.loads((cache / "meta.json").read_text())["fingerprint"])
    (parts / "train-000000.npz").write_bytes(b"")
    buffer = io.BytesIO()
    np.savez(buffer, codes=codes[:4], classes=np.zeros(4, np.int64))
    (parts / "eval-000000.npz").write_bytes(buffer.getvalue()[:100])
    (cache / "meta.json").unlink()
    result = run([cli("vq3d-train-stage2"), "--stage1-config", str(config), "--token-cache", str(cache),
                  "--output-dir", str(tmp_path / "s2"), *STAGE2], env)
    assert f"{parts / 'train-000000.npz'}: unreadable chunk (empty file, 0 bytes): encoding that chunk again" in result.stdout
    assert f"{parts / 'eval-000000.npz'}: unreadable chunk (BadZipFile" in result.stdout
    assert np.array_equal(load_token_cache(cache).train.codes, codes)


def small_cache(path: Path):
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 16, (n, 2, 2)), rng.integers(0, 2, n)) for s, n in (("train", 8), ("eval", 4))}
    return write_token_cache(path, splits, 16, ["a", "b"]).path


def nan_codes(cache: Path) -> str:
    codes = np.load(cache / "train.codes.npy").astype(np.float64)
    codes[0, 0, 0] = np.nan
    np.save(cache / "train.codes.npy", codes)
    return f"{cache / 'train.codes.npy'}: holds float64 values (NaN among them), not integer codes"


def float_class_ids(cache: Path) -> str:
    np.save(cache / "eval.classes.npy", np.load(cache / "eval.classes.npy") + 0.5)
    return f"{cache / 'eval.classes.npy'}: holds float64 values, not integer class ids"


def edit_meta(cache: Path, **changes) -> dict:
    meta = json.loads((cache / "meta.json").read_text())
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not None}
    (cache / "meta.json").write_text(json.dumps(meta))
    return meta


def no_sizes(cache: Path) -> str:
    edit_meta(cache, sizes=None)
    return f"{cache / 'meta.json'}: has no 'sizes'"


def mistyped_sizes(cache: Path) -> str:
    edit_meta(cache, sizes={"train": "8", "eval": 4})
    return f"{cache / 'meta.json'}: 'sizes' gives train: '8', not a count of scenes"


@pytest.mark.parametrize("damage", [nan_codes, float_class_ids, no_sizes, mistyped_sizes])
def test_a_mistyped_cache_is_one_line_naming_the_file(damage, tmp_path, cli_env):
    cache = small_cache(tmp_path / "cache")
    expected = damage(cache)
    line = fails_in_one_line([cli("vq3d-train-stage2"), "--token-cache", str(cache), "--output-dir",
                              str(tmp_path / "run"), *STAGE2], cli_env, "vq3d-train-stage2: error: ")
    assert line.startswith(f"vq3d-train-stage2: error: {expected}; the token cache is damaged; rebuild it with "), line


def test_a_stage2_checkpoint_whose_state_json_has_no_step_is_one_line_and_the_fix_resumes(tmp_path, cli_env):
    cache = small_cache(tmp_path / "cache")
    out = tmp_path / "run"
    args = [cli("vq3d-train-stage2"), "--token-cache", str(cache), "--output-dir", str(out), *STAGE2]
    run([*args, "--max-steps", "2", "--save-every", "1"], cli_env)
    latest = out / "checkpoints" / "step-000000002"
    state = json.loads((latest / "state.json").read_text())
    del state["step"]
    (latest / "state.json").write_text(json.dumps(state))
    line = fails_in_one_line([*args, "--max-steps", "3"], cli_env, "vq3d-train-stage2: error: ")
    assert line == (f"vq3d-train-stage2: error: {latest / 'state.json'}: has no 'step'; the checkpoint is damaged: "
                    f"delete {latest} to resume from the checkpoint before it, or pass a new --output-dir")
    shutil.rmtree(latest)
    result = run([*args, "--max-steps", "3"], cli_env)
    assert f"Resuming from {out / 'checkpoints' / 'step-000000001'} (step 1)" in result.stdout


# ---- stage-1 checkpoints -----------------------------------------------------------------------------
def copy_run(config: Path, dest: Path) -> Path:
    """A copy of a stage-1 run under ``dest`` whose config.yml points at the copy (nerfstudio loads the
    checkpoints its config names)."""
    import yaml

    trainer = yaml.load(config.read_text(), Loader=yaml.Loader)  # the test's own run: trusted
    folder = dest / trainer.experiment_name / trainer.method_name / trainer.timestamp
    shutil.copytree(config.parent, folder, ignore=shutil.ignore_patterns("token_cache-*"))
    trainer.output_dir = dest
    (folder / "config.yml").write_text(yaml.dump(trainer))
    return folder / "config.yml"


def test_an_empty_or_truncated_stage1_checkpoint_is_one_line(trained_run, tmp_path):
    config, env = trained_run
    copy = copy_run(config, tmp_path / "runs")
    ckpt = copy.parent / "nerfstudio_models" / "step-000000005.ckpt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(b"")
    line = fails_in_one_line([cli("vq3d-train-stage2"), "--stage1-config", str(copy), "--output-dir",
                              str(tmp_path / "s2"), *STAGE2], env, "vq3d-train-stage2: error: ")
    assert line == (f"vq3d-train-stage2: error: {ckpt}: empty file (0 bytes), not a checkpoint; it is the run's only "
                    "checkpoint: train the run again")
    ckpt.write_bytes(data[: len(data) // 2])
    (ckpt.parent / "step-000000002.ckpt").write_bytes(data)  # an earlier, complete one
    line = fails_in_one_line([cli("vq3d"), "render-orbit", "--load-config", str(copy), "--output-dir", str(tmp_path / "o")],
                             env, "vq3d render-orbit: error: ")
    assert line.startswith(f"vq3d render-orbit: error: {ckpt}: truncated or not a checkpoint ({len(data) // 2:,} bytes, ")
    assert line.endswith("; delete it to use the checkpoint before it (step-000000002.ckpt), or train the run again")


# ---- shards ------------------------------------------------------------------------------------------
SIZE = 64  # vq3d-tiny's image size


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """8 distinct 64x64 photos, each with a z-depth .npy."""
    root = tmp_path_factory.mktemp("photos")
    (root / "vq3d_meta.json").write_text(json.dumps({"depth_kind": "z-depth"}))
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        np.save(root / f"img{i}.npy", np.full((SIZE, SIZE), 2.0 + i, np.float32))
    return root


@pytest.fixture(scope="module")
def shards(photos, tmp_path_factory) -> Path:
    """The photos in 2 shards of 4, with depth."""
    out = tmp_path_factory.mktemp("shards") / "prepared"
    prepare_shards(photos, out, resolution=SIZE, shard_size=4)
    return out


def prepare_args(photos: Path, out: Path):
    return [cli("vq3d"), "prepare", "--input", str(photos), "--output", str(out), "--resolution", str(SIZE),
            "--shard-size", "4", "--num-workers", "0"]


def rewrite_shard(root: Path, name: str, edit) -> None:
    """Rewrite a shard with ``edit(member name, bytes) -> bytes or None`` (None drops the member) and
    record its new size and sha256 in index.json: a shard written so, not one damaged after."""
    path = root / name
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            data = edit(member.name, data)
            if data is not None:
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    index = json.loads((root / "index.json").read_text())
    entry = next(e for e in index["shards"] if e["name"] == name)
    entry["num_bytes"], entry["sha256"] = path.stat().st_size, file_sha256(path)
    (root / "index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def bad_samples(shards, tmp_path_factory):
    """A copy of the shards where shard 1 holds a sample whose PNG is damaged and one without its depth
    member: ``(folder, {key: member})``."""
    out = tmp_path_factory.mktemp("bad") / "prepared"
    shutil.copytree(shards, out)
    with tarfile.open(out / "shard-000001.tar") as tar:
        keys = sorted({m.name.split(".")[0] for m in tar})
    broken, no_depth = keys[1], keys[2]  # training samples: the held-out ones come first (shard 0)

    def edit(name, data):
        if name == f"{broken}.png":
            return data[:60]  # the header survives, the pixels do not
        return None if name == f"{no_depth}.depth.npy" else data

    rewrite_shard(out, "shard-000001.tar", edit)
    return out, {broken: "png", no_depth: "depth.npy"}


def test_training_skips_undecodable_shard_samples_and_reports_the_count(bad_samples, tmp_path, cli_env):
    data, bad = bad_samples
    result = run([cli("ns-train"), "vq3d-tiny", "--data", str(data), "--output-dir", str(tmp_path),
                  "--max-num-iterations", "4", *FAST], cli_env)
    shard = data / "shard-000001.tar"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("vq3d: warning: skipped ")]
    assert len(warnings) == 2, result.stderr[-3000:]
    for key, member in bad.items():
        assert any(f"{shard}: " in w and f"{key}.{member}" in w for w in warnings), warnings
    assert "(2 bad files so far; --pipeline.datamanager.strict True stops at the first instead)" in warnings[-1]
    assert f"vq3d: warning: 2 bad file(s) were skipped in this run: {shard}:" in result.stderr


def test_strict_training_stops_at_an_undecodable_shard_sample_in_one_line(bad_samples, tmp_path, cli_env):
    data, bad = bad_samples
    line = fails_in_one_line([cli("ns-train"), "vq3d-tiny", "--data", str(data), "--output-dir", str(tmp_path),
                              "--max-num-iterations", "4", *FAST, "--pipeline.datamanager.strict", "True"],
                             cli_env, "vq3d: error: ")
    shard = data / "shard-000001.tar"
    named = [f"{shard}: sample {key} has no member {key}.depth.npy" if member == "depth.npy"
             else f"{shard}: member {key}.png cannot be decoded (" for key, member in bad.items()]
    assert any(line.startswith(f"vq3d: error: {text}") for text in named), line
    assert line.endswith("(--pipeline.datamanager.strict True; without it bad files are skipped and reported)")


def test_stage2_encoding_replaces_an_undecodable_shard_sample_as_a_folder_does(bad_samples):
    """Stage 2 reads prepared shards by offset (ShardSplit): a sample that does not decode gives the next
    readable one in its place, as a bad file of a folder does; with strict, the one line naming it."""
    import torch

    from vq3d_nerfstudio.data.dataparser import Vq3dImagesDataParserConfig
    from vq3d_nerfstudio.data.shard_format import ShardError
    from vq3d_nerfstudio.stage2.data import ShardSplit

    data, bad = bad_samples
    broken = next(key for key, member in bad.items() if member == "png")
    fraction = Vq3dImagesDataParserConfig().eval_fraction
    split = ShardSplit(data, "train", fraction, SIZE)
    keys = [loc.key for loc in split.locations]
    i = keys.index(broken)
    assert bad.get(keys[i + 1]) != "png"  # the next sample decodes (stage 2 reads no depth member)
    item, following = split[i], split.get_data(i + 1)
    assert torch.equal(item["image"], following["image"]) and int(item["class_id"]) == int(following["class_id"])
    assert broken in split.bad_files[i]
    with pytest.raises(ShardError, match=f"member {broken}.png cannot be decoded"):
        ShardSplit(data, "train", fraction, SIZE, strict=True)[i]


def test_verify_finds_a_modified_shard_and_the_fix_works(photos, shards, tmp_path, cli_env):
    out = tmp_path / "prepared"
    shutil.copytree(shards, out)
    assert "All 2 shards" in run([cli("vq3d"), "prepare", "--verify", "--output", str(out)], cli_env).stdout
    data = bytearray((out / "shard-000001.tar").read_bytes())
    data[2000] ^= 0xFF  # same size, other bytes: only the sha256 tells
    (out / "shard-000001.tar").write_bytes(bytes(data))
    result = subprocess.run([cli("vq3d"), "prepare", "--verify", "--output", str(out)], env=cli_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stdout.splitlines() == [f"{out / 'shard-000001.tar'}: sha256 differs from index.json (same size): modified or damaged"]
    assert result.stderr.strip().startswith(f"vq3d prepare: error: 1 of 2 shards in {out} do not match index.json")
    (out / "shard-000001.tar").unlink()  # what the line says
    run(prepare_args(photos, out), cli_env)
    run([cli("vq3d"), "prepare", "--verify", "--output", str(out)], cli_env)
    assert (out / "shard-000001.tar").read_bytes() == (shards / "shard-000001.tar").read_bytes()


def test_a_shard_of_the_wrong_size_is_found_at_start_up_and_rerunning_prepare_rewrites_it(photos, shards, tmp_path, cli_env):
    out = tmp_path / "prepared"
    shutil.copytree(shards, out)
    shard = out / "shard-000000.tar"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size - 1024])
    line = fails_in_one_line([cli("ns-train"), "vq3d-tiny", "--data", str(out), "--output-dir", str(tmp_path / "runs"),
                              *FAST], cli_env, "vq3d: error: ")
    assert line.startswith(f"vq3d: error: {shard}: {size - 1024:,} bytes but index.json says {size:,}: truncated or "
                           "modified; rerun `vq3d prepare` with the same options to rewrite it")
    run(prepare_args(photos, out), cli_env)
    assert shard.read_bytes() == (shards / "shard-000000.tar").read_bytes()


def test_a_truncated_index_says_what_works_and_that_works(photos, shards, tmp_path, cli_env):
    out = tmp_path / "prepared"
    shutil.copytree(shards, out)
    text = (out / "index.json").read_text()
    (out / "index.json").write_text(text[: len(text) // 2])
    line = fails_in_one_line([cli("vq3d"), "prepare", "--verify", "--output", str(out)], cli_env, "vq3d prepare: error: ")
    assert line.startswith(f"vq3d prepare: error: {out / 'index.json'}: truncated (")
    assert line.endswith(f"rerun `vq3d prepare --input <images> --output {out}` with the options it was prepared with: "
                         "it rebuilds a damaged index.json and its shards")
    result = run(prepare_args(photos, out), cli_env)
    assert "index.json: truncated" in result.stderr and "rebuilding the index and every shard" in result.stderr
    assert read_index(out) == read_index(shards)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (out / name).read_bytes() == (shards / name).read_bytes()


@pytest.mark.parametrize("change, said", [
    (lambda index: index.update(shards=None), "has no 'shards' list"),
    (lambda index: index["shards"][1].pop("name"), "shard entry 1 has no name"),
    (lambda index: index["shards"][0].pop("num_bytes"), "shard entry 0 (shard-000000.tar) has no num_bytes"),
])
def test_an_index_without_its_shard_list_or_entry_fields_is_one_line(shards, change, said, tmp_path, cli_env):
    out = tmp_path / "prepared"
    shutil.copytree(shards, out)
    index = json.loads((out / "index.json").read_text())
    change(index)
    (out / "index.json").write_text(json.dumps(index))
    line = fails_in_one_line([cli("vq3d"), "prepare", "--verify", "--output", str(out)], cli_env, "vq3d prepare: error: ")
    assert line.startswith(f"vq3d prepare: error: {out / 'index.json'}: {said}; rerun `vq3d prepare --input <images>")


def test_bad_files_with_a_newline_and_a_tab_in_the_name_round_trip_as_json_lines(tmp_path):
    images = tmp_path / "images"
    write_image(images / "good.png", size=(16, 16))
    odd = "bad\nname\twith tab.png"
    (images / odd).write_bytes(b"")
    out = tmp_path / "prepared"
    prepare_shards(images, out, resolution=16, depth_kind="none")
    lines = (out / "bad_files.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["source"] == odd
    assert read_bad_files(out) == [(odd, json.loads(lines[0])["error"])] and "empty file" in read_bad_files(out)[0][1]

"""A full disk (README "Bad input and interruptions"): every writer either completes or fails with
one line saying the disk is full and where, leaves no partial or empty file, and a failed checkpoint
save keeps the last good checkpoint. The disks are small tmpfs mounts (the tests run as root)."""

import errno
import shutil
import subprocess
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from helpers import FAST, cli, write_image
from plyfile import PlyData

from vq3d_nerfstudio.files import DiskFullError, atomic_path, disk_full_reason, write_atomic


@pytest.fixture
def small_disk(tmp_path):
    """``mount(size_kb)``: a fresh folder on a tmpfs of that size; unmounted after the test."""
    mounted = []

    def mount(size_kb: int, name: str = "disk") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command: cannot make a small disk to fill")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        # lazily if a failed writer's file object (torch's stream writer) still holds the disk
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Take every free byte of ``folder``'s disk (a file named ``filler``)."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    with pytest.raises(OSError):
        (folder / "probe").write_bytes(b"\0" * 4096)
    (folder / "probe").unlink(missing_ok=True)


def left_over(folder: Path):
    """Every file in ``folder`` (recursively) but the filler, hidden temporaries included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != "filler")


def assert_says_disk_full(message: str, path: Path) -> None:
    assert "\n" not in message
    assert str(path) in message and "the disk is full (No space left on device)" in message
    assert f"free space in {path.parent}" in message


@pytest.mark.parametrize(
    "err, reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "Disk quota exceeded"),
        # torch.save's zip writer, safetensors (Rust io::Error), as they word a full disk
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "No space left on device"),
        (RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file data/0: file write failed"),
         "No space left on device"),
        (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), "No space left on device"),
        (OSError(errno.EACCES, "Permission denied"), None),
        (ValueError("bad value"), None),
    ],
)
def test_disk_full_is_recognised_in_the_forms_libraries_raise(err, reason):
    assert disk_full_reason(err) == reason


def test_disk_full_is_found_behind_the_error_raised_from_it():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("writing failed") from inner
    except RuntimeError as outer:
        assert disk_full_reason(outer) == "No space left on device"


def _stage2_net():
    from vq3d_nerfstudio.stage2.transformer import TokenTransformer, TokenTransformerConfig

    config = TokenTransformerConfig(vocab_size=16, num_classes=2, block_size=16, num_layers=1, num_heads=2, embed_dim=32)
    torch.manual_seed(0)
    return TokenTransformer(config), {"model": config.to_dict(), "class_names": ["a", "b"], "grid": [4, 4]}


def _write_torch(path):
    with atomic_path(path, folder=path.parent) as tmp:  # as ns/trainer.py saves a checkpoint
        torch.save({"w": torch.zeros(20000)}, tmp)


def _write_point_ply(path):
    from vq3d_nerfstudio.export.ply import write_point_ply

    points = np.random.default_rng(0).random((5000, 3)).astype(np.float32)
    write_point_ply(path, points, points, points)


def _write_splat_ply(path):
    from vq3d_nerfstudio.export.gaussians import Gaussians
    from vq3d_nerfstudio.export.ply import write_splat_ply

    n = 2000
    write_splat_ply(path, Gaussians(torch.rand(n, 3), torch.rand(n, 3) + 0.1, torch.nn.functional.normalize(torch.rand(n, 4), dim=1),
                                    torch.rand(n) * 0.9 + 0.05, torch.rand(n, 3)))


def _write_video(path):
    from vq3d_nerfstudio.export.video import write_video

    write_video(path, [torch.rand(64, 64, 3) for _ in range(12)], 24)


def _write_png(path):
    from vq3d_nerfstudio.export.video import write_image

    write_image(path, np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))


def _write_shard(path):
    from vq3d_nerfstudio.data.shard_format import EncodedSample, write_shard

    write_shard(path, [EncodedSample(f"{i:08d}", 0, bytes(range(256)) * 40, None, f"cats/{i}.png") for i in range(4)])


def _write_json(path):
    write_atomic(path, b"{}" * 20000)


@pytest.mark.parametrize(
    "writer, name",
    [(_write_torch, "step-000000001.ckpt"), (_write_point_ply, "scene.ply"), (_write_splat_ply, "splats.ply"),
     (_write_video, "orbit.mp4"), (_write_png, "canonical.png"), (_write_shard, "shard-000000.tar"),
     (_write_json, "index.json")],
)
def test_writer_on_a_full_disk_says_so_and_leaves_nothing(small_disk, writer, name):
    disk = small_disk(64)
    fill(disk)
    with pytest.raises(DiskFullError) as caught:
        writer(disk / name)
    assert_says_disk_full(str(caught.value), disk / name)
    assert left_over(disk) == []


def test_video_that_fits_is_written_whole(small_disk):
    disk = small_disk(256)
    _write_video(disk / "orbit.mp4")
    assert iio.imread(disk / "orbit.mp4", plugin="pyav").shape == (12, 64, 64, 3)
    assert left_over(disk) == ["orbit.mp4"]


def test_stage2_checkpoint_on_a_full_disk_keeps_the_last_good_one(small_disk):
    from vq3d_nerfstudio.stage2 import checkpoint as ckpt

    net, info = _stage2_net()
    optimizer = torch.optim.AdamW(net.parameters())
    run = small_disk(2048)
    first = ckpt.save_checkpoint(run, 1, net, optimizer, {}, info)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    fill(run)
    with pytest.raises(DiskFullError) as caught:
        ckpt.save_checkpoint(run, 2, net, optimizer, {}, info)
    assert_says_disk_full(str(caught.value), run / "checkpoints" / "step-000000002")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000000001"]  # no temporary folder
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    loaded, _, folder = ckpt.load_model(run)
    assert folder == first and all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())


def _readable(path: Path) -> None:
    """Fails unless ``path`` is a whole file of its kind."""
    assert path.stat().st_size > 0, path
    if path.suffix == ".png":
        iio.imread(path)
    elif path.suffix == ".mp4":
        assert iio.imread(path, plugin="pyav").shape[0] == 8
    elif path.suffix == ".ply":
        PlyData.read(str(path))


# 32 KB: the two PNGs fit (8 + 24 KB in pages), the first video does not; 64 KB: the videos fit, the point cloud does not
@pytest.mark.parametrize("size_kb, fails", [(32, "photo_orbit.mp4"), (64, "photo.ply")])
def test_reconstruct_to_a_full_disk_says_so_in_one_line(small_disk, tmp_path, cli_env, size_kb, fails):
    photo = write_image(tmp_path / "in" / "photo.png", size=(40, 30))
    out = small_disk(size_kb)
    result = subprocess.run(
        [cli("vq3d"), "reconstruct", "--image", str(photo), "--model", "vq3d-tiny-synth", "--output-dir", str(out),
         "--num-frames", "8", "--num-points", "2000"],
        capture_output=True, text=True, env=cli_env, timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr and "Wrote" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vq3d reconstruct: error: {out}/photo")
    failed = out / fails
    assert_says_disk_full(last.removeprefix("vq3d reconstruct: error: "), failed)
    assert not failed.exists()
    kept = left_over(out)
    assert all(not name.startswith(".") for name in kept), kept  # no temporary file
    for name in kept:
        _readable(out / name)


def test_prepare_to_a_full_disk_says_so_in_one_line(small_disk, tmp_path, cli_env):
    for i in range(6):
        write_image(tmp_path / "in" / "cats" / f"{i}.png", size=(64, 64), color=(40 * i, 90, 200))
    out = small_disk(16)
    result = subprocess.run(
        [cli("vq3d"), "prepare", "--input", str(tmp_path / "in"), "--output", str(out), "--resolution", "64",
         "--num-workers", "0"],
        capture_output=True, text=True, env=cli_env, timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vq3d prepare: error: {out}/") and "the disk is full (No space left on device)" in last
    assert all(not name.startswith(".") or name == ".prepare.lock" for name in left_over(out))
    assert all((out / name).stat().st_size > 0 for name in left_over(out) if name != ".prepare.lock")


def test_ns_train_on_a_full_disk_says_so_and_keeps_the_last_checkpoint(small_disk, synth_dir, trained_run, tmp_path):
    """The disk holds one checkpoint and config and logs, not two: the step-3 save succeeds, the final
    step-6 one fails (nerfstudio deletes the older checkpoint only after the new one is written)."""
    config, env = trained_run
    size = (config.parent / "nerfstudio_models" / "step-000000005.ckpt").stat().st_size
    out = small_disk(size * 3 // 2 // 1024 + 256)
    result = subprocess.run(
        [cli("ns-train"), "vq3d-tiny", "--data", str(synth_dir), "--output-dir", str(out), "--experiment-name", "full",
         "--timestamp", "t", "--max-num-iterations", "7", "--steps-per-save", "3", *FAST],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    models = out / "full" / "vq3d-tiny" / "t" / "nerfstudio_models"
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"vq3d: error: {models}/step-0000000")
    assert "the disk is full (No space left on device)" in last
    kept = sorted(models.iterdir())
    assert [p.name for p in kept] == ["step-000000003.ckpt"], kept
    assert last.endswith(f"the last good checkpoint {kept[0]} is kept")
    assert torch.load(kept[0], map_location="cpu", weights_only=False)["step"] == 3
    assert not [p for p in models.parent.iterdir() if p.name.startswith(".")]  # no temporary checkpoint

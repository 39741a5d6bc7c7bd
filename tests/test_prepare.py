"""`vq3d prepare` and the shard reader: robust decoding, bad-file reports, byte-identical resumption,
rank splitting, shuffling, checksums, pseudo-depth through a tiny randomly initialised
`transformers` model, and the shards streamed through webdataset over http, `pipe:` and brace patterns."""

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli, write_image
from PIL import Image

from vq3d_nerfstudio import files
from vq3d_nerfstudio.data import shard_format
from vq3d_nerfstudio.data.dataset import load_image
from vq3d_nerfstudio.data.prepare import DepthEstimator, PrepareError, prepare_shards
from vq3d_nerfstudio.data.shard_format import ShardError
from vq3d_nerfstudio.data.shard_stream import ShardReader, consumer_plan, iter_shard_raw

RES = 16
GOOD = {  # source -> class id (classes: cats = 0, dogs = 1)
    "cats/exif.jpg": 0, "cats/grey.png": 0, "cats/rgba.png": 0, "cats/plain0.png": 0, "cats/plain1.png": 0,
    "cats/plain2.png": 0, "dogs/sixteen.png": 1, "dogs/cmyk.jpg": 1, "dogs/plain3.png": 1, "dogs/plain4.png": 1,
    "dogs/plain5.png": 1,
}
BAD = ["cats/zero.png", "cats/notimage.jpg", "dogs/truncated.jpg"]
QUADRANTS = {(4, 4): (255, 0, 0), (4, 12): (0, 255, 0), (12, 4): (0, 0, 255), (12, 12): (255, 255, 0)}


def make_mixed_folder(root: Path) -> Path:
    """Class folders holding every awkward format, three bad files, and one image outside the classes."""
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    # What the viewer should see: 48x32 landscape, its centre square split into 4 coloured quadrants.
    shown = np.full((32, 48, 3), 128, np.uint8)
    for (row, col), colour in QUADRANTS.items():
        r0, c0 = (row // 8) * 16, 8 + (col // 8) * 16
        shown[r0 : r0 + 16, c0 : c0 + 16] = colour
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 deg clockwise to display": store the picture turned 90 deg anticlockwise
    Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90).save(
        root / "cats/exif.jpg", quality=95, subsampling=0, exif=exif
    )
    Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))).save(root / "cats/grey.png")
    Image.new("RGBA", (16, 16), (10, 200, 30, 128)).save(root / "cats/rgba.png")
    Image.fromarray(np.tile(np.arange(16, dtype=np.uint16) * 1000, (16, 1))).save(root / "dogs/sixteen.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(root / "dogs/cmyk.jpg", quality=95)
    for i in range(6):
        folder = "cats" if i < 3 else "dogs"
        write_image(root / folder / f"plain{i}.png", size=(24, 16), color=(40 * i, 255 - 40 * i, 7 * i))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(root / "dogs/whole.jpg", quality=90)
    data = (root / "dogs/whole.jpg").read_bytes()
    (root / "dogs/whole.jpg").unlink()
    (root / "dogs/truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "cats/zero.png").write_bytes(b"")
    (root / "cats/notimage.jpg").write_text("this is not a JPEG\n")
    write_image(root / "stray.png")
    return root


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return make_mixed_folder(tmp_path_factory.mktemp("mixed") / "images")


@pytest.fixture(scope="module")
def prepared(mixed, tmp_path_factory) -> Path:
    """The mixed folder in shards of 4 inputs (14 inputs -> 4 shards, uneven for 2 ranks)."""
    out = tmp_path_factory.mktemp("prepared")
    prepare_shards(mixed, out, resolution=RES, shard_size=4)
    return out


def read_all(root: Path, **kwargs):
    return list(ShardReader(root, **kwargs))


def shard_bytes(root: Path):
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.tar"))} | {
        n: (root / n).read_bytes() for n in ("index.json", "bad_files.txt")
    }


def test_good_images_land_in_shards_bit_exact_and_bad_files_are_reported(mixed, prepared):
    index = json.loads((prepared / "index.json").read_text())
    assert index["complete"] and index["class_names"] == ["cats", "dogs"]
    assert index["num_samples"] == len(GOOD) and index["num_inputs"] == len(GOOD) + len(BAD) + 1
    assert index["depth_kind"] == "none" and index["depth_model"] is None and index["resolution"] == RES
    assert [s["name"] for s in index["shards"]] == [f"shard-00000{i}.tar" for i in range(4)]
    samples = read_all(prepared)
    by_source = {s["source"]: s for s in samples}
    assert len(samples) == len(by_source) == len(GOOD)  # nothing lost, nothing twice
    assert {k: s["class_id"] for k, s in by_source.items()} == GOOD
    for source, sample in by_source.items():
        assert sample["image"].shape == (RES, RES, 3) and sample["disparity"] is None
        assert torch.equal(sample["image"], load_image(mixed / source, RES))  # lossless PNG round trip
    # EXIF orientation: the quadrant pattern survives only the correct rotation (+ centre crop).
    exif = (by_source["cats/exif.jpg"]["image"] * 255).numpy()
    for (row, col), colour in QUADRANTS.items():
        assert np.abs(exif[row, col] - colour).max() < 40, (row, col, exif[row, col])
    grey = by_source["cats/grey.png"]["image"]
    assert torch.equal(grey[..., 0], grey[..., 1]) and torch.equal(grey[..., 0], grey[..., 2])
    assert torch.allclose(grey[0, :, 0], torch.arange(16) * 16 / 255.0)
    # half-transparent (alpha 128) over white: c * 128/255 + 255 * 127/255
    over_white = (torch.tensor([10.0, 200.0, 30.0]) * 128 + 255 * 127) / 255 / 255
    assert torch.allclose(by_source["cats/rgba.png"]["image"][8, 8], over_white, atol=0.5 / 255)
    # 16-bit 0, 1000, ..., 15000 of 65535: a dark ramp stays dark (not stretched to the image's maximum)
    sixteen = by_source["dogs/sixteen.png"]["image"][..., 0]
    assert torch.allclose(sixteen[0], torch.arange(16) * 1000 / 65535, atol=0.5 / 255)
    assert bool((sixteen[0, 1:] > sixteen[0, :-1]).all())
    assert torch.allclose(by_source["dogs/cmyk.jpg"]["image"][8, 8], torch.tensor([1.0, 0, 0]), atol=0.03)
    # Bad files: listed with a reason, in the report and the index.
    rows = [json.loads(line) for line in (prepared / "bad_files.txt").read_text().splitlines()]  # JSON lines
    report = {row["source"]: row["error"] for row in rows}
    assert sorted(report) == sorted(BAD + ["stray.png"])
    assert "truncated" in report["dogs/truncated.jpg"] and "cannot identify" in report["cats/notimage.jpg"]
    skipped = [s["source"] for e in index["shards"] for s in e["skipped"]] + [i["source"] for i in index["ignored"]]
    assert sorted(skipped) == sorted(report) and index["num_skipped"] == 4


def test_strict_fails_on_the_first_bad_file_and_names_it(mixed, tmp_path, cli_env):
    with pytest.raises(PrepareError, match="stray.png: image outside the class folders"):
        prepare_shards(mixed, tmp_path / "a", resolution=RES, strict=True)
    (tmp_path / "b").mkdir()
    for name in ("cats/grey.png", "cats/zero.png", "dogs/cmyk.jpg"):
        (tmp_path / "b" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "b" / name).write_bytes((mixed / name).read_bytes())
    result = subprocess.run(
        [cli("vq3d"), "prepare", "--input", str(tmp_path / "b"), "--output", str(tmp_path / "out"),
         "--resolution", str(RES), "--strict", "--num-workers", "0"],
        capture_output=True, text=True, env=cli_env, timeout=120,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vq3d prepare: error: ") and "zero.png" in last and "--strict" in last


def test_killed_run_resumes_to_byte_identical_shards(mixed, prepared, tmp_path, monkeypatch):
    real_write = shard_format.write_shard
    calls = []

    def dies_in_third_shard(path, samples):
        calls.append(path.name)
        if len(calls) == 3:  # a kill mid-shard: half a temp file, no rename
            files.temporary_path(path).write_bytes(b"half a tar")
            raise KeyboardInterrupt
        return real_write(path, samples)

    out = tmp_path / "out"
    monkeypatch.setattr(shard_format, "write_shard", dies_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(mixed, out, resolution=RES, shard_size=4, num_workers=2)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert (out / ".shard-000002.tar.partial").exists()
    (out / ".shard-000003.tar.partial").write_bytes(b"stray")
    with pytest.raises(ShardError, match="did not finish"):
        ShardReader(out)

    calls.clear()
    monkeypatch.setattr(shard_format, "write_shard", lambda path, samples: calls.append(path.name) or real_write(path, samples))
    prepare_shards(mixed, out, resolution=RES, shard_size=4)
    assert calls == ["shard-000002.tar", "shard-000003.tar"]  # finished shards were kept
    assert shard_bytes(out) == shard_bytes(prepared)  # and the result equals the uninterrupted run's
    assert not list(out.glob(".*.partial"))
    prepare_shards(mixed, out, resolution=RES, shard_size=4)  # complete: nothing to redo
    assert calls == ["shard-000002.tar", "shard-000003.tar"]
    with pytest.raises(PrepareError, match="other settings.*resolution: 16 -> 8"):
        prepare_shards(mixed, out, resolution=8, shard_size=4)


def test_two_ranks_read_disjoint_samples_covering_the_dataset(prepared, mixed, tmp_path):
    everything = sorted(s["key"] for s in read_all(prepared))
    one_shard = tmp_path / "one"
    prepare_shards(mixed, one_shard, resolution=RES, shard_size=100)  # fewer shards than ranks
    for root, keys in ((prepared, everything), (one_shard, everything)):
        for buffer in (0, 5):
            ranks = [ShardReader(root, rank=r, world_size=2, shuffle_buffer=buffer, epoch=3) for r in range(2)]
            seen = [[s["key"] for s in reader] for reader in ranks]
            assert not set(seen[0]) & set(seen[1])
            assert sorted(seen[0] + seen[1]) == keys
            assert [len(r) for r in ranks] == [len(s) for s in seen] and all(seen)
    # The plan: 4 shards over 2 ranks -> whole shards; 3 over 2 -> 2 whole, the last split by sample.
    assert consumer_plan([0, 1, 2], 0, 2) == [(0, 0, 1), (2, 0, 2)]
    assert consumer_plan([0, 1, 2], 1, 2) == [(1, 0, 1), (2, 1, 2)]
    with pytest.raises(ShardError, match="with none"):
        list(ShardReader(one_shard, rank=20, world_size=21))


def test_dataloader_workers_split_a_rank_without_changing_it(prepared):
    reader = ShardReader(prepared, rank=1, world_size=2)
    alone = sorted(s["key"] for s in reader)
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=2)
    assert sorted(s["key"] for s in loader) == alone


def test_shuffle_buffer_is_a_seeded_epoch_aware_permutation(prepared):
    plain = [s["key"] for s in read_all(prepared)]
    reader = ShardReader(prepared, shuffle_buffer=4, seed=7)
    epoch0 = [s["key"] for s in reader]
    reader.set_epoch(1)
    epoch1 = [s["key"] for s in reader]
    assert Counter(epoch0) == Counter(epoch1) == Counter(plain)
    assert epoch0 not in (epoch1, plain)
    assert [s["key"] for s in ShardReader(prepared, shuffle_buffer=4, seed=7)] == epoch0  # reproducible
    assert [s["key"] for s in ShardReader(prepared, shuffle_buffer=4, seed=8)] != epoch0


def test_tampered_or_truncated_shard_fails_with_one_clear_error(prepared, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    ShardReader(out, verify=True)  # intact
    data = bytearray((out / "shard-000001.tar").read_bytes())
    data[1500] ^= 0xFF  # one flipped bit pattern inside a member's bytes
    (out / "shard-000001.tar").write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000001.tar: checksum mismatch.*rerun `vq3d prepare`"):
        ShardReader(out, verify=True)
    shutil.copy(prepared / "shard-000001.tar", out / "shard-000001.tar")
    (out / "shard-000002.tar").write_bytes((prepared / "shard-000002.tar").read_bytes()[:2000])
    with pytest.raises(ShardError, match="shard-000002.tar"):
        list(ShardReader(out))  # without verify: still one clear error, naming the shard


def test_sibling_depth_is_carried_over_as_disparity(tmp_path):
    data = tmp_path / "flat"
    depth = np.full((12, 20), 2.0, np.float32)  # z-depth 2 -> disparity 0.5
    depth[:, :10] = np.inf  # sky -> disparity 0
    depth[0, 10] = np.nan  # unknown -> NaN
    for i in range(3):
        write_image(data / f"img{i}.png", size=(20, 12))
        np.save(data / f"img{i}.npy", depth)
    with pytest.raises(PrepareError, match="kind is unknown"):
        prepare_shards(data, tmp_path / "x", resolution=12)
    (data / "vq3d_meta.json").write_text(json.dumps({"depth_kind": "z-depth"}))
    index = prepare_shards(data, tmp_path / "out", resolution=12)
    assert index["depth_kind"] == "disparity" and index["depth_source"] == "files" and index["depth_model"] is None
    for sample in ShardReader(tmp_path / "out"):
        disp = sample["disparity"].numpy()  # the centre 12x12 crop of the 20x12 map: columns 4..15
        assert disp.shape == (12, 12) and np.isnan(disp[0, 6]) and np.isnan(disp).sum() == 1
        assert (disp[:, :6] == 0).all() and (disp[1:, 6:] == 0.5).all()
    write_image(data / "no_depth.png", size=(20, 12))
    with pytest.raises(PrepareError, match="no_depth.png: no depth file .* --depth-model"):
        prepare_shards(data, tmp_path / "y", resolution=12)


def test_list_file_with_class_names(mixed, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{mixed}/cats/grey.png\tzebra\n{mixed}/dogs/cmyk.jpg\taardvark\n\n")
    samples = read_all(Path(prepare_shards(listing, tmp_path / "out", resolution=RES) and tmp_path / "out"))
    assert {s["source"].rsplit("/", 1)[-1]: s["class_id"] for s in samples} == {"grey.png": 1, "cmyk.jpg": 0}
    assert ShardReader(tmp_path / "out").class_names == ["aardvark", "zebra"]


# ----------------------------------------------------------------------------------------------
# Pseudo-depth through transformers (tiny random models of the real classes, saved to tmp_path)


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers", reason="pseudo-depth needs the optional transformers")
    torch.manual_seed(0)
    config = transformers.DPTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        head_hidden_size=8, use_auxiliary_head=False,
    )
    path = tmp_path_factory.mktemp("tiny-dpt")
    transformers.DPTForDepthEstimation(config).save_pretrained(path)
    transformers.DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_depth_anything(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers", reason="pseudo-depth needs the optional transformers")
    torch.manual_seed(0)
    backbone = transformers.Dinov2Config(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=28,
        patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
    )
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        head_hidden_size=8, patch_size=14,
    )
    path = tmp_path_factory.mktemp("tiny-depth-anything")
    transformers.DepthAnythingForDepthEstimation(config).save_pretrained(path)
    transformers.DPTImageProcessor(size={"height": 28, "width": 28}, ensure_multiple_of=14).save_pretrained(path)
    return path


def test_depth_model_through_the_cli(mixed, tiny_dpt, tmp_path, cli_env):
    out = tmp_path / "out"
    result = subprocess.run(
        [cli("vq3d"), "prepare", "--input", str(mixed), "--output", str(out), "--resolution", str(RES),
         "--depth-model", str(tiny_dpt), "--shard-size", "5", "--depth-batch-size", "3", "--num-workers", "1"],
        capture_output=True, text=True, env=cli_env, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    index = json.loads((out / "index.json").read_text())
    assert index["depth_model"] == str(tiny_dpt) and index["depth_model_type"] == "dpt"
    assert index["depth_kind"] == "disparity" and index["depth_source"] == "model"
    estimator = DepthEstimator(str(tiny_dpt))
    samples = read_all(out)
    assert len(samples) == len(GOOD)
    for sample in samples:
        disp = sample["disparity"]
        assert disp.shape == (RES, RES) and bool(torch.isfinite(disp).all()) and float(disp.std()) > 0
        # The depth belongs to its own image: the model on that image alone gives the same map.
        alone = estimator([(sample["image"].numpy() * 255 + 0.5).astype(np.uint8)], RES)[0]
        assert np.allclose(disp.numpy(), alone, rtol=1e-4, atol=1e-5)
    assert (shard_format.shard_name(0) in {s["name"] for s in index["shards"]}) and not list(out.glob(".*.partial"))


def test_depth_anything_fills_images_without_a_depth_file(tiny_depth_anything, tmp_path, monkeypatch):
    data = tmp_path / "flat"
    for i in range(4):
        write_image(data / f"img{i}.png", size=(20, 12), color=(60 * i, 20, 200 - 40 * i))
    np.save(data / "img0.npy", np.full((12, 20), 4.0, np.float32))
    (data / "vq3d_meta.json").write_text(json.dumps({"depth_kind": "z-depth"}))
    index = prepare_shards(data, tmp_path / "out", resolution=RES, depth_model=str(tiny_depth_anything), shard_size=2)
    assert index["depth_source"] == "files+model" and index["depth_model_type"] == "depth_anything"
    # Killed after the first shard and restarted: the model's output is reproduced byte for byte.
    real_write = shard_format.write_shard

    def killed_after_first_shard(path, samples):
        if path.name != shard_format.shard_name(0):
            raise KeyboardInterrupt
        return real_write(path, samples)

    monkeypatch.setattr(shard_format, "write_shard", killed_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(data, tmp_path / "resumed", resolution=RES, depth_model=str(tiny_depth_anything), shard_size=2)
    monkeypatch.setattr(shard_format, "write_shard", real_write)
    prepare_shards(data, tmp_path / "resumed", resolution=RES, depth_model=str(tiny_depth_anything), shard_size=2)
    assert shard_bytes(tmp_path / "resumed") == shard_bytes(tmp_path / "out")
    by_source = {s["source"]: s["disparity"] for s in ShardReader(tmp_path / "out")}
    assert torch.all(by_source["img0.png"] == 0.25)  # carried over: 1 / 4
    for name in ("img1.png", "img2.png", "img3.png"):
        assert by_source[name].shape == (RES, RES) and bool(torch.isfinite(by_source[name]).all())


def test_missing_transformers_is_one_line_naming_pip_install(mixed, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(PrepareError, match="pip install transformers"):
        prepare_shards(mixed, tmp_path / "out", resolution=RES, depth_model="Intel/dpt-hybrid-midas")


def test_tampered_or_truncated_index_is_one_clear_error(prepared, tmp_path):
    import shutil

    from vq3d_nerfstudio.data.shard_format import read_index

    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    text = (out / "index.json").read_text()
    (out / "index.json").write_text(text[: len(text) // 2])
    with pytest.raises(ShardError, match=r"index.json: truncated .*rerun `vq3d prepare --input <images> --output"):
        read_index(out)
    (out / "index.json").write_text(json.dumps(["not", "an", "index"]))
    with pytest.raises(ShardError, match="not a vq3d shard index"):
        read_index(out)


# ----------------------------------------------------------------------------------------------
# webdataset does the tar work: the writer's bytes, and streaming over http, pipe: and brace patterns


def test_writer_is_deterministic_ustar_byte_identical_to_the_former_writer(tmp_path):
    import tarfile

    samples = [
        shard_format.EncodedSample("00000000", 3, b"\x89PNG fake image" * 7, b"\x93NUMPY fake depth" * 11, "cats/ä b.png"),
        shard_format.EncodedSample("00000001", -1, bytes(range(256)) * 3, None, "dogs/x.jpg"),
    ]
    entry = shard_format.write_shard(tmp_path / "shard-000000.tar", samples)
    # sha256 of these samples as the hand-written tarfile (ustar) writer wrote them before webdataset
    former = "9a039c325937db2437125c1ac1564b41b472550c342fefb628f8b5e333874f5a"
    assert entry == {"name": "shard-000000.tar", "num_samples": 2, "num_bytes": 10240, "sha256": former}
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        members = tar.getmembers()
        assert not tar.pax_headers and all(not m.pax_headers for m in members)
        assert [m.name for m in members] == [
            "00000000.cls", "00000000.depth.npy", "00000000.png", "00000000.source.txt",
            "00000001.cls", "00000001.png", "00000001.source.txt",
        ]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in members} == {
            (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
        }
        assert tar.extractfile("00000000.source.txt").read().decode() == "cats/ä b.png"


def written_samples(root: Path):
    """``{key: (source, class_id, png bytes)}`` straight from the local tar files (tarfile, not the
    reader under test)."""
    import tarfile

    found = {}
    for path in sorted(root.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            if name.endswith(".cls"):
                key = name[: -len(".cls")]
                found[key] = (members[f"{key}.source.txt"].decode(), int(data), members[f"{key}.png"])
    return found


def assert_samples_are_the_written_ones(samples, written, mixed, keys=None):
    """Keys, sources, class ids and pixels equal what the writer put in the shards (and what
    ``load_image`` gives for the input): nothing lost, nothing twice, nothing else."""
    keys = sorted(written) if keys is None else keys
    assert sorted(s["key"] for s in samples) == keys
    for sample in samples:
        source, class_id, png = written[sample["key"]]
        assert sample["source"] == source and sample["class_id"] == class_id == GOOD[source]
        assert torch.equal(sample["image"], shard_format.decode_image(png))
        assert torch.equal(sample["image"], load_image(mixed / source, RES))


@pytest.fixture(scope="module")
def served(prepared, tmp_path_factory):
    """``prepared`` over http on 127.0.0.1 (a thread of http.server), plus a folder of the same
    shards without index.json; yields the base URL."""
    import functools
    import shutil
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    if shutil.which("curl") is None:
        pytest.skip("webdataset reads http(s) through curl, which is not installed")
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(prepared, site / "prepared")
    (site / "no-index").mkdir()
    shutil.copy(prepared / "shard-000000.tar", site / "no-index")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_shards_stream_over_http_as_written(prepared, mixed, served):
    written = written_samples(prepared)
    url = f"{served}/prepared"
    # raw members over http are the bytes in the local files
    for path in sorted(prepared.glob("shard-*.tar")):
        for _, raw in iter_shard_raw(f"{url}/{path.name}"):
            source, class_id, png = written[raw["__key__"]]
            assert raw["png"] == png and raw["source.txt"].decode() == source and int(raw["cls"]) == class_id
    # a folder URL: index.json fetched from beside the shards, every shard read
    reader = ShardReader(url + "/", verify=True)
    assert reader.class_names == ["cats", "dogs"] and reader.resolution == RES and len(reader) == len(GOOD)
    assert_samples_are_the_written_ones(list(reader), written, mixed)
    # a brace pattern: just those shards, in the pattern's order
    subset = ShardReader(f"{url}/shard-{{000001..000002}}.tar")
    in_subset = sorted(k for k in written if 4 <= int(k) < 12)
    assert [address.rsplit("/", 1)[1] for address, _ in subset.shards] == ["shard-000001.tar", "shard-000002.tar"]
    assert_samples_are_the_written_ones(list(subset), written, mixed, keys=in_subset)
    # two ranks, shuffled: disjoint, covering, as with local shards
    seen = [[s["key"] for s in ShardReader(url, rank=r, world_size=2, shuffle_buffer=5, epoch=2)] for r in range(2)]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(written)
    # shards without their index.json: one line naming the address tried and the fix
    missing = rf"^{served}/no-index/index.json: cannot read the shard index .*beside the shards"
    with pytest.raises(ShardError, match=missing):
        ShardReader(f"{served}/no-index/shard-000000.tar")


def test_shards_stream_through_pipe_and_local_brace_patterns(prepared, mixed, tmp_path):
    import shutil

    written = written_samples(prepared)
    piped = ShardReader(f"pipe:cat '{prepared}'/shard-{{000000..000003}}.tar", shuffle_buffer=4, seed=1)
    assert piped.source.index_url == f"pipe:cat '{prepared}'/index.json"
    assert_samples_are_the_written_ones(list(piped), written, mixed)
    local = ShardReader(f"{prepared}/shard-{{000000..000001}}.tar")
    assert_samples_are_the_written_ones(list(local), written, mixed, keys=sorted(k for k in written if int(k) < 8))
    # failures are one ShardError naming the shard or the source
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    (copy / "shard-000002.tar").unlink()
    with pytest.raises(ShardError, match=r"shard-000002.tar: unreadable shard"):
        list(ShardReader(f"pipe:cat {copy}/shard-{{000000..000003}}.tar"))
    with pytest.raises(ShardError, match="pipe: source must name the shards"):
        ShardReader(f"pipe:cat {copy}")
    with pytest.raises(ShardError, match=r"shard-000004.tar: shard-000004.tar is not a shard listed in .*index.json"):
        ShardReader(f"{copy}/shard-{{000003..000004}}.tar")

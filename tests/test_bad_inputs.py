"""Bad inputs where images and depth enter: property-based tests over generated images and depth
arrays (hypothesis), the awkward cases one by one, and training that skips a bad file (or, strict,
stops at it) instead of dying inside a DataLoader worker."""

import io
import itertools
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_image
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from vq3d_nerfstudio.data.datamanager import Vq3dDataManagerConfig
from vq3d_nerfstudio.data.dataparser import Vq3dImagesDataParserConfig
from vq3d_nerfstudio.data.dataset import Vq3dImageDataset, image_size_of, load_disparity, load_image
from vq3d_nerfstudio.data.folders import scan_image_folder
from vq3d_nerfstudio.data.workers import ErrorCarryingLoader
from vq3d_nerfstudio.errors import DatasetError

PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
WHITE = np.array([255.0, 255.0, 255.0])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder whose name has a space and non-ASCII letters: every generated file lands in it."""
    folder = tmp_path_factory.mktemp("bad") / "dätä ördner"
    folder.mkdir()
    return folder


# ---- images: properties ----------------------------------------------------------------------------

#: Which modes each format can store (what Pillow writes without converting).
MODES_BY_FORMAT = {
    "PNG": ["L", "LA", "RGB", "RGBA", "P", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "WEBP": ["RGB", "RGBA"],
    "TIFF": ["L", "LA", "RGB", "RGBA", "P", "I;16", "CMYK"],
}
CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4, "P": 1, "I;16": 1, "CMYK": 4}
PALETTE = np.random.default_rng(7).integers(0, 256, (256, 3), dtype=np.uint8)


def make_pil(mode: str, pixels: np.ndarray) -> Image.Image:
    """``pixels``: ``[H, W, C]`` (uint16 for I;16, palette indices for P, uint8 otherwise)."""
    height, width = pixels.shape[:2]
    if mode == "I;16":
        return Image.fromarray(pixels[..., 0].astype(np.uint16))
    if mode == "P":
        pil = Image.frombytes("P", (width, height), pixels[..., 0].astype(np.uint8).tobytes())
        pil.putpalette(PALETTE.reshape(-1).tolist())
        return pil
    return Image.frombytes(mode, (width, height), np.ascontiguousarray(pixels.astype(np.uint8)).tobytes())


def expected_rgb(mode: str, value: np.ndarray) -> np.ndarray:
    """The colour a uniform image of one pixel ``value`` must give, from the documented conversion."""
    v = value.astype(np.float64)
    if mode == "L":
        return np.repeat(v[:1], 3)
    if mode == "LA":
        return np.repeat(v[:1], 3) * v[1] / 255 + WHITE * (1 - v[1] / 255)
    if mode == "RGB":
        return v
    if mode == "RGBA":
        return v[:3] * v[3] / 255 + WHITE * (1 - v[3] / 255)
    if mode == "P":
        return PALETTE[int(v[0])].astype(np.float64)
    if mode == "I;16":
        return np.repeat(v[:1] / 65535 * 255, 3)
    if mode == "CMYK":  # R = 255 (1 - C)(1 - K), ...
        return 255 * (1 - v[:3] / 255) * (1 - v[3] / 255)
    raise AssertionError(mode)


@st.composite
def image_cases(draw):
    fmt = draw(st.sampled_from(sorted(MODES_BY_FORMAT)))
    mode = draw(st.sampled_from(MODES_BY_FORMAT[fmt]))
    width = draw(st.sampled_from([1, 2, 3, 5, 8, 17, 31]))
    height = draw(st.sampled_from([1, 2, 4, 9, 16, 23]))
    top = 65535 if mode == "I;16" else 255
    if mode == "CMYK" and fmt == "JPEG":  # lossy + K: keep the colour on the C/M/Y or the K axis
        c, m, y, k = (draw(st.integers(0, 255)) for _ in range(4))
        colour = draw(st.sampled_from([(c, m, y, 0), (0, 0, 0, k)]))
    else:
        colour = tuple(draw(st.integers(0, top)) for _ in range(CHANNELS[mode]))
    uniform = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    size = draw(st.sampled_from([1, 4, 7, 16]))
    return fmt, mode, width, height, np.array(colour), uniform, seed, size


@PROPERTY_SETTINGS
@given(case=image_cases())
def test_any_image_loads_as_rgb_in_range_and_keeps_its_colour(workdir, case):
    fmt, mode, width, height, colour, uniform, seed, size = case
    if uniform:
        pixels = np.broadcast_to(colour, (height, width, len(colour)))
    else:
        top = 65536 if mode == "I;16" else 256
        pixels = np.random.default_rng(seed).integers(0, top, (height, width, len(colour)))
    path = workdir / f"bild {fmt.lower()}.{fmt.lower()}"
    options = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    make_pil(mode, pixels).save(path, format=fmt, **options)
    image = load_image(path, size)
    assert image.shape == (size, size, 3) and image.dtype == torch.float32
    assert bool(torch.isfinite(image).all()) and float(image.min()) >= 0 and float(image.max()) <= 1
    if uniform:
        tolerance = 4.0 if fmt == "JPEG" else 1.0  # bicubic resize of a constant, rounding; JPEG's colour transform
        want = expected_rgb(mode, colour)
        assert np.abs(image.numpy() * 255 - want).max() <= tolerance, (want, image[0, 0] * 255)


# ---- images: the awkward cases one by one ------------------------------------------------------------


def test_dark_16_bit_image_stays_dark_and_32_bit_integer_or_float_images_follow_their_range(workdir):
    Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(workdir / "dark16.png")
    assert torch.allclose(load_image(workdir / "dark16.png", 2), torch.tensor(round(1000 / 65535 * 255) / 255))
    Image.fromarray(np.full((4, 4), 30000, np.int32)).save(workdir / "int32.tif")  # mode I holding 16-bit data
    assert torch.allclose(load_image(workdir / "int32.tif", 2), torch.tensor(round(30000 / 65535 * 255) / 255))
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(workdir / "int32big.tif")
    with pytest.raises(DatasetError, match=r"int32big\.tif: 32-bit integer image with values 70000\.\.70000.*PNG"):
        load_image(workdir / "int32big.tif", 2)
    Image.fromarray(np.full((4, 4), 0.25, np.float32)).save(workdir / "float.tif")
    assert torch.allclose(load_image(workdir / "float.tif", 2), torch.tensor(round(0.25 * 255) / 255))
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(workdir / "nan.tif")
    with pytest.raises(DatasetError, match=r"nan\.tif: float image .*NaN/inf"):
        load_image(workdir / "nan.tif", 2)


def test_transparency_is_composited_over_white(workdir):
    clear_red = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # the stored colour of a clear pixel never shows
    clear_red.save(workdir / "clear.png")
    assert torch.equal(load_image(workdir / "clear.png", 2), torch.ones(2, 2, 3))
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(workdir / "keyed.png", transparency=1)  # palette index 1 (blue) is transparent
    assert torch.equal(load_image(workdir / "keyed.png", 2), torch.ones(2, 2, 3))
    Image.new("LA", (4, 4), (0, 255)).save(workdir / "opaque_la.png")
    assert torch.equal(load_image(workdir / "opaque_la.png", 2), torch.zeros(2, 2, 3))


def test_unreadable_files_are_one_error_naming_the_file_and_the_fix(workdir):
    (workdir / "leer.png").write_bytes(b"")
    (workdir / "text.jpg").write_text("not a JPEG")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(workdir / "whole.png")
    data = (workdir / "whole.png").read_bytes()
    (workdir / "halb.png").write_bytes(data[: len(data) // 2])
    Image.new("LAB", (4, 4)).save(workdir / "lab.tif")
    loop = workdir / "loop.png"
    if not loop.is_symlink():
        os.symlink(loop.name, loop)
    cases = {
        "leer.png": r"empty file, 0 bytes",
        "text.jpg": r"cannot identify the image format",
        "halb.png": r"truncated|broken|damaged|error",
        "lab.tif": r"colour mode LAB is not supported",
        "loop.png": r"Too many levels of symbolic links",
        "missing.png": r"No such file",
    }
    for name, reason in cases.items():
        with pytest.raises(DatasetError) as caught:
            load_image(workdir / name, 8)
        message = str(caught.value)
        assert message.startswith(f"{workdir / name}: ") and "\n" not in message, message
        assert re.search(reason, message, re.IGNORECASE), message


def test_decompression_bomb_is_a_dataset_error_with_the_pixel_count(workdir, monkeypatch):
    Image.new("L", (100, 100)).save(workdir / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels > 2 x limit: Pillow refuses
    for read in (lambda p: load_image(p, 4), image_size_of):
        with pytest.raises(DatasetError, match=r"bomb\.png: cannot read image \(10,000 pixels, over .*2,000.*downscale"):
            read(workdir / "bomb.png")


def test_exif_rotation_one_pixel_wide_and_tall_images(workdir):
    tall = np.zeros((1, 3, 3), np.uint8)  # 3 wide x 1 high, stored; EXIF 6 shows it 1 wide x 3 high
    tall[0, 1] = (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(tall).save(workdir / "rotated.png", exif=exif)
    assert image_size_of(workdir / "rotated.png") == (3, 1)
    assert torch.allclose(load_image(workdir / "rotated.png", 3), torch.tensor([0.0, 1.0, 0.0]).expand(3, 3, 3))
    write_image(workdir / "one.png", size=(1, 1), color=(9, 99, 199))
    assert torch.allclose(load_image(workdir / "one.png", 5), torch.tensor([9, 99, 199]) / 255.0, atol=1 / 255)


# ---- depth: properties -------------------------------------------------------------------------------

NUMERIC_DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
REFUSED_DTYPES = ["bool", "complex64", "U3", np.dtype([("depth", "f4"), ("conf", "u1")])]
SPECIAL = [0.0, -0.0, -1.0, np.nan, np.inf, -np.inf, 1e-45, 1e-39, 1.2e-38, 3.4e38, 1e39, -1e39]


@st.composite
def depth_cases(draw):
    height, width = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    dtype = np.dtype(draw(st.sampled_from(NUMERIC_DTYPES + REFUSED_DTYPES)))
    values = draw(arrays(dtype, (height, width)))
    if dtype.kind == "f":  # sprinkle the values that matter for the rule
        sprinkle = draw(arrays(np.bool_, (height, width)))
        specials = draw(arrays(np.float64, (height, width), elements=st.sampled_from(SPECIAL)))
        with np.errstate(over="ignore"):
            values = np.where(sprinkle, specials.astype(dtype), values)
    layout = draw(st.sampled_from(["hw", "hw1", "hw3", "flat", "wrong_size"]))
    kind = draw(st.sampled_from(["z-depth", "disparity"]))
    factor = draw(st.sampled_from([1, 1, 2, 3]))  # the crop is shrunk by this (area averaging)
    return values, layout, kind, factor


def expected_validity(values: np.ndarray, kind: str):
    """The documented rule, computed here independently: ``(disparity, valid)`` as float64 / bool."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        v = values.astype(np.float32).astype(np.float64)  # "converted to float32 first"
        if kind == "z-depth":
            valid = v >= 1.1754943508222875e-38  # float32's smallest normal number
            disparity = np.where(valid, 1.0 / np.where(valid, v, 1.0), 0.0)  # 1/inf = 0
        else:
            valid = np.isfinite(v)
            disparity = np.where(valid, v, 0.0)
    return disparity, valid


@PROPERTY_SETTINGS
@given(case=depth_cases())
def test_depth_gives_finite_disparity_and_the_documented_mask_or_one_error(workdir, case):
    values, layout, kind, factor = case
    height, width = values.shape
    stored = {"hw": values, "hw1": values[..., None], "hw3": np.repeat(values[..., None], 3, -1),
              "flat": values.reshape(-1), "wrong_size": values}[layout]
    image_hw = (height + 1, width) if layout == "wrong_size" else (height, width)
    path = workdir / "tiefe ü.npy"
    np.save(path, stored)
    side = min(height, width)
    size = side // factor if side % factor == 0 else side
    numeric = values.dtype.kind in "fiu"
    no_valid_pixel = numeric and not expected_validity(values, kind)[1].any()  # a file that supervises nothing
    refused = not numeric or layout in ("hw3", "flat", "wrong_size") or no_valid_pixel
    if refused:
        with pytest.raises(DatasetError) as caught:
            load_disparity(path, kind, image_hw, size)
        assert str(caught.value).startswith(f"{path}: ") and "; save " in str(caught.value)  # the file, then the fix
    else:
        disparity, mask = load_disparity(path, kind, image_hw, size)
        assert disparity.shape == mask.shape == (size, size, 1) and disparity.dtype == torch.float32 and mask.dtype == torch.bool
        assert bool(torch.isfinite(disparity).all()) and bool((disparity[~mask] == 0).all())
        want_disp, want_valid = expected_validity(values, kind)
        top, left = (height - side) // 2, (width - side) // 2
        crop_disp = want_disp[top : top + side, left : left + side]
        crop_valid = want_valid[top : top + side, left : left + side]
        # an output pixel is valid iff its whole factor x factor block is; its value is the block's mean
        blocks = lambda a: a.reshape(size, side // size, size, side // size).swapaxes(1, 2).reshape(size, size, -1)  # noqa: E731
        block_valid = blocks(crop_valid).all(-1)
        assert np.array_equal(mask[..., 0].numpy(), block_valid)
        block_mean = blocks(crop_disp).mean(-1)
        got = disparity[..., 0].numpy().astype(np.float64)
        assert np.allclose(got[block_valid], block_mean[block_valid], rtol=1e-5, atol=1e-30)


def test_depth_files_that_are_not_numeric_npy_arrays_are_one_error(workdir):
    np.save(workdir / "objects.npy", np.array([[1.0, None]], dtype=object), allow_pickle=True)
    np.savez(workdir / "archive.npz", depth=np.ones((2, 2)))
    (workdir / "archive.npz").rename(workdir / "archive.npy")
    (workdir / "text.npy").write_text("1 2\n3 4\n")
    (workdir / "empty.npy").write_bytes(b"")
    np.save(workdir / "full.npy", np.ones((20, 20), np.float32))
    (workdir / "cut.npy").write_bytes((workdir / "full.npy").read_bytes()[:200])
    cases = {
        "objects.npy": "object array", "archive.npy": ".npz archive", "text.npy": "no NumPy .npy header",
        "empty.npy": "empty file", "cut.npy": "damaged or truncated", "absent.npy": "No such file",
    }
    for name, reason in cases.items():
        with pytest.raises(DatasetError) as caught:
            load_disparity(workdir / name, "z-depth", (1, 2), 1)
        assert str(caught.value).startswith(f"{workdir / name}: ") and reason in str(caught.value), str(caught.value)


def test_integer_depth_in_millimetres_is_converted():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mm.npy"
        np.save(path, np.array([[0, 500], [2000, 65535]], np.uint16))
        disparity, mask = load_disparity(path, "z-depth", (2, 2), 2)
    assert mask[..., 0].tolist() == [[False, True], [True, True]]  # 0 = no measurement
    assert torch.allclose(disparity[..., 0], torch.tensor([[0.0, 1 / 500], [1 / 2000, 1 / 65535]]))


@pytest.mark.parametrize("values, kind, what", [
    (np.full((3, 4), np.nan, np.float32), "z-depth", "all 12 values are NaN"),
    (np.zeros((3, 4), np.uint16), "z-depth", "all 12 values are zero"),
    (np.full((3, 4), -1.5, np.float32), "z-depth", "all 12 values are negative"),
    (np.array([[np.nan, 0.0, -2.0, 0.0]] * 3, np.float32), "z-depth", "3 NaN, 6 zero, 3 negative of 12 values"),
    (np.full((3, 4), np.inf, np.float32), "disparity", "all 12 values are +inf"),
])
def test_depth_without_one_valid_pixel_is_a_bad_file(workdir, values, kind, what):
    path = workdir / "leere tiefe.npy"
    np.save(path, values)
    with pytest.raises(DatasetError) as caught:
        load_disparity(path, kind, (3, 4), 3)
    message = str(caught.value)
    assert message.startswith(f"{path}: depth has no valid pixel ({what}); ") and "\n" not in message
    assert ("OpenGL camera-space z" in message) == ("negative" in what)  # what a user with OpenGL z wrote


def test_one_valid_pixel_is_enough_for_a_depth_file(workdir):
    path = workdir / "fast leer.npy"
    values = np.full((3, 3), -1.0, np.float32)
    values[1, 2] = 4.0
    np.save(path, values)
    disparity, mask = load_disparity(path, "z-depth", (3, 3), 3)
    assert mask[..., 0].nonzero().tolist() == [[1, 2]] and float(disparity[1, 2, 0]) == 0.25  # 1 / 4


# ---- folders -------------------------------------------------------------------------------------------


def test_scan_survives_symlink_loops_and_keeps_unicode_paths(tmp_path):
    root = tmp_path / "fötos mit leer"
    write_image(root / "käfer" / "bild 1.png")
    write_image(root / "käfer" / "tief" / "bild 2.png")
    os.symlink("..", root / "käfer" / "tief" / "zurück")  # a directory loop
    os.symlink("self.png", root / "käfer" / "self.png")  # a file loop
    os.symlink("nowhere.png", root / "käfer" / "weg.png")  # broken
    records, names, _ = scan_image_folder(root)
    assert names == ["käfer"]
    keys = sorted(r.key for r in records)
    assert keys == ["käfer/bild 1.png", "käfer/self.png", "käfer/tief/bild 2.png", "käfer/weg.png"]
    broken = [r.image for r in records if r.image.name in ("self.png", "weg.png")]
    for path in broken:  # listed, so reading reports them instead of losing them silently
        with pytest.raises(DatasetError, match=re.escape(str(path))):
            load_image(path, 4)


def test_folder_without_images_says_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "photo.heic").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"no images found \(it holds 2 other entries \(notes\.txt, photo\.heic\), "
                                           r"none an image\); put \.jpg"):
        scan_image_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"empty: no images found \(it is empty\)"):
        scan_image_folder(empty)
    write_image(tmp_path / "a.png")
    (tmp_path / "vq3d_meta.json").write_text("{depth_kind: z}")
    with pytest.raises(DatasetError, match=r"vq3d_meta\.json: not a JSON object"):
        scan_image_folder(tmp_path)


# ---- training: skip and report, or strict --------------------------------------------------------------

GOOD_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
BAD_NAMES = ["kaputt.png", "leer.jpg", "kein bild.png"]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Four good single-colour images and three bad files, in a folder with a non-ASCII name."""
    root = tmp_path_factory.mktemp("train") / "bilder ä"
    for i, colour in enumerate(GOOD_COLOURS):
        write_image(root / f"gut{i}.png", size=(12, 12), color=colour)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    (root / "kaputt.png").write_bytes(buffer.getvalue()[:300])
    (root / "leer.jpg").write_bytes(b"")
    (root / "kein bild.png").write_text("hello")
    return root


def datamanager(data, **kwargs):
    parser = Vq3dImagesDataParserConfig(image_size=8, eval_fraction=0.0)
    config = Vq3dDataManagerConfig(dataparser=parser, data=data, images_per_batch=3, rays_per_image=4, **kwargs)
    return config.setup(device="cpu", test_mode="val")


def test_dataset_replaces_a_bad_item_with_the_next_readable_one(mixed_folder):
    outputs = Vq3dImagesDataParserConfig(data=mixed_folder, image_size=8, eval_fraction=0.0).setup().get_dataparser_outputs("train")
    dataset = Vq3dImageDataset(outputs)
    names = [p.name for p in outputs.image_filenames]
    bad = names.index("kaputt.png")
    item = dataset[bad]
    assert names[item["image_idx"]] not in BAD_NAMES
    assert "kaputt.png\t" in item["skipped"] and "kaputt.png: cannot read image" in item["skipped"]
    assert dataset[names.index("gut0.png")]["skipped"] == ""
    with pytest.raises(DatasetError, match="kaputt.png: cannot read image"):
        dataset.get_data(bad)  # the exact item, as the viewer asks for it
    dataset.strict = True
    with pytest.raises(DatasetError, match="kaputt.png: cannot read image"):
        dataset[bad]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_skips_bad_files_and_reports_each_once(mixed_folder, num_workers, capsys):
    dm = datamanager(mixed_folder, num_workers=num_workers)
    dm.setup_train()
    colours = torch.tensor(GOOD_COLOURS, dtype=torch.float32) / 255
    for step in range(8):  # 7 images, 2 full batches of 3 per epoch: every file is asked for within a few epochs
        _, batch = dm.next_train(step)
        pixels = batch["input_images"].permute(0, 2, 3, 1).reshape(-1, 3)
        assert bool(torch.cdist(pixels, colours).min(dim=1).values.lt(1e-3).all())  # only good images reach the model
        assert "skipped" not in batch
    assert sorted(Path(p).name for p in dm.skipped_files) == sorted(BAD_NAMES)
    err = capsys.readouterr().err
    for name in BAD_NAMES:
        lines = [line for line in err.splitlines() if f"{name}: cannot read image" in line]
        assert len(lines) == 1, err  # once per file, however often it is met
        assert lines[0].startswith("vq3d: warning: skipped ") and "so far" in lines[0]
    assert "3 bad files so far" in err


@pytest.mark.parametrize("num_workers", [0, 1])
def test_strict_training_stops_at_the_first_bad_file_in_one_line(mixed_folder, num_workers):
    dm = datamanager(mixed_folder, num_workers=num_workers, strict=True)
    dm.setup_train()
    with pytest.raises(DatasetError) as caught:  # the trainer prints it after "vq3d: error: "
        for step in range(8):
            dm.next_train(step)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message and "DataLoader worker" not in message
    assert any(f"{name}: cannot read image" in message for name in BAD_NAMES) and "--pipeline.datamanager.strict" in message


def test_nothing_readable_stops_with_one_line(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.png").write_text("no")
    dm = datamanager(tmp_path, num_workers=0)
    dm.setup_train()
    with pytest.raises(DatasetError, match=r"bad\d\.png: cannot read image .* - and the 2 images after it"):
        dm.next_train(0)


class _BadThird(torch.utils.data.Dataset):
    """Items 0, 1, 3, ...: a number; item 2: a DatasetError (raised in whichever process reads it)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == 2:
            raise DatasetError("c.png: cannot read image (truncated); delete or replace the file")
        return torch.tensor(float(i))


class _MemberError(DatasetError):
    """A DatasetError whose __init__ takes other arguments than its message (as IndexDamagedError's)."""

    def __init__(self, shard: str, member: str):
        self.member = member
        super().__init__(f"{shard}: member {member} cannot be decoded")


class _BadStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from (torch.tensor(0.0), torch.tensor(1.0))
        raise _MemberError("shard-000001.tar", "7.png")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_workers_error_reaches_the_main_process_as_itself(num_workers):
    """torch's own DataLoader re-raises a worker's DatasetError with the worker's whole traceback as
    its message; ErrorCarryingLoader raises the worker's exception: same class, same message."""
    loader = ErrorCarryingLoader(_BadThird(), batch_size=2, num_workers=num_workers)
    batches = iter(loader)
    assert next(batches).tolist() == [0.0, 1.0]  # the batches before the bad item arrive as usual
    with pytest.raises(DatasetError) as caught:
        next(batches)
    assert type(caught.value) is DatasetError
    assert str(caught.value) == "c.png: cannot read image (truncated); delete or replace the file"
    stream = iter(ErrorCarryingLoader(_BadStream(), batch_size=1, num_workers=num_workers))
    assert [next(stream).tolist(), next(stream).tolist()] == [[0.0], [1.0]]
    with pytest.raises(_MemberError) as caught:
        next(stream)
    assert str(caught.value) == "shard-000001.tar: member 7.png cannot be decoded" and caught.value.member == "7.png"


def depth_folder(root: Path, depths) -> Path:
    """One 16x16 image per depth array (z-depth, declared in vq3d_meta.json), named 0.png, 1.png, ..."""
    root.mkdir(parents=True)
    (root / "vq3d_meta.json").write_text('{"depth_kind": "z-depth"}')
    for i, depth in enumerate(depths):
        write_image(root / f"{i}.png", size=(16, 16), color=GOOD_COLOURS[i % len(GOOD_COLOURS)])
        np.save(root / f"{i}.npy", depth)
    return root


def test_training_skips_a_depth_without_valid_pixels_like_a_bad_image_and_strict_stops(tmp_path, capsys):
    good = np.full((16, 16), 2.0, np.float32)
    opengl = np.full((16, 16), -2.0, np.float32)  # camera-space z of OpenGL: negative in front of the camera
    root = depth_folder(tmp_path / "tiefe", [good, good, opengl, good])
    dm = datamanager(root, num_workers=0)
    dm.setup_train()
    for step in range(4):  # 4 images, batches of 3: every file is asked for
        _, batch = dm.next_train(step)
        assert bool(batch["disparity_mask"].all())  # only the good depth reaches the model
    assert [Path(p).name for p in dm.skipped_files] == ["2.png"]
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "2.npy: depth has no valid pixel" in line]
    assert len(lines) == 1 and lines[0].startswith("vq3d: warning: skipped ") and "1 bad file so far" in lines[0]
    assert "(all 256 values are negative); negative z-depth looks like OpenGL camera-space z" in lines[0]
    strict = datamanager(root, num_workers=0, strict=True)
    strict.setup_train()
    with pytest.raises(DatasetError, match=r"2\.npy: depth has no valid pixel .*--pipeline\.datamanager\.strict"):
        for step in range(4):
            strict.next_train(step)


def test_almost_no_valid_depth_in_the_batches_warns_once_with_the_fraction(tmp_path, capsys):
    from vq3d_nerfstudio.data.dataset import DepthCoverage

    coverage = DepthCoverage("z-depth")
    mask = torch.zeros(2, 10, 10, 1, dtype=torch.bool)
    mask[0, 3, 4] = True  # 1 valid pixel of 2 x 10 x 10 = 200: 0.50%
    coverage.add({"disparity_mask": mask})
    coverage.add({"disparity_mask": mask})
    err = capsys.readouterr().err
    assert err.count("vq3d: warning:") == 1 and "only 0.50% of the depth pixels in the batches so far are valid (1 of 200)" in err
    assert "OpenGL camera-space z" in err
    fine = DepthCoverage("disparity")
    fine.add({"disparity_mask": torch.ones(2, 10, 10, 1, dtype=torch.bool)})
    fine.add({})  # a batch without depth counts nothing
    assert capsys.readouterr().err == "" and (fine.valid, fine.total) == (200, 200)
    # Through the datamanager: each file has one valid pixel (so it is not refused), which the 2x
    # shrink to 8 px averages away (an output pixel needs its whole 2x2 block valid): 0% valid.
    sparse = np.full((16, 16), np.nan, np.float32)
    sparse[5, 5] = 3.0
    dm = datamanager(depth_folder(tmp_path / "duenn", [sparse] * 3), num_workers=0)
    dm.setup_train()
    for step in range(3):
        dm.next_train(step)
    err = capsys.readouterr().err
    assert err.count("vq3d: warning: only 0.00% of the depth pixels") == 1 and "(0 of 192)" in err  # 3 images x 8 x 8


def test_eval_batches_and_eval_images_skip_too(mixed_folder, capsys):
    dm = datamanager(mixed_folder, num_workers=0)
    dm.setup_eval()
    for step in itertools.count():
        dm.next_eval(step)
        dm.next_eval_image(step)
        if len(dm.skipped_files) == len(BAD_NAMES) or step > 50:
            break
    assert sorted(Path(p).name for p in dm.skipped_files) == sorted(BAD_NAMES)

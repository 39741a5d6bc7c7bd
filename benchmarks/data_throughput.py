"""Benchmark: data throughput. `vq3d prepare` images/s on photo-sized JPEGs, and the streaming
datamanager's training images/s from prepared shards against the plain-folder datamanager, both
compared with what `vq3d-tiny` training consumes.

1. Makes `--num-images` real-photo JPEGs (~640x480, quality 90) in ImageNet-style class folders:
   random crops, flips and colour gains of the photos shipped with scikit-image and scikit-learn
   (one class per source photo), so every file is a distinct photo-like JPEG.
2. `vq3d prepare` (the function the command runs, in this process, with the command's default
   number of decoding workers) at each `--resolutions`, without a depth model.
3. `next_train` batches per second x images per batch, after a warm-up, for the plain folder and
   the shards: at 64 px with `vq3d-tiny`'s datamanager settings (8 images x 256 rays per step, 1
   loader worker) and at 256 px with `vq3d`'s batch (8 images x 1024 rays) on 1 loader worker; CPU
   time of this process and its loader worker per image. Epoch boundaries are crossed
   (`--num-batches` x 8 > `--num-images`).

The training consumption to beat is `vq3d-tiny`'s images/s from the train-tiny section of
BENCHMARKS.md (measured by benchmarks/train_tiny.py). Prints a table and rewrites its section of
BENCHMARKS.md (`VQ3D_BENCHMARKS_MD=/tmp/x.md` for a dry run).

    .venv/bin/python benchmarks/data_throughput.py [--num-images 300] [--num-batches 100]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from common import BENCHMARKS_MD, REPO, git_revision, machine, update_section

TINY_IMAGES_PER_S = 27.6  # fallback when BENCHMARKS.md has no train-tiny section


def source_photos() -> dict:
    """name -> [H, W, 3] uint8 photo, from the images scikit-image and scikit-learn ship."""
    from skimage import data as skdata

    photos = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                 "camera", "moon", "grass", "gravel", "brick", "clock", "coins"):
        image = getattr(skdata, name)()
        photos[name] = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    try:
        from sklearn.datasets import load_sample_images

        for name, image in zip(("china", "flower"), load_sample_images().images):
            photos[name] = image
    except ImportError:
        pass
    return photos


def make_photos(folder: Path, num_images: int, seed: int = 0) -> float:
    """Write ``num_images`` distinct ~640x480 JPEGs into class folders; returns mean file size (KB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = source_photos()
    names = sorted(photos)
    sizes = []
    for i in range(num_images):
        name = names[i % len(names)]
        image = photos[name]
        h, w = image.shape[:2]
        portrait = rng.random() < 0.2
        aspect = 3 / 4 if portrait else 4 / 3
        scale = rng.uniform(0.5, 1.0)
        ch = int(min(h, w / aspect) * scale)
        cw = int(ch * aspect)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = image[top : top + ch, left : left + cw].astype(np.float32)
        crop = crop * rng.uniform(0.8, 1.2, size=3) + rng.normal(0, 2.0, size=crop.shape)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        pil = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8))
        pil = pil.resize((480, 640) if portrait else (640, 480), Image.Resampling.BICUBIC)
        path = folder / name / f"{name}_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        pil.save(path, quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def tiny_training_rate() -> tuple:
    """``(images/s, where it came from)`` of vq3d-tiny training (the repository's BENCHMARKS.md,
    also when VQ3D_BENCHMARKS_MD redirects the output)."""
    for path in (REPO / "BENCHMARKS.md", BENCHMARKS_MD):
        if path.exists():
            text = path.read_text()
            match = re.search(r"<!-- train-tiny -->.*?\| images / s \| ([0-9.]+) \|", text, re.S)
            if match:
                return float(match.group(1)), "the train-tiny section of BENCHMARKS.md"
    return TINY_IMAGES_PER_S, "the value recorded when this benchmark was written; no train-tiny section found"


def tree_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def measure_prepare(photos: Path, out: Path, resolution: int, num_images: int) -> dict:
    from vq3d_nerfstudio.data.prepare import prepare_shards

    workers = min(4, os.cpu_count() or 1)  # `vq3d prepare`'s default
    warm = out.parent / f"{out.name}_warmup"  # first-call costs (imports, codecs) are not throughput
    warm.mkdir(parents=True, exist_ok=True)
    (warm / "list.txt").write_text("".join(f"{p}\n" for p in sorted(photos.rglob("*.jpg"))[:16]))
    prepare_shards(warm / "list.txt", warm / "out", resolution=resolution, num_workers=workers)
    shutil.rmtree(warm)
    start = time.perf_counter()
    index = prepare_shards(photos, out, resolution=resolution, num_workers=workers)
    wall = time.perf_counter() - start
    assert index["num_samples"] == num_images, index["num_skipped"]
    size = sum(s["num_bytes"] for s in index["shards"])
    return {"wall": wall, "rate": num_images / wall, "kb_per_image": size / num_images / 1024, "workers": workers}


def measure_datamanager(data: Path, preset: str, resolution: int, num_batches: int, warmup: int = 5) -> dict:
    """next_train batches/s x images per batch, with the preset's datamanager at ``resolution``."""
    import torch

    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config(preset).pipeline.datamanager
    config.data = data
    config.dataparser.image_size = resolution
    config.num_workers = 1
    datamanager = config.setup(device="cpu", test_mode="val")
    for step in range(warmup):
        datamanager.next_train(step)
    proc = psutil.Process()
    cpu0, start = tree_cpu(proc), time.perf_counter()
    with torch.no_grad():
        for step in range(warmup, warmup + num_batches):
            datamanager.next_train(step)
    wall = time.perf_counter() - start
    cpu = tree_cpu(proc) - cpu0
    images = num_batches * config.images_per_batch
    datamanager.iter_train_image_dataloader.close()  # stops the loader worker
    return {
        "rate": images / wall,
        "cpu_ms": 1000 * cpu / images,
        "batch": f"{config.images_per_batch} x {config.rays_per_image} rays",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=300, help="photos to generate and prepare")
    parser.add_argument("--num-batches", type=int, default=100, help="timed next_train batches per datamanager")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--keep", type=Path, default=None, help="keep the photos and shards in this folder")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="vq3d_data_bench_")) if args.keep is None else args.keep
    try:
        photos = work / "photos"
        if photos.exists():
            shutil.rmtree(photos)
        kb = make_photos(photos, args.num_images)
        print(f"{args.num_images} JPEGs, ~640x480, mean {kb:.0f} KB, in {photos}", flush=True)
        tiny_rate, tiny_from = tiny_training_rate()
        prepared, rows = {}, []
        for res in args.resolutions:
            out = work / f"shards_{res}"
            if out.exists():
                shutil.rmtree(out)
            result = measure_prepare(photos, out, res, args.num_images)
            prepared[res] = out
            print(f"prepare {res} px: {result['rate']:.1f} images/s", flush=True)
            rows.append(
                f"| `vq3d prepare`, {res} px, no depth model ({result['workers']} decoding workers) | "
                f"{result['rate']:.1f} | - | {result['kb_per_image']:.0f} KB / image written | - |"
            )
        settings = {64: "vq3d-tiny", 256: "vq3d"}
        for res in args.resolutions:
            preset = settings.get(res)
            if preset is None:
                continue
            for label, data in (("plain folder (JPEG decode + resize)", photos), ("prepared shards", prepared[res])):
                result = measure_datamanager(data, preset, res, args.num_batches)
                ratio = f"{result['rate'] / tiny_rate:.1f}x" if preset == "vq3d-tiny" else "-"
                print(f"datamanager {label} {res} px: {result['rate']:.1f} images/s", flush=True)
                rows.append(
                    f"| datamanager, {label}, {res} px, `{preset}` batch ({result['batch']}), 1 loader worker | "
                    f"{result['rate']:.1f} | {result['cpu_ms']:.1f} | - | {ratio} |"
                )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    table = "\n".join(
        ["| what | images/s | CPU ms / image | output | vs `vq3d-tiny` training |", "|---|---|---|---|---|", *rows]
    )
    body = f"""## Data throughput: `vq3d prepare` and the streaming datamanager

{table}

- `vq3d-tiny` training consumes {tiny_rate:.1f} images/s on this machine ({tiny_from}); the last column is the
  datamanager's rate over that. The datamanager rows time `next_train` (loading, batching and ray
  generation for 8 images) as fast as it goes, with one DataLoader worker; 'CPU ms / image' is the
  CPU time of this process and its worker per image, i.e. what data loading takes from the cores
  training also needs.
- Inputs: {args.num_images} distinct JPEGs (~640x480, quality 90, mean {kb:.0f} KB; crops, flips and colour
  gains of the scikit-image / scikit-learn sample photos) in class folders. `vq3d prepare` is timed
  in-process after a warm-up run (the function the command runs, its decoding pool included,
  Python start-up excluded), writing PNG shards without depth (a depth model adds its own time,
  normally on a GPU).
- The datamanager runs {args.num_batches} timed batches after 5 warm-up batches, crossing epoch boundaries.

Machine: {machine()}. Revision {git_revision()}. Run here (CPU).

Command: `.venv/bin/python benchmarks/data_throughput.py --num-images {args.num_images} --num-batches {args.num_batches}`"""
    print(body)
    update_section("data-throughput", body)
    print(f"wrote the data-throughput section of {BENCHMARKS_MD}")


if __name__ == "__main__":
    main()

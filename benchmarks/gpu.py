"""Benchmark: what this project does on one CUDA GPU, in one command (under 9 minutes on an H200).

1. Versions: Python, torch, CUDA, the GPU, nerfstudio, this project; the GPU's matrix-product rates
   (fp16 and fp32 as torch runs them), the ceilings model FLOPs utilisation is measured against.
2. The tests marked ``cuda`` (``pytest -m cuda``: mixed-precision training steps, the CUDA data path,
   the GPU render against the CPU one, stage 2 on the GPU, gsplat refinement of a splat export).
3. ``vq3d`` (the paper preset, 256 px) on ``vq3d synth --resolution 256`` scenes: seconds per step,
   images/s, peak GPU memory at the preset's batch (8 images) with mixed precision on and off, once
   the GAN and LPIPS are on, and at the largest batch that fits (doubling until out of memory);
   model FLOPs utilisation against `benchmarks/model_cost.py`'s count of a training image. LPIPS-VGG
   runs on randomly initialised VGG16 weights (same FLOPs; no download here).
4. ``vq3d-tiny`` trained on the GPU for a wall-clock budget (the steps measured first, the schedule
   set to that many steps), a checkpoint every fifth, each scored by ``vq3d eval`` on the unseen
   ``vq3d synth --seed 1`` scenes the CPU tables use: does the tiny preset keep improving with many
   times the CPU's 1650 steps, and where does it stop?
5. Stage 2: training tokens/s and KV-cache sampling images/s of the ``paper`` transformer over
   ``vq3d``'s 32x32 grid (random tokens: speed does not depend on them), and ``vq3d-train-stage2
   --model tiny`` on the tiny run's own tokens (held-out bits per token).
6. Writes ``gpu.json`` (every figure), ``gpu_section.md`` (the BENCHMARKS.md section), the tiny run's
   model (``vq3d-tiny-gpu.tar``: config.yml and the last checkpoint without optimizer state) and logs
   into ``--output-dir``, and rewrites BENCHMARKS.md's section in this checkout.

Each part that fails is recorded (its error in gpu.json and the section) and the next one runs.

On a machine without nerfstudio and without network: ``make gpu-wheels`` (on a machine with network)
downloads what training, eval and this script import into ``.whl/``; this script installs the ones
that are missing with ``pip install --no-index --no-deps --target`` before it starts.

    python benchmarks/gpu.py --output-dir gpu_out             # on the GPU machine (python3 with torch)
    python benchmarks/gpu.py --device cpu --smoke --output-dir /tmp/gpu_smoke   # same code, seconds
    python benchmarks/gpu.py --publish gpu_out/gpu.json        # rewrite BENCHMARKS.md from the figures
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "gpu"
#: Importable names that the wheels provide, checked after installing them.
REQUIRED_MODULES = ("nerfstudio", "tyro", "viser", "nerfacc", "gsplat", "webdataset", "plyfile", "torchmetrics")


# ---- set-up on a bare machine (standard library only) ------------------------------------------------


def _dist_name(wheel: Path) -> str:
    """The normalised distribution name of a wheel file (PEP 427: ``name-version-...whl``)."""
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def checkout_project():
    """pyproject.toml's ``[project]`` table, or None where Python (< 3.11) has no TOML reader."""
    try:
        import tomllib
    except ImportError:
        return None
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def register_checkout(target: Path) -> None:
    """Make this checkout an installed distribution for importlib.metadata (what ``pip install -e .``
    records, without building anything): its version and entry points, read from pyproject.toml, in
    ``target/<name>-<version>.dist-info``. nerfstudio finds the ``vq3d`` methods through those entry
    points (``eval_setup`` looks the run's method up by name); the code itself comes from the checkout
    on PYTHONPATH."""
    project = checkout_project()
    if project is None:
        print("gpu.py: Python < 3.11 cannot read pyproject.toml; `pip install --no-deps -e .` registers the methods")
    elif not _installed(project["name"]):
        write_checkout_metadata(project, target)


def write_checkout_metadata(project: dict, target: Path) -> Path:
    """``target/<name>-<version>.dist-info`` for pyproject.toml's ``[project]`` table ``project``:
    METADATA and entry_points.txt (console scripts and entry-point groups). Returns the folder."""
    name, version = project["name"], project["version"]
    info = target / f"{name}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items()) + "\n"
        for group, points in groups.items()
    ))
    (info / "INSTALLER").write_text("benchmarks/gpu.py\n")
    return info


def bootstrap(wheels: Path, target: Path) -> bool:
    """Install the wheels in ``wheels`` whose distributions this Python lacks into ``target`` (pip,
    no index, no dependency resolution) and put ``target`` and this checkout first on PYTHONPATH.
    Returns whether the process must restart to see them."""
    paths = [str(target), str(REPO)]
    if os.environ.get("VQ3D_GPU_BOOTSTRAPPED") == "1":
        return False
    missing = sorted(w for w in wheels.glob("*.whl") if not _installed(_dist_name(w)))
    if missing:
        print(f"Installing {len(missing)} wheels from {wheels} into {target}: {' '.join(_dist_name(w) for w in missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--upgrade", "--target", str(target), *map(str, missing)], check=True)
    stand_in_cv2(target)
    register_checkout(target)
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.environ["VQ3D_GPU_BOOTSTRAPPED"] = "1"
    return True


WHEEL_LIST = Path(__file__).with_name("gpu_wheels.txt")
#: What the device tool carries to the GPU machine at most, the wheels' budget.
WHEELS_MAX_BYTES = 64 * 2**20


def wheel_list() -> dict:
    """``{normalised name: version}`` of ``gpu_wheels.txt``."""
    pins = {}
    for line in WHEEL_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def check_wheels(folder: Path) -> list:
    """Problems with a ``make gpu-wheels`` folder: a listed wheel missing, one not listed (another
    version left from an earlier list), or all of them over the 64 MiB budget. Empty when fine."""
    pins = wheel_list()
    wheels = sorted(folder.glob("*.whl"))
    problems = []
    found = {}
    for wheel in wheels:
        name, version = _dist_name(wheel), wheel.name.split("-")[1]
        if pins.get(name) != version:
            problems.append(f"{wheel.name}: not in {WHEEL_LIST.name} at this version; delete it")
        found[name] = version
    problems += [f"{name}=={version}: missing from {folder}" for name, version in pins.items() if found.get(name) != version]
    total = sum(w.stat().st_size for w in wheels)
    if total > WHEELS_MAX_BYTES:
        problems.append(f"{folder}: {total / 2**20:.1f} MiB of wheels, over the {WHEELS_MAX_BYTES / 2**20:.0f} MiB budget")
    return problems


CV2_STANDIN = '''"""Stand-in for OpenCV, written by benchmarks/gpu.py because this Python has no cv2.

nerfstudio imports cv2 at start-up (cameras, data utilities, other formats' dataparsers) but this
project never calls it. The constants nerfstudio uses as default arguments carry OpenCV's values;
any other use stops with this message."""

INTER_NEAREST, INTER_LINEAR, INTER_AREA = 0, 1, 3
BORDER_CONSTANT, IMREAD_ANYDEPTH, CV_32FC1 = 0, 2, 5


def __getattr__(name):
    raise ImportError(f"cv2.{name}: OpenCV is not installed here (pip install opencv-python-headless)")
'''


def stand_in_cv2(target: Path) -> None:
    """Write the cv2 stand-in into ``target`` when this Python cannot import cv2."""
    if importlib.util.find_spec("cv2") is None:
        (target / "cv2").mkdir(parents=True, exist_ok=True)
        (target / "cv2" / "__init__.py").write_text(CV2_STANDIN)
        print(f"cv2 is not installed: {target / 'cv2'} stands in for it (nerfstudio imports it, this run never calls it)")


# ---- small helpers ------------------------------------------------------------------------------------


class Budget:
    """Wall-clock deadline of the whole run."""

    def __init__(self, minutes: float) -> None:
        self.start = time.perf_counter()
        self.total = minutes * 60

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float:
    """Peak memory allocated by torch on the GPU since the last reset (GiB); NaN on the CPU."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else float("nan")


def is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- 1. versions and ceilings ----------------------------------------------------------------------------


def versions(device: str, revision: str) -> dict:
    import torch

    info = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": device, "revision": revision, "cpu_count": os.cpu_count(),
    }
    for dist in ("nerfstudio", "numpy", "gsplat", "nerfacc", "viser", "tyro"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = "absent"
    try:
        info["vq3d_nerfstudio"] = importlib.metadata.version("vq3d_nerfstudio")
    except importlib.metadata.PackageNotFoundError:
        info["vq3d_nerfstudio"] = "checkout (not installed)"
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    else:
        info["gpu"] = "none (CPU run)"
    return info


def matmul_tflops(device: str, dtype_name: str, size: int, repeats: int) -> float:
    """Median TFLOP/s of a ``size``^3 matrix product on random data (torch's default precision flags)."""
    import statistics

    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


# ---- data ----------------------------------------------------------------------------------------------


def make_data(work: Path, smoke: bool) -> dict:
    """The scenes every part trains and scores on (``vq3d synth``; resumable, so a rerun reuses them)."""
    from vq3d_nerfstudio.data.synth import write_scenes

    workers = min(16, os.cpu_count() or 1)
    paths = {"paper": work / "synth256", "tiny": work / "synth", "eval": work / "synth_eval"}
    start = time.perf_counter()
    write_scenes(paths["paper"], num_scenes=8 if smoke else 600, resolution=256, num_views=1, seed=0,
                 num_workers=workers, progress=False)
    # the CPU tables' data: make demo's training scenes and the --seed 1 unseen scenes
    write_scenes(paths["tiny"], num_scenes=16 if smoke else 1000, resolution=64, num_views=7, seed=0,
                 num_workers=workers, progress=False)
    write_scenes(paths["eval"], num_scenes=2 if smoke else 20, resolution=64, num_views=7, seed=1,
                 num_workers=workers, progress=False)
    print(f"data: {time.perf_counter() - start:.1f} s", flush=True)
    return paths


# ---- 3. the paper preset ----------------------------------------------------------------------------


def random_vgg16(path: Path) -> Path:
    """A randomly initialised torchvision VGG16 state dict at ``path``: LPIPS-VGG's FLOPs without the
    ImageNet weights (which this machine cannot download)."""
    import torch
    import torchvision

    if not path.exists():
        torch.manual_seed(0)
        torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return path


def build_trainer(preset: str, data: Path, out: Path, device: str, amp: bool, smoke: bool, **overrides):
    """A set-up ``Vq3dTrainer`` for ``preset``, as ``ns-train`` builds it (no viewer, tensorboard)."""
    from vq3d_nerfstudio.ns.method_configs import build_trainer_config

    config = build_trainer_config(preset)
    config.machine.device_type = "cuda" if device.startswith("cuda") else "cpu"
    config.mixed_precision = amp
    config.vis = "tensorboard"
    config.output_dir = out
    config.experiment_name = preset
    config.timestamp = f"amp{int(amp)}"
    config.pipeline.datamanager.data = data
    config.pipeline.datamanager.num_workers = 0 if smoke else min(8, os.cpu_count() or 1)
    model_overrides = {k: v for k, v in overrides.items() if hasattr(config.pipeline.model, k)}
    for key, value in overrides.items():
        if "." in key:  # a nested model option: "adversarial.resolution"
            owner, name = key.split(".")
            assert hasattr(getattr(config.pipeline.model, owner), name), key
            setattr(getattr(config.pipeline.model, owner), name, value)
        elif key in model_overrides:
            setattr(config.pipeline.model, key, value)
        elif hasattr(config.pipeline.datamanager, key):
            setattr(config.pipeline.datamanager, key, value)
        else:
            setattr(config, key, value)
    config.save_config()
    from nerfstudio.utils import writer

    writer.EVENT_WRITERS.clear()  # each trainer's setup adds its writers; one run's events go to its own folder
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


def time_steps(trainer, first_step: int, warmup: int, steps: int, device: str) -> dict:
    """Mean seconds per training step over ``steps`` steps after ``warmup`` untimed ones, images/s and
    peak GPU memory, through the trainer's own ``train_iteration`` (data loading included)."""
    images = trainer.pipeline.datamanager.images_per_step
    step = first_step
    for _ in range(warmup):
        trainer.train_iteration(step)
        step += 1
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss, _, _ = trainer.train_iteration(step)
        step += 1
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    return {"images_per_step": images, "s_per_step": seconds, "images_per_s": images / seconds,
            "peak_gib": peak_gib(device), "loss": float(loss)}


def loader_workers(images_per_step: int, image_bytes: int, wanted: int) -> int:
    """DataLoader workers that shared memory can hold: each keeps two batches in /dev/shm."""
    import shutil

    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return 0
    workers = wanted
    while workers > 0 and workers * 2 * images_per_step * image_bytes > free / 2:
        workers //= 2
    return workers


def paper_preset(args, paths: dict, work: Path, budget: Budget) -> dict:
    from model_cost import train_image_flops

    smoke = args.smoke
    if smoke:  # the same code at toy sizes
        overrides = dict(hidden_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_heads=2, triplane_resolution=32,
                         triplane_margin=2, triplane_channels=4, coarse_samples_per_ray=8, fine_samples_per_ray=8,
                         images_per_batch=2, rays_per_image=32, perceptual_loss_mult=0.0)
        overrides.update({"adversarial.resolution": 16, "adversarial.images_per_batch": 2})
    else:
        overrides = dict(perceptual_weights=random_vgg16(work / "vgg16_random.pth"))
    # 256 px: the image (float32 RGB) and its depth and mask, per image in a batch
    overrides["num_workers"] = 0 if smoke else loader_workers(8, 256 * 256 * 5 * 4, min(8, os.cpu_count() or 1))
    result = {"overrides": {k: str(v) for k, v in overrides.items()}}
    warmup, steps = (1, 1) if smoke else (4, 12)
    for amp in (True, False):
        key = "amp" if amp else "fp32"
        try:
            trainer = build_trainer("vq3d", paths["paper"], work / "runs", args.device, amp, smoke, **overrides)
            model = trainer.pipeline.model
            cfg = model.config
            if "train_image_gflop" not in result:
                result["params_m"] = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("adversarial.")) / 1e6
                rays = trainer.pipeline.datamanager.rays_per_image
                result["train_image_gflop"] = train_image_flops(model, rays) / 1e9
                result["rays_per_image"] = rays
            gan_step = cfg.adversarial.start_step + cfg.adversarial.ramp_steps + 1
            # before the GAN starts (the first 20k steps): reconstruction, VQ, depth and LPIPS losses
            result[key] = time_steps(trainer, 1, warmup, steps, args.device)
            result[key]["mixed_precision"] = trainer.mixed_precision
            print(f"vq3d {key}: {result[key]}", flush=True)
            # after it (step > adversarial start + ramp): + novel-view renders and the discriminator's step
            result[f"{key}_gan"] = time_steps(trainer, gan_step, warmup, steps, args.device)
            result[f"{key}_gan"]["mixed_precision"] = trainer.mixed_precision
            print(f"vq3d {key} + GAN: {result[f'{key}_gan']}", flush=True)
            if amp:
                result["batch_search"] = largest_batch(trainer, gan_step + 2 * (warmup + steps), args, budget)
            del trainer, model
        except Exception as err:  # noqa: BLE001 (recorded; the other precision still runs)
            traceback.print_exc()
            result.setdefault(key, {})["error"] = "".join(traceback.format_exception_only(type(err), err)).strip()
        free_memory()
    peak = {"amp": args.ceilings.get("float16"), "fp32": args.ceilings.get("float32")}
    rows = [result[key] for key in ("amp", "fp32", "amp_gan", "fp32_gan") if "images_per_s" in result.get(key, {})]
    rows += [r for r in result.get("batch_search", []) if "images_per_s" in r]
    for row in rows:  # the ceiling of the precision the trainer ran (no autocast on a CPU)
        ceiling = peak["amp" if row["mixed_precision"] else "fp32"]
        if ceiling and "train_image_gflop" in result:
            row["model_tflops"] = result["train_image_gflop"] * row["images_per_s"] / 1e3  # TFLOP/s of counted work
            row["mfu"] = row["model_tflops"] / ceiling
    return result


def largest_batch(trainer, step: int, args, budget: Budget) -> list:
    """Double the images per step from 16 until the GPU runs out of memory (or the data, or the time
    set aside for it), with the GAN on and mixed precision: s/step, images/s and peak memory of each."""
    datamanager = trainer.pipeline.datamanager
    rows = []
    batch = 16 if not args.smoke else 3
    limit = 6 if args.smoke else 512
    while batch <= limit and batch <= len(datamanager.train_dataset):
        if budget.left() < args.reserve_s + 120 and not args.smoke:
            rows.append({"images_per_step": batch, "stopped": "time"})
            break
        datamanager.config.images_per_batch = batch
        datamanager.config.num_workers = loader_workers(batch, 256 * 256 * 5 * 4, datamanager.config.num_workers)
        datamanager.setup_train()
        try:
            row = time_steps(trainer, step, 1, 2, args.device)
            step += 3
            row["loader_workers"] = datamanager.config.num_workers
            row["mixed_precision"] = trainer.mixed_precision
            rows.append(row)
            print(f"vq3d batch {batch}: {row}", flush=True)
            if row["s_per_step"] > 15:
                break  # the next doubling would take too long to time
        except Exception as err:  # noqa: BLE001 (out of memory is the expected end; any other failure ends it too)
            if is_oom(err):
                reason = "out of memory"
            else:
                traceback.print_exc()
                reason = "failed: " + "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()[0]
            rows.append({"images_per_step": batch, "stopped": reason, "gpu_memory_gib": peak_gib(args.device)})
            print(f"vq3d batch {batch}: {reason}", flush=True)
            break
        finally:
            free_memory()
        batch *= 2
    datamanager.config.images_per_batch = 8
    return rows


# ---- 4. a long vq3d-tiny run -------------------------------------------------------------------------


def tiny_long_run(args, paths: dict, work: Path, budget: Budget) -> dict:
    import shutil

    from quality_over_budget import summary_row

    from vq3d_nerfstudio.scripts.evaluate import evaluate_run

    smoke = args.smoke
    common = dict(num_workers=0 if smoke else 4)
    if smoke:
        common.update(images_per_batch=2, rays_per_image=32)
    # steps a second, measured on a throw-away trainer, set the run's length
    probe = build_trainer("vq3d-tiny", paths["tiny"], work / "probe", args.device, False, smoke, **common)
    rate = time_steps(probe, 1, 2 if smoke else 20, 2 if smoke else 60, args.device)
    del probe
    free_memory()
    minutes = args.tiny_minutes
    eval_reserve = 5 if smoke else 45  # scoring 5 checkpoints on 20 scenes
    train_s = min(minutes * 60, max(10.0, budget.left() - args.reserve_s - eval_reserve))
    steps = 6 if smoke else max(500, int(train_s / rate["s_per_step"] * 0.93) // 100 * 100)
    every = max(1, steps // 5)
    out = work / "tiny"
    if out.exists():
        shutil.rmtree(out)
    print(f"vq3d-tiny: {rate['s_per_step'] * 1e3:.1f} ms/step -> {steps} steps in about {train_s / 60:.1f} min", flush=True)
    trainer = build_trainer("vq3d-tiny", paths["tiny"], out, args.device, False, smoke, max_num_iterations=steps,
                            steps_per_save=every, save_only_latest_checkpoint=False,
                            steps_per_eval_batch=steps * 10, steps_per_eval_image=steps * 10,
                            steps_per_eval_all_images=steps * 10, **common)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    run_dir = Path(trainer.base_dir)
    del trainer
    free_memory()
    rows = []
    for checkpoint in sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt")):
        step = int(checkpoint.stem.split("-")[1])
        summary, _ = evaluate_run(run_dir / "config.yml", paths["eval"], load_step=step)
        rows.append({"step": step + 1, **summary_row(summary)})
        print(f"vq3d-tiny step {step + 1}: {rows[-1]}", flush=True)
    return {"probe": rate, "steps": steps, "train_minutes": wall / 60, "s_per_step": wall / steps,
            "curve": rows, "run_dir": str(run_dir), "workers": common["num_workers"]}


def package_tiny_run(run_dir: Path, output: Path) -> Path:
    """``vq3d-tiny-gpu.tar``: the run's config.yml, dataparser transforms and its last checkpoint with
    the pipeline's weights only (nerfstudio's loaders read ``step`` and ``pipeline``)."""
    import tarfile
    import tempfile

    import torch

    checkpoint = sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))[-1]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        slim = Path(tmp) / checkpoint.name
        torch.save({"step": state["step"], "pipeline": state["pipeline"]}, slim)
        tar_path = output / "vq3d-tiny-gpu.tar"
        with tarfile.open(tar_path, "w") as tar:
            for name in ("config.yml", "dataparser_transforms.json"):
                if (run_dir / name).exists():
                    tar.add(run_dir / name, arcname=f"vq3d-tiny-gpu/{name}")
            tar.add(slim, arcname=f"vq3d-tiny-gpu/nerfstudio_models/{checkpoint.name}")
    return tar_path


# ---- 5. stage 2 ---------------------------------------------------------------------------------------


def stage2_speed(args) -> dict:
    import torch

    from vq3d_nerfstudio.stage2.train import Stage2TrainConfig, make_optimizer, train_step
    from vq3d_nerfstudio.stage2.transformer import PRESETS, TokenTransformer, TokenTransformerConfig, sample_tokens

    device = torch.device(args.device)
    preset, grid, vocab, batch, sample_batch = ("nano", 4, 64, 2, 2) if args.smoke else ("paper", 32, 15_360, 32, 64)
    torch.manual_seed(0)
    config = TokenTransformerConfig(vocab_size=vocab, num_classes=1000, block_size=grid * grid, **PRESETS[preset])
    model = TokenTransformer(config).to(device)
    optimizer = make_optimizer(model, Stage2TrainConfig())
    amp = device.type == "cuda"
    codes = torch.randint(0, vocab, (batch, grid * grid), device=device)
    classes = torch.randint(0, 1000, (batch,), device=device)
    warmup, steps = (1, 2) if args.smoke else (3, 10)
    for _ in range(warmup):
        train_step(model, model, optimizer, codes, classes, amp, 1.0)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, model, optimizer, codes, classes, amp, 1.0)
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    train = {"preset": preset, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch,
             "tokens_per_step": batch * grid * grid, "s_per_step": step_s, "tokens_per_s": batch * grid * grid / step_s,
             "peak_gib": peak_gib(device), "amp": "bfloat16" if amp else "off"}
    del optimizer
    free_memory()
    model.eval()
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        model.config.block_size = 8  # warm-up (kernels, allocator) on a few tokens
        sample_tokens(model, torch.arange(2, device=device), generator=generator)
        model.config.block_size = grid * grid
        sync(device)
        start = time.perf_counter()
        tokens = sample_tokens(model, torch.arange(sample_batch, device=device) % 1000, generator=generator)
        sync(device)
    seconds = time.perf_counter() - start
    sample = {"batch": sample_batch, "seconds": seconds, "images_per_s": sample_batch / seconds,
              "tokens_per_s": tokens.numel() / seconds, "kv_cache": True}
    print(f"stage 2 {preset}: train {train}, sample {sample}", flush=True)
    return {"train": train, "sample": sample, "grid": grid, "vocab": vocab}


def stage2_on_tiny_run(args, run_dir: Path, work: Path) -> dict:
    """``vq3d-train-stage2 --model tiny`` on the long tiny run: encode its data, train, held-out bits."""
    import shutil

    from vq3d_nerfstudio.stage2.train import Stage2TrainConfig, train

    out = work / "stage2"
    if out.exists():
        shutil.rmtree(out)
    steps = 4 if args.smoke else args.stage2_steps
    config = Stage2TrainConfig(stage1_config=run_dir / "config.yml", output_dir=out, model="tiny", max_steps=steps,
                               eval_every=steps, save_every=steps, num_workers=0 if args.smoke else 4,
                               device="cuda" if args.device.startswith("cuda") else "cpu", batch_size=4 if args.smoke else 64)
    start = time.perf_counter()
    train(config)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    bits = [r["eval/bits_per_token"] for r in rows if "eval/bits_per_token" in r]
    timed = [r for r in rows if "train/loss" in r]
    train_s = timed[-1]["time_s"] - timed[0]["time_s"] if len(timed) > 1 else float("nan")
    info = json.loads(sorted((out / "checkpoints").glob("step-*"))[-1].joinpath("config.json").read_text())
    per_scene = math.prod(info["grid"])
    tokens = (timed[-1]["step"] - timed[0]["step"]) * config.batch_size * per_scene if len(timed) > 1 else 0
    return {"steps": steps, "batch": config.batch_size, "wall_s": wall, "eval_bits_per_token": bits[-1] if bits else None,
            "train_tokens_per_s": tokens / train_s if tokens else None}


# ---- 2. the CUDA tests -------------------------------------------------------------------------------


def cuda_tests(output: Path, gsplat_ready: bool, seconds: float, gsplat_why: str = "") -> dict:
    """``pytest -m cuda`` (without the gsplat tests when its CUDA build did not finish), stopped after
    ``seconds``; the log goes to ``pytest_cuda.log``."""
    log = output / "pytest_cuda.log"
    start = time.perf_counter()
    # only the modules that hold such tests: collecting the rest would import what they alone need
    files = sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py") if "mark.cuda" in f.read_text())
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", *files]
    if not gsplat_ready:
        command += ["-k", "not gsplat"]
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=seconds)
        stdout, stderr, returncode = result.stdout, result.stderr, result.returncode
    except subprocess.TimeoutExpired as err:
        stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        stderr, returncode = f"stopped after {seconds:.0f} s", None
    log.write_text(stdout + stderr)
    tail = stdout.strip().splitlines()[-1] if stdout.strip() else stderr[-500:]
    outcomes = {}
    for line in stdout.splitlines():
        match = re.match(r"^tests/\S+::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", line)
        if match:
            outcomes[match.group(1)] = match.group(2)
    failures = [line for line in stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    print(f"pytest -m cuda: {tail}", flush=True)
    return {"returncode": returncode, "summary": tail, "tests": outcomes, "failures": failures,
            "gsplat_tests": "run" if gsplat_ready else gsplat_why,
            "seconds": time.perf_counter() - start}


def start_gsplat_build(output: Path):
    """Compile gsplat's CUDA kernels (JIT, minutes) in the background while the GPU trains."""
    code = "import gsplat.cuda._backend as b; assert b._C is not None, 'gsplat did not build'; print('gsplat built')"
    log = open(output / "gsplat_build.log", "w")
    jobs = max(1, (os.cpu_count() or 2) * 3 // 8)
    env = dict(os.environ, MAX_JOBS=str(jobs))
    return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, env=env), log, jobs


# ---- 6. report ------------------------------------------------------------------------------------------


def fmt(value, spec=".2f", missing="-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def section(results: dict) -> str:
    v = results.get("versions", {})
    command = results.get("command", "python benchmarks/gpu.py")
    lines = [f"## On a GPU: {v.get('gpu', '?')} (`benchmarks/gpu.py`)", ""]
    lines.append(
        f"Machine: {v.get('gpu', '?')} ({fmt(v.get('gpu_memory_gib'), '.0f')} GiB, driver {v.get('driver', '?')}), "
        f"{v.get('cpu_count', '?')} CPU cores; Python {v.get('python')}, torch {v.get('torch')} (CUDA {v.get('cuda')}), "
        f"numpy {v.get('numpy')}, nerfstudio {v.get('nerfstudio')}, gsplat {v.get('gsplat')}, nerfacc {v.get('nerfacc')}, "
        "and what the machine lacked from `make gpu-wheels`."
    )
    ceilings = results.get("ceilings", {})
    runs = results.get("runs") or [{"revision": v.get("revision", "?"), "command": command, "ceilings": ceilings,
                                    "wall_minutes": results.get("wall_minutes"), "parts": None}]
    lines.append("")
    for run in runs:
        c = run.get("ceilings", {})
        parts = f": {', '.join(run['parts'])}" if run.get("parts") else ""
        lines.append(f"- Revision {run['revision']}, `{run['command']}`, {fmt(run.get('wall_minutes'), '.1f')} min; matrix-product "
                     f"ceilings there fp16 {fmt(c.get('float16'), '.0f')}, fp32 {fmt(c.get('float32'), '.1f')} TFLOP/s "
                     f"(8192^3, torch defaults){parts}")
    lines += ["", f"Command: `{command}` (the GPU's figures; `--publish gpu.json` rewrites this section from them)", ""]
    p = results.get("paper", {})
    if "error" in p:
        lines += [f"**`vq3d` preset: failed**: `{p['error'].splitlines()[-1]}`", ""]
    elif p:
        lines += [
            f"### `vq3d` (paper preset, 256 px, {fmt(p.get('params_m'), '.1f')} M parameters) on `vq3d synth --resolution 256`",
            "",
            "| regime | precision | images / step | s / step | images / s | peak GPU memory | counted TFLOP/s | MFU |",
            "|---|---|---|---|---|---|---|---|",
        ]

        def precision(r: dict) -> str:
            return "mixed (fp16 autocast)" if r.get("mixed_precision", True) else "fp32"

        def row(regime: str, r: dict) -> str:
            if "error" in r:
                return f"| {regime} | | | failed: `{r['error'].splitlines()[-1][:160]}` | | | | |"
            if "stopped" in r:
                return f"| {regime} | mixed (fp16 autocast) | {r['images_per_step']} | {r['stopped']} | | | | |"
            mfu = fmt(100 * r["mfu"], ".1f") + "%" if "mfu" in r else "-"
            return (f"| {regime} | {precision(r)} | {r['images_per_step']} | {r['s_per_step']:.3f} | {r['images_per_s']:.1f} | "
                    f"{fmt(r['peak_gib'], '.1f')} GiB | {fmt(r.get('model_tflops'), '.1f')} | {mfu} |")

        for key, regime in (("amp", "steps < 20k (no GAN)"), ("fp32", "steps < 20k (no GAN)"),
                            ("amp_gan", "GAN on"), ("fp32_gan", "GAN on")):
            if key in p:
                lines.append(row(regime, p[key]))
        for r in p.get("batch_search", []):
            lines.append(row("GAN on, larger batch", r))
        lines += [
            "",
            f"MFU: the FLOPs `benchmarks/model_cost.py` counts for one training image ({fmt(p.get('train_image_gflop'), '.1f')} GFLOP: "
            f"encoder, quantizer, tri-plane decoder, {p.get('rays_per_image')} rays' coarse and fine field passes, and their backward) "
            "times images/s, over the matrix-product ceiling of the precision used (above). LPIPS-VGG (on from step 0) and the GAN's "
            "novel-view renders and discriminator are not counted, so MFU understates the work done. LPIPS ran on randomly "
            "initialised VGG16 weights (the same FLOPs). Each step includes its data loading "
            f"({p.get('overrides', {}).get('num_workers', '?')} loader workers).",
            "",
        ]
    t = results.get("tiny", {})
    if "error" in t:
        lines += [f"**Long `vq3d-tiny` run: failed**: `{t['error'].splitlines()[-1]}`", ""]
    elif t:
        lines += [
            f"### `vq3d-tiny` for {t['steps']} steps on the GPU ({fmt(t['train_minutes'], '.1f')} min, "
            f"{1e3 * t['s_per_step']:.1f} ms/step; the CPU preset: 1650 steps at ~0.6 s)",
            "",
            "Scored by `vq3d eval` on the 20 unseen `vq3d synth --seed 1` scenes of the CPU tables; the schedule (warm-up 200, "
            "cosine) runs over the whole run, so the early rows are mid-schedule.",
            "",
            "| step | x CPU steps | canonical PSNR | SSIM | novel PSNR | novel - floor | δ<1.25 in | δ<1.25 novel |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in t["curve"]:
            lines.append(f"| {r['step']} | {r['step'] / 1650:.1f} | {r['canonical_psnr']:.2f} | {r['canonical_ssim']:.3f} | "
                         f"{r['novel_psnr']:.2f} | {r['novel_psnr'] - r['still_psnr']:+.2f} | {r['delta1_input']:.3f} | {r['delta1_novel']:.3f} |")
        lines += ["", "The CPU preset's own run (BENCHMARKS.md, the chosen preset): 21.43 dB canonical, +2.21 dB novel - floor, "
                  "δ<1.25 0.787 at 1650 steps.", ""]
    s = results.get("stage2", {})
    if "error" in s:
        lines += [f"**Stage 2: failed**: `{s['error'].splitlines()[-1]}`", ""]
    elif s:
        tr, sa = s["train"], s["sample"]
        lines += [
            f"### Stage 2 (`{tr['preset']}` transformer, {tr['params_m']:.0f} M parameters, {s['grid']}x{s['grid']} tokens, {s['vocab']} codes)",
            "",
            f"- training: {tr['tokens_per_s']:,.0f} tokens/s ({tr['batch']} scenes a step, {tr['s_per_step']:.3f} s, "
            f"autocast {tr['amp']}, peak {fmt(tr['peak_gib'], '.1f')} GiB)",
            f"- sampling with the KV cache: {sa['images_per_s']:.2f} token grids/s ({sa['batch']} at once, "
            f"{sa['seconds']:.1f} s, {sa['tokens_per_s']:,.0f} tokens/s)",
        ]
        ceiling = ceilings.get("float16")
        if ceiling:
            lines.append(f"- training's model FLOPs (6 x parameters per token, attention not counted): "
                         f"{6 * tr['params_m'] * 1e6 * tr['tokens_per_s'] / 1e12:.0f} TFLOP/s, "
                         f"{100 * 6 * tr['params_m'] * 1e6 * tr['tokens_per_s'] / 1e12 / ceiling:.0f}% of the fp16 matrix-product ceiling")
        st = results.get("stage2_tiny", {})
        if st and "error" not in st:
            lines.append(f"- `vq3d-train-stage2 --model tiny` on the long tiny run's tokens: {st['steps']} steps of {st['batch']} in "
                         f"{st['wall_s']:.0f} s including encoding its training scenes to tokens, {fmt(st['train_tokens_per_s'], ',.0f')} tokens/s, "
                         f"held-out {fmt(st['eval_bits_per_token'], '.2f')} bits per token")
        elif st:
            lines.append(f"- `vq3d-train-stage2` on the tiny run: failed: `{st['error'].splitlines()[-1]}`")
        lines.append("")
    for key, label in (("cuda_tests_first_run", "first run"), ("cuda_tests", "")):
        c = results.get(key, {})
        if not c:
            continue
        summary = c.get("summary", c.get("error", "?").splitlines()[-1]).strip("= ")
        lines += [f"### `pytest -m cuda`{f' ({label})' if label else ''}: {summary}", ""]
        if c.get("gsplat_tests", "run") != "run":
            lines += [f"gsplat tests {c['gsplat_tests']}", ""]
        for name, outcome in sorted(c.get("tests", {}).items()):
            lines.append(f"- {outcome.lower()}: `{name}`")
        for failure in c.get("failures", []):
            lines.append(f"- `{failure[:300]}`")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def publish(results: dict) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from common import update_section

    body = section(results)
    update_section(SECTION, body)
    print(body)


# ---- main -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke: the code paths, no figures)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes and step counts: checks every part runs, in seconds")
    parser.add_argument("--output-dir", type=Path, default=Path("gpu_out"), help="gpu.json, gpu_section.md, logs, the tiny model")
    parser.add_argument("--work-dir", type=Path, default=None, help="data and runs (default: <output-dir>/work)")
    parser.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of the whole run")
    parser.add_argument("--tiny-minutes", type=float, default=3.5, help="training budget of the long vq3d-tiny run")
    parser.add_argument("--stage2-steps", type=int, default=300, help="vq3d-train-stage2 steps on the tiny run")
    parser.add_argument("--reserve-s", type=float, default=100.0, help="seconds kept for stage 2, the CUDA tests and the report")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="wheels to install when missing (make gpu-wheels)")
    parser.add_argument("--site", type=Path, default=Path("/tmp/vq3d-gpu-site"), help="where those wheels are installed")
    parser.add_argument("--revision", default=None, help="the checkout's revision (default: git rev-parse)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "paper", "tiny", "stage2", "gsplat"],
                        help="parts to leave out (gsplat: its CUDA build and the tests that need it)")
    parser.add_argument("--publish", type=Path, default=None, help="only rewrite BENCHMARKS.md's section from this gpu.json")
    parser.add_argument("--check-wheels", type=Path, default=None, help="only check a make gpu-wheels folder against the list")
    parser.add_argument("--install-only", action="store_true",
                        help="only install the missing wheels into --site and register this checkout, then print the PYTHONPATH to use")
    args = parser.parse_args()
    if args.check_wheels is not None:
        problems = check_wheels(args.check_wheels)
        for problem in problems:
            print(f"gpu-wheels: error: {problem}", file=sys.stderr)
        if problems:
            raise SystemExit(1)
        total = sum(w.stat().st_size for w in args.check_wheels.glob("*.whl")) / 2**20
        print(f"{args.check_wheels}: {len(wheel_list())} wheels, {total:.1f} MiB (budget {WHEELS_MAX_BYTES / 2**20:.0f} MiB)")
        return
    if args.publish is not None:
        publish(json.loads(args.publish.read_text()))
        return
    if args.install_only:
        os.environ.pop("VQ3D_GPU_BOOTSTRAPPED", None)
        bootstrap(args.wheels, args.site)
        print(f"export PYTHONPATH={os.environ['PYTHONPATH']}")
        return
    if bootstrap(args.wheels, args.site):
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.path[:0] = [str(Path(__file__).parent)]
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"gpu.py: error: {', '.join(missing)} not importable; run `make gpu-wheels` where there is network "
                         f"and copy .whl/ here (or pip install -e .)")

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu.py: error: no CUDA GPU visible; use --device cpu --smoke to check the code paths")
    budget = Budget(args.minutes)
    output = args.output_dir.resolve()
    output.mkdir(parents=True, exist_ok=True)
    work = (args.work_dir or output / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    revision = args.revision
    if revision is None:
        try:
            revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() or "unknown"
        except OSError:
            revision = "unknown"
    shown, skip_next = [], False  # the command as a user types it: no machine-specific folders
    for word in sys.argv[1:]:
        if skip_next:
            skip_next = False
        elif word in ("--output-dir", "--work-dir", "--revision", "--site", "--wheels"):
            skip_next = True
        elif not word.startswith(("--output-dir=", "--work-dir=", "--revision=", "--site=", "--wheels=")):
            shown.append(word)
    results = {"command": " ".join(["python", "benchmarks/gpu.py", *shown]), "smoke": args.smoke}

    def save() -> None:
        results["wall_minutes"] = budget.elapsed() / 60
        (output / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
        (output / "gpu_section.md").write_text(section(results))

    def part(name: str, fn, *fn_args):
        start = time.perf_counter()
        try:
            results[name] = fn(*fn_args)
        except Exception as err:  # noqa: BLE001 (a failed part is a figure too: record it and go on)
            traceback.print_exc()
            results[name] = {"error": "".join(traceback.format_exception_only(type(err), err)).strip()}
            free_memory()
        print(f"[{name}: {time.perf_counter() - start:.0f} s; {budget.elapsed() / 60:.1f} min in]", flush=True)
        save()
        return results[name]

    results["versions"] = versions(args.device, revision)
    print(json.dumps(results["versions"]), flush=True)
    size, repeats = (256, 2) if args.smoke else (8192, 10)
    results["ceilings"] = {dtype: matmul_tflops(args.device, dtype, size, repeats) for dtype in ("float16", "float32")}
    print(f"matrix-product ceilings (TFLOP/s): {results['ceilings']}", flush=True)
    args.ceilings = results["ceilings"]
    paths = make_data(work, args.smoke)
    # the throughput figures first, on a quiet machine; gsplat's CUDA build (minutes of CPU) then runs
    # beside the long tiny run, whose step rate the report gives with that said
    if "paper" not in args.skip:
        part("paper", paper_preset, args, paths, work, budget)
    if "stage2" not in args.skip:
        part("stage2", stage2_speed, args)
    builder = None
    if args.device.startswith("cuda") and not {"tests", "gsplat"} & set(args.skip):
        builder = start_gsplat_build(output)
        results["gsplat_build_jobs"] = builder[2]
    if "tiny" not in args.skip:
        tiny = part("tiny", tiny_long_run, args, paths, work, budget)
        if "run_dir" in tiny:
            results["tiny"]["package"] = str(package_tiny_run(Path(tiny["run_dir"]), output))
        if "stage2" not in args.skip and "run_dir" in tiny:
            part("stage2_tiny", stage2_on_tiny_run, args, Path(tiny["run_dir"]), work)
    if "tests" not in args.skip:
        gsplat_ready = builder is None and "gsplat" not in args.skip  # on a CPU the gsplat tests skip themselves
        if builder is not None:
            proc, log, _ = builder
            try:
                gsplat_ready = proc.wait(timeout=max(10.0, budget.left() - 100)) == 0
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            results["gsplat_build"] = (output / "gsplat_build.log").read_text()[-2000:]
        why = ("left out (--skip gsplat)" if "gsplat" in args.skip
               else "left out: gsplat's CUDA build did not finish or failed (gsplat_build.log)")
        part("cuda_tests", cuda_tests, output, gsplat_ready, max(60.0, budget.left() - 10), why)
    save()
    if not args.smoke:
        publish(results)
    print(section(results))
    print(f"Wrote {output / 'gpu.json'} and {output / 'gpu_section.md'} ({budget.elapsed() / 60:.1f} min)")


if __name__ == "__main__":
    main()

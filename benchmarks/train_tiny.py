"""Benchmark: `vq3d-tiny` training on this machine.

Runs the real `ns-train vq3d-tiny` on 1000 `vq3d synth` scenes for a wall-clock budget (default 15
minutes, or until the run ends), samples the resident memory of the training process tree, then
scores the last checkpoint with `ns-eval` (held-out images, canonical view). Prints a table and
writes it to BENCHMARKS.md.

    .venv/bin/python benchmarks/train_tiny.py [--budget-min 15] [--data data/synth]
"""

from __future__ import annotations

import argparse
import glob
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BIN, cli_env, git_revision, machine, update_section  # noqa: E402


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def train_iter_times(run_dir: Path) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(sorted(glob.glob(str(run_dir / "events.out.tfevents.*")))[-1])
    events.Reload()
    return [e.value for e in events.Scalars("Train Iter (time)")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-min", type=float, default=15.0, help="wall-clock training budget, minutes")
    parser.add_argument("--data", type=Path, default=Path("data/synth"), help="synth scenes (made if missing)")
    parser.add_argument("--num-scenes", type=int, default=1000)
    parser.add_argument("--extra", nargs="*", default=[], help="extra ns-train arguments")
    args = parser.parse_args()

    from vq3d_nerfstudio.data.synth import write_scenes
    from vq3d_nerfstudio.method_configs import PRESETS

    write_scenes(args.data, num_scenes=args.num_scenes, resolution=64, num_views=7, seed=0)
    out = Path(tempfile.mkdtemp(prefix="vq3d_bench_"))
    command = [str(BIN / "ns-train"), "vq3d-tiny", "--data", str(args.data), "--vis", "tensorboard",
               "--output-dir", str(out), "--experiment-name", "bench", "--timestamp", "run",
               "--steps-per-save", "100", *args.extra]
    print("running:", " ".join(command), flush=True)
    start = time.time()
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        if time.time() - start > args.budget_min * 60:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
            break
        time.sleep(0.5)
    wall = time.time() - start
    run_dir = out / "bench" / "vq3d-tiny" / "run"
    checkpoints = sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    if not checkpoints:
        raise SystemExit(f"no checkpoint written under {run_dir}")
    step = int(checkpoints[-1].stem.split("-")[1])
    metrics_path = out / "metrics.json"
    subprocess.run([str(BIN / "ns-eval"), "--load-config", str(run_dir / "config.yml"), "--output-path",
                    str(metrics_path)], env=cli_env(), check=True, capture_output=True)
    results = json.loads(metrics_path.read_text())["results"]
    times = train_iter_times(run_dir)
    sec_per_step = statistics.median(times[5:] or times)
    images = PRESETS["vq3d-tiny"]["data"]["images_per_batch"]
    rows = [
        ("seconds / training step (median)", f"{sec_per_step:.3f}"),
        ("images / s", f"{images / sec_per_step:.1f}"),
        ("peak RSS, training process tree", f"{peak / 2**30:.2f} GiB"),
        ("steps in budget (last checkpoint)", f"{step + 1} in {wall / 60:.1f} min"),
        ("held-out canonical-view PSNR", f"{results['psnr']:.2f} dB"),
        ("held-out canonical-view SSIM", f"{results['ssim']:.3f}"),
    ]
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    body = (
        "## `vq3d-tiny` training on 2 CPU cores\n\n"
        f"{table}\n\n"
        f"Goal: >= 24 dB held-out canonical-view PSNR at 64 px after 15 minutes; >= 10 images/s; <= 4 GB.\n\n"
        f"Machine: {machine()}. Revision {git_revision()}, {args.num_scenes} `vq3d synth` scenes at 64 px, "
        f"{images} images per step. Run here (CPU).\n\n"
        f"Command: `.venv/bin/python benchmarks/train_tiny.py --budget-min {args.budget_min:g}"
        + (f" --extra {' '.join(args.extra)}" if args.extra else "") + "`\n"
    )
    print(body)
    update_section("train-tiny", body)


if __name__ == "__main__":
    main()

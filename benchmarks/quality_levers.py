"""Benchmark: which levers make stage 1 reconstruct (issue 14's ablation).

Each row is one real `ns-train vq3d-tiny` run on the same 1000 `vq3d synth` scenes (single views,
same seed) for the same number of steps, differing from a *named* earlier row by one change, then
scored by `vq3d eval` on 20 unseen scenes (`--seed 1`, 7 views): canonical PSNR / SSIM, novel-view
PSNR with the 'nothing moves' floor (the input image scored against the novel frames), depth AbsRel
and delta<1.25 on the input and novel views, and the codes in use (over the first 500 training
images: share of the codebook, perplexity). Rows that did not help stay in the table.

`--final` trains the chosen preset (today's defaults, no flags) for the full wall-clock budget, or
scores an existing run (`--final-run DIR`, e.g. `make demo`'s), and the same preset on the same
images given as a flat folder whose depth files are *relative* disparity ``a / z + b`` (random
``a > 0`` and ``b`` per image, `vq3d_meta.json` depth_kind disparity: what a monocular network gives
a photo) at the same budget, and writes its own section with the issue's goals.

    .venv/bin/python benchmarks/quality_levers.py [--steps 1000] [--rows baseline frustum ...]
    .venv/bin/python benchmarks/quality_levers.py --final [--budget-min 15] [--final-run outputs/demo/vq3d-tiny/demo]

Finished rows are kept in `outputs/quality_levers/<row>/result.json` and reused on a rerun (delete
the folder to retrain).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional

from common import BIN, cli_env, git_revision, machine, read_section, update_section
from quality_over_budget import summary_row, train_iter_events

M = "--pipeline.model."
# Today's preset before this ablation: world-axis tri-plane, features-only field, VQ with random
# init and the dead-code threshold 0.03 picks per step (= 0.06 of the expected 512 / 1024), 8x8
# tokens, linear decoder head.
BASELINE = {"triplane_layout": "world", "num_depth_frequencies": "0", "patch_size": "8", "decoder_upsampler": "linear"}
BASELINE_VQ = {"use_kmeans_init": "False", "dead_code_fraction": "0.06"}


def flags(quantizer: str = "vq", **changes) -> list:
    """ns-train flags: BASELINE with some model options changed (keys: flag names without the prefix,
    '-' as '_'; ``q_`` keys are the quantizer's own options; a tuple value is several arguments), then
    the quantizer's subcommand (``vq`` keeps the baseline's VQ options) with its options. Flags for
    ns-train itself must come before these (after a subcommand only its own options are read)."""

    def pairs(prefix: str, options: dict) -> list:
        out = []
        for key, value in options.items():
            out += [prefix + key.replace("_", "-"), *(list(value) if isinstance(value, tuple) else [value])]
        return out

    model = {**BASELINE, **{k: v for k, v in changes.items() if not k.startswith("q_")}}
    options = {**(BASELINE_VQ if quantizer == "vq" else {}), **{k[2:]: v for k, v in changes.items() if k.startswith("q_")}}
    return pairs(M, model) + [f"{quantizer}-quantizer"] + pairs(M + "quantizer.", options)


FRUSTUM = dict(triplane_layout="frustum")
DEPTH_INPUT = dict(FRUSTUM, num_depth_frequencies="4")
CODEBOOK = dict(DEPTH_INPUT, q_use_kmeans_init="True")
FSQ = dict(DEPTH_INPUT, quantizer="fsq")
# (name, compared with, what changed, ns-train flags)
ROWS = [
    ("baseline", None, "today's preset", flags()),
    ("frustum", "baseline", "frustum-aligned tri-plane", flags(**FRUSTUM)),
    ("depth-input", "frustum", "+ depth coordinate into the density MLP", flags(**DEPTH_INPUT)),
    ("vq-kmeans", "depth-input", "+ k-means codebook init (VQ)", flags(**CODEBOOK)),
    ("fsq", "depth-input", "FSQ (8,5,5,5) instead of VQ", flags(**FSQ)),
    ("patch4", "fsq", "+ 16x16 tokens (patch 4)", flags(**FSQ, patch_size="4")),
    ("conv-decoder", "patch4", "+ convolutional upsampler", flags(**FSQ, patch_size="4", decoder_upsampler="conv")),
    # Second session: the 2D ceiling of these tokens (benchmarks/token_capacity.py) says the codes,
    # not the 3D part, bound canonical PSNR; 14 bits a token instead of 10 (the vq3d preset's levels).
    ("fsq-15k", "patch4", "FSQ (8,8,8,6,5) = 15,360 codes", flags(**FSQ, patch_size="4", q_levels=("8", "8", "8", "6", "5"))),
]


def make_relative_folder(scenes: Path, out: Path, seed: int = 0) -> Path:
    """The scenes' input views as a flat folder with relative disparity ``a / z + b`` per image."""
    import numpy as np

    if (out / "vq3d_meta.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for scene in sorted(p.parent for p in scenes.glob("*/transforms.json")):
        frame = json.loads((scene / "transforms.json").read_text())["frames"][0]
        z = np.load(scene / frame["depth_file_path"])
        a, b = rng.uniform(0.2, 5.0), rng.uniform(-1.0, 1.0)
        disparity = np.where(np.isfinite(z), 1.0 / np.where(np.isfinite(z), z, 1.0), 0.0)
        shutil.copy(scene / frame["file_path"], tmp / f"{scene.name}.png")
        np.save(tmp / f"{scene.name}.npy", (a * disparity + b).astype(np.float32))
    (tmp / "vq3d_meta.json").write_text(json.dumps({"depth_kind": "disparity"}))
    tmp.rename(out)
    return out


def train(out: Path, data: Path, extra: list, steps: int = 0, budget_min: float = 0.0) -> dict:
    """One `ns-train vq3d-tiny` run; a step budget, or a wall-clock budget (then Ctrl-C, which saves)."""
    if out.exists():
        shutil.rmtree(out)
    command = [str(BIN / "ns-train"), "vq3d-tiny", "--data", str(data), "--vis", "tensorboard",
               "--output-dir", str(out), "--experiment-name", "run", "--timestamp", "run"]
    if steps:
        command += ["--max-num-iterations", str(steps), "--steps-per-save", str(steps)]
    command += extra  # last: it may hold a subcommand (fsq-quantizer ...), after which only its options are read
    print("running:", " ".join(command), flush=True)
    start = time.time()
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if budget_min:
        try:
            proc.wait(timeout=budget_min * 60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGINT, 130) or not list((out / "run" / "vq3d-tiny" / "run" / "nerfstudio_models").glob("*.ckpt")):
        raise SystemExit(f"training failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_min": (time.time() - start) / 60}


def codes_in_use(config: Path, data: Path, num_images: int = 500) -> dict:
    """Share of the codebook and perplexity of the codes the model gives the first training images."""
    import torch
    from nerfstudio.utils.eval_utils import eval_setup

    from vq3d_nerfstudio.data.dataset import load_image
    from vq3d_nerfstudio.data.folders import scan_image_folder
    from vq3d_nerfstudio.stage1.quantizer import code_perplexity

    _, pipeline, _, step = eval_setup(config, test_mode="inference")
    model = pipeline.model
    if not model.quantizer.has_codes:  # quantizer none: continuous tokens
        return {"codes_used": float("nan"), "perplexity": float("nan"), "codebook_size": 0, "step": step}
    records = scan_image_folder(data)[0][:num_images]
    codes = []
    with torch.no_grad():
        for i in range(0, len(records), 50):
            images = torch.stack([load_image(r.image, model.config.image_size).permute(2, 0, 1) for r in records[i : i + 50]])
            codes.append(model.encode_to_indices(images.to(model.device)).reshape(-1))
    codes = torch.cat(codes)
    size = model.quantizer.codebook_size
    return {"codes_used": torch.unique(codes).numel() / size, "perplexity": float(code_perplexity(codes, size)),
            "codebook_size": size, "step": step}


def score(config: Path, data: Path, eval_scenes: Path) -> dict:
    from vq3d_nerfstudio.scripts.evaluate import evaluate_run

    summary, _ = evaluate_run(config, eval_scenes)
    return {**summary_row(summary), **codes_in_use(config, data)}


def seconds_per_step(run_dir: Path) -> float:
    """Median training step (seconds), the first tenth (start-up, warm-up) left out."""
    times = [e.value for e in train_iter_events(run_dir)]
    return statistics.median(times[len(times) // 10:]) if times else float("nan")


def event_minutes(run_dir: Path) -> float:
    """Minutes from the first to the last logged training step of a run (start-up not included)."""
    steps = train_iter_events(run_dir)
    return (steps[-1].wall_time - steps[0].wall_time) / 60


def train_and_score(name: str, extra: list, args, to_row=summary_row) -> dict:
    """One row of a `vq3d eval`-scored ablation: `ns-train vq3d-tiny` with ``extra`` flags for
    ``args.steps`` steps on ``args.data`` into ``args.out/name``, scored on ``args.eval_scenes`` and
    turned into table figures by ``to_row(summary)``; kept in ``result.json`` and reused."""
    from vq3d_nerfstudio.scripts.evaluate import evaluate_run

    out = args.out / name
    result_file = out / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    meta = train(out, args.data, extra, steps=args.steps)
    run_dir = out / "run" / "vq3d-tiny" / "run"
    summary, _ = evaluate_run(run_dir / "config.yml", args.eval_scenes)
    row = {"steps": args.steps, **meta, "s_per_step": seconds_per_step(run_dir), **to_row(summary)}
    result_file.write_text(json.dumps(row, indent=1))
    print(name, row, flush=True)
    return row


def run_row(name: str, extra: list, data: Path, args) -> dict:
    out = args.out / name
    result_file = out / "result.json"
    run_dir = out / "run" / "vq3d-tiny" / "run"
    if result_file.exists():
        return {**json.loads(result_file.read_text()), "s_per_step": seconds_per_step(run_dir)}
    meta = train(out, data, extra, steps=args.steps)
    row = {"steps": args.steps, **meta, "s_per_step": seconds_per_step(run_dir), **score(run_dir / "config.yml", data, args.eval_scenes)}
    result_file.write_text(json.dumps(row, indent=1))
    print(name, row, flush=True)
    return row


COLUMNS = [
    ("canonical PSNR", "canonical_psnr", "{:.2f}"), ("SSIM", "canonical_ssim", "{:.3f}"),
    ("novel PSNR", "novel_psnr", "{:.2f}"), ("novel - floor", "novel_gain", "{:+.2f}"),
    ("AbsRel in", "abs_rel_input", "{:.3f}"), ("δ<1.25 in", "delta1_input", "{:.3f}"),
    ("AbsRel novel", "abs_rel_novel", "{:.3f}"), ("δ<1.25 novel", "delta1_novel", "{:.3f}"),
    ("codes used", "codes_used", "{:.0%}"), ("perplexity", "perplexity", "{:.0f}"),
    ("s/step", "s_per_step", "{:.3f}"), ("minutes", "wall_min", "{:.1f}"),
]


def published_lines(section: str) -> dict:
    """Row name -> its table line in BENCHMARKS.md's ``section`` as published (rows not rerun keep it)."""
    lines = read_section(section).splitlines()
    return {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and line.count("|") > 3}


def published_relative_revision(section: str = "quality-levers-final") -> str:
    """The revision the published relative-depth run was made at (its column header says it once kept)."""
    body = read_section(section)
    kept = re.search(r"relative depth \(revision (\w+)", body) or re.search(r"Revision (\w+)", body)
    return kept.group(1) if kept else "unknown"


def published_goal_column(section: str, labels: list, keys: list) -> dict:
    """The last column (relative depth) of the goal table in BENCHMARKS.md's ``section``, by key."""
    lines = published_lines(section)
    return {key: float(lines[label].rstrip(" |").split("|")[-1]) for label, key in zip(labels, keys)}


def table(rows: list, published: Optional[dict] = None) -> str:
    """Markdown table; a row whose result is None takes its line from ``published``."""
    head = "| row | vs | change | " + " | ".join(c[0] for c in COLUMNS) + " |\n"
    head += "|---" * (3 + len(COLUMNS)) + "|\n"
    lines = []
    for name, versus, change, row in rows:
        if row is None:
            if name in (published or {}):
                lines.append(published[name])
            continue
        row = dict(row, novel_gain=row["novel_psnr"] - row["still_psnr"])
        cells = [fmt.format(row[key]) for _, key, fmt in COLUMNS]
        lines.append(f"| {name} | {versus or '-'} | {change} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps per ablation row (the same for all)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (default: all)")
    parser.add_argument("--data", type=Path, default=Path("data/synth"), help="training scenes (made if missing)")
    parser.add_argument("--eval-scenes", type=Path, default=Path("data/synth_eval"), help="unseen scenes (made if missing)")
    parser.add_argument("--out", type=Path, default=Path("outputs/quality_levers"), help="runs and per-row results")
    parser.add_argument("--final", action="store_true", help="train (or score) the chosen preset at the full budget")
    parser.add_argument("--budget-min", type=float, default=15.0, help="--final: wall-clock training budget")
    parser.add_argument("--final-run", type=Path, default=None, help="--final: score this run folder instead of training")
    parser.add_argument("--keep-published-relative", action="store_true",
                        help="--final: keep BENCHMARKS.md's relative-depth row instead of training it again")
    args = parser.parse_args()

    from vq3d_nerfstudio.data.synth import write_scenes

    write_scenes(args.data, num_scenes=1000, resolution=64, num_views=7, seed=0)
    write_scenes(args.eval_scenes, num_scenes=20, resolution=64, num_views=7, seed=1)
    relative_data = make_relative_folder(args.data, args.out / "relative_data")
    if args.final:
        final(args, relative_data)
        return
    done = []
    for name, versus, change, extra in ROWS:
        if args.rows is None or name in args.rows or (args.out / name / "result.json").exists():
            done.append((name, versus, change, run_row(name, extra, args.data, args)))
        else:
            done.append((name, versus, change, None))  # not rerun: its published line stays
    ran = [name for name, _, _, row in done if row is not None and (args.rows is None or name in args.rows)]
    body = (
        "## Quality levers (`vq3d-tiny`, issue 14's ablation)\n\n"
        f"{table(done, published_lines('quality-levers'))}\n\n"
        f"Each row: `ns-train vq3d-tiny` for {args.steps} steps (8 images a step) on 1000 `vq3d synth` scenes "
        "(input views only, seed 0), then `vq3d eval` on 20 unseen scenes (`--seed 1`, 7 views at 64 px: the "
        "input and novel views 10 and 20 degrees away). 'vs' names the row it changes one thing of; "
        "'novel - floor' is novel PSNR minus the PSNR of the unmoved input image against the novel frames. "
        "Depth is scored after the protocol's alignment (no per-image fitting). Codes used / perplexity: "
        "the first 500 training images' tokens. s/step is the median training step; minutes are the "
        "wall-clock of `ns-train` (start-up included) on 2 cores (the baseline row shared the cores with a "
        "2-minute test run for part of its training, so its s/step is slightly high).\n\n"
        f"Machine: {machine()}. Revision {git_revision()} for the rows run this time ({', '.join(ran) or 'none'}); "
        "the other rows keep their published lines (the first seven: revision 2334302). Run here (CPU).\n\n"
        f"Command: `.venv/bin/python benchmarks/quality_levers.py --steps {args.steps}`\n"
    )
    print(body)
    update_section("quality-levers", body)


def final(args, relative_data: Path) -> None:
    """The chosen preset at the full budget, metric and relative depth."""
    rows = []
    for name, data in (("final", args.data), ("final-relative", relative_data)):
        out = args.out / name
        result_file = out / "result.json"
        if name == "final" and args.final_run is not None:
            run_dir = args.final_run
            meta = {"wall_min": event_minutes(run_dir)}
            if result_file.exists():  # scored before: the run it scored is the same
                rows.append((name, {**json.loads(result_file.read_text()), **meta}))
                continue
        elif result_file.exists():
            rows.append((name, json.loads(result_file.read_text())))
            continue
        elif args.keep_published_relative:
            rows.append((name, None))
            continue
        else:  # the relative-depth run gets the metric run's steps (or, with no steps known, the budget)
            steps = rows[0][1]["steps"] + 1 if rows else 0  # a checkpoint is named by its last step, from 0
            meta = train(out, data, [], steps=steps, budget_min=0.0 if steps else args.budget_min)
            run_dir = out / "run" / "vq3d-tiny" / "run"
        checkpoint = sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))[-1]
        meta["steps"] = int(checkpoint.stem.split("-")[1])
        row = {**meta, "s_per_step": seconds_per_step(run_dir), **score(run_dir / "config.yml", data, args.eval_scenes)}
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(row, indent=1))
        rows.append((name, row))
        print(name, row, flush=True)
    goals = [
        ("held-out canonical PSNR", "canonical_psnr", ">= 24 dB", lambda r: r["canonical_psnr"] - 24.0, "{:+.2f} dB"),
        ("novel PSNR above the floor", "novel_gain", ">= +3 dB", lambda r: r["novel_gain"] - 3.0, "{:+.2f} dB"),
        ("input-view depth delta<1.25", "delta1_input", ">= 0.85", lambda r: r["delta1_input"] - 0.85, "{:+.3f}"),
    ]
    metric = dict(rows[0][1], novel_gain=rows[0][1]["novel_psnr"] - rows[0][1]["still_psnr"])
    kept = rows[1][1] is None
    if kept:  # the published relative-depth figures stay (and say so)
        relative = published_goal_column("quality-levers-final", [g[0] for g in goals], [g[1] for g in goals])
    else:
        relative = dict(rows[1][1], novel_gain=rows[1][1]["novel_psnr"] - rows[1][1]["still_psnr"])
    header = f"relative depth (revision {published_relative_revision()}, not rerun)" if kept else "relative depth"
    lines = [f"| goal | target | metric depth | margin | {header} |", "|---|---|---|---|---|"]
    for label, key, target, margin, fmt in goals:
        lines.append(f"| {label} | {target} | {metric[key]:.3f} | {fmt.format(margin(metric))} | {relative[key]:.3f} |")
    lines.append(f"| relative-depth δ<1.25 within 0.1 of metric | >= -0.1 | | | {relative['delta1_input'] - metric['delta1_input']:+.3f} |")
    body = (
        "## The chosen `vq3d-tiny` preset at the full budget\n\n"
        + "\n".join(lines) + "\n\n"
        + table([(n, None, "chosen preset" + (", relative depth" if "relative" in n else ""), r) for n, r in rows],
                published_lines("quality-levers-final"))
        + f"\n\nBoth runs: `ns-train vq3d-tiny` with the preset's defaults on 2 cores, to its last step "
        f"({rows[0][1]['steps'] + 1}; the relative-depth run for the same steps); scored as in the table above. "
        + ("The metric-depth run is `make demo`'s (minutes: first to last logged step). " if args.final_run else "")
        + "The relative-depth run trains on the same images as a flat folder with depth `a / z + b` "
        "(random a in [0.2, 5], b in [-1, 1] per image, depth_kind disparity)."
        + (" It was not rerun this time (`--keep-published-relative`): its row and column are the published "
           f"run's, made at revision {published_relative_revision()} with that revision's preset." if kept else "") + "\n\n"
        f"Machine: {machine()}. Revision {git_revision()}. Run here (CPU).\n\n"
        f"Command: `.venv/bin/python benchmarks/quality_levers.py --final --budget-min {args.budget_min:.0f}`"
        + (f" `--final-run {args.final_run}`" if args.final_run else "")
        + (" `--keep-published-relative`" if kept else "") + "\n"
    )
    print(body)
    update_section("quality-levers-final", body)


if __name__ == "__main__":
    main()

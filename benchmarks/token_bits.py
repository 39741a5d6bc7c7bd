"""Benchmark: more bits per token in 3D (issue 22): `vq3d-tiny` with G FSQ codes per token.

Each row is one real `ns-train vq3d-tiny` run at the preset's own budget (1650 steps, the schedule
over those steps), on the same 1000 `vq3d synth` scenes, differing from a named row by one change,
scored by `vq3d eval` on the 20 unseen `--seed 1` scenes (the columns of the quality-levers table).
The baseline is today's preset with no flags.

    .venv/bin/python benchmarks/token_bits.py [--rows preset groups-2 ...] [--steps 1650]

Finished rows are kept in `outputs/token_bits/<row>/result.json` and reused (delete to retrain).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from common import BIN, cli_env, git_revision, machine, update_section
from quality_levers import run_row, table

M = "--pipeline.model."
# (name, compared with, what changed, ns-train flags)
ROWS = [
    ("preset", None, "`vq3d-tiny` as it is: one FSQ (8,8,8,6,5) code a token (14 bits)", []),
    ("groups-2", "preset", "2 codes a token (groups 2: 28 bits)", ["fsq-quantizer", M + "quantizer.groups", "2"]),
    ("groups-4", "preset", "4 codes a token (groups 4: 56 bits)", ["fsq-quantizer", M + "quantizer.groups", "4"]),
    ("none", "preset", "no quantizer: continuous tokens (128 floats; no codes, so no stage 2)", ["no-quantizer"]),
    # round 2: where do the extra bits go in 3D?
    ("groups-8", "groups-4", "8 codes a token (groups 8: 112 bits)", ["fsq-quantizer", M + "quantizer.groups", "8"]),
    ("groups-4-rays", "groups-4", "4 codes a token, 1024 supervised rays an image (of 4096; 256 before)",
     ["--pipeline.datamanager.rays-per-image", "1024", "fsq-quantizer", M + "quantizer.groups", "4"]),
]


# stage-2 rows: (label, the stage-1 row whose codes it models, extra vq3d-train-stage2 flags, its folder)
DEPTH, ONE_SEQUENCE = ["--depth-layers", "2"], ["--depth-layers", "0"]
STAGE2_ROWS = [
    ("preset", "preset", [], "stage2"),
    ("groups-2", "groups-2", ONE_SEQUENCE, "stage2"),
    ("groups-2, depth head", "groups-2", DEPTH, "stage2-depth"),
    ("groups-4", "groups-4", ONE_SEQUENCE, "stage2"),
    ("groups-4, depth head", "groups-4", DEPTH, "stage2-depth"),
    ("groups-8, depth head", "groups-8", DEPTH, "stage2-depth"),
]


def stage2_row(run_dir: Path, out: Path, steps: int, extra: list = (), name: str = "stage2") -> dict:
    """`vq3d-train-stage2 --model tiny` (with ``extra`` flags) on a row's run for ``steps`` steps:
    held-out bits per code and per token (G codes), seconds per step; kept in ``out/<name>.json``."""
    result_file = out / f"{name}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    command = [str(BIN / "vq3d-train-stage2"), "--stage1-config", str(run_dir / "config.yml"), "--output-dir", str(folder),
               "--model", "tiny", "--max-steps", str(steps), "--eval-every", str(steps), "--save-every", str(steps),
               "--batch-size", "32", "--num-workers", "1", "--device", "cpu", *extra]
    print("running:", " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True, env=cli_env(), stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "train/loss" in r]
    info = json.loads(sorted((folder / "checkpoints").glob("step-*"))[-1].joinpath("config.json").read_text())
    groups = info["grid"][2] if len(info["grid"]) > 2 else 1
    bits = [r["eval/bits_per_token"] for r in rows if "eval/bits_per_token" in r][-1]
    row = {"bits_per_code": bits, "bits_per_token": bits * groups, "groups": groups,
           "s_per_step": (timed[-1]["time_s"] - timed[0]["time_s"]) / max(1, timed[-1]["step"] - timed[0]["step"]),
           "wall_min": (time.time() - start) / 60, "steps": steps}
    result_file.write_text(json.dumps(row, indent=1))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1650, help="training steps per row (the preset's own by default)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (default: all)")
    parser.add_argument("--data", type=Path, default=Path("data/synth"), help="training scenes (made if missing)")
    parser.add_argument("--eval-scenes", type=Path, default=Path("data/synth_eval"), help="unseen scenes (made if missing)")
    parser.add_argument("--out", type=Path, default=Path("outputs/token_bits"), help="runs and per-row results")
    parser.add_argument("--stage2-steps", type=int, default=0,
                        help="also train stage 2 (--model tiny) this many steps on each row's run (0: not)")
    parser.add_argument("--stage2-rows", nargs="*", default=None,
                        help="only these stage-2 rows, by label (default: all); the others show 'not run' "
                             f"(labels: {', '.join(repr(r[0]) for r in STAGE2_ROWS)})")
    args = parser.parse_args()

    from vq3d_nerfstudio.data.synth import write_scenes

    write_scenes(args.data, num_scenes=1000, resolution=64, num_views=7, seed=0)
    write_scenes(args.eval_scenes, num_scenes=20, resolution=64, num_views=7, seed=1)
    rows = []
    for name, versus, change, extra in ROWS:
        done = (args.out / name / "result.json").exists()
        if args.rows is not None and name not in args.rows and not done:
            continue
        rows.append((name, versus, change, run_row(name, extra, args.data, args)))
    stage2 = []
    if args.stage2_steps:
        stage2 = ["| row | bits per code | codes per token | bits per token | s/step | minutes (with encoding) |",
                  "|---|---|---|---|---|---|"]
        done = {name for name, _, _, row in rows if row}
        for label, source, extra, folder in STAGE2_ROWS:
            out = args.out / source
            if source not in done or (args.stage2_rows is not None and label not in args.stage2_rows
                                      and not (out / f"{folder}.json").exists()):
                stage2.append(f"| {label} | not run | | | | |")
                continue
            r = stage2_row(out / "run" / "vq3d-tiny" / "run", out, args.stage2_steps, extra, folder)
            stage2.append(f"| {label} | {r['bits_per_code']:.2f} | {r['groups']} | {r['bits_per_token']:.2f} | "
                          f"{r['s_per_step']:.3f} | {r['wall_min']:.1f} |")
        stage2 = ["", f"Stage 2 on each run's codes: `vq3d-train-stage2 --model tiny --batch-size 32` for {args.stage2_steps} "
                  "steps, held-out bits per code and per token (G codes). A token's G codes are read as one sequence, in a row "
                  "(`--depth-layers 0`), or with a depth head (`--depth-layers 2`, now the default: a spatial transformer over "
                  "tokens, 2 layers over a token's codes; RQ-Transformer); a uniform guess is `log2(15360)` = 13.9 bits a code:", "", *stage2]
    body = (
        "## More bits per token in 3D (`vq3d-tiny`, issue 22)\n\n"
        + table(rows) + "\n" + "\n".join(stage2) + "\n\n"
        f"Each row: `ns-train vq3d-tiny` with the row's flags for {args.steps} steps (the learning-rate schedule over "
        "those steps), scored by `vq3d eval` on the 20 unseen `vq3d synth --seed 1` scenes; codes used and perplexity "
        "over the first 500 training images' codes (every group's). s/step: median training step.\n\n"
        f"Machine: {machine()}. Revision {git_revision()}. Run here (CPU).\n\n"
        f"Command: `.venv/bin/python benchmarks/token_bits.py --steps {args.steps} --stage2-steps {args.stage2_steps}"
        + (" --stage2-rows " + " ".join(f"'{label}'" for label in args.stage2_rows) if args.stage2_rows else "") + "`\n"
    )
    print(body)
    update_section("token-bits", body)


if __name__ == "__main__":
    main()

"""Benchmark: single-view training (the paper's setting) vs multi-view supervision (issue 15).

Two real `ns-train vq3d-tiny` runs on the same 1000 `vq3d synth` scenes (7 views each, seed 0) for
the same number of steps (8 input images a step, 256 rays each):
1. the preset: frame 0 of every scene, reconstructed from the canonical camera;
2. `--pipeline.datamanager.use-multiview-supervision True`: frame 0 encoded, and each step's 256 rays
   per image shared between it and 2 other views of its scene drawn at random, rendered from their
   cameras relative to the input (the alignment `vq3d eval` uses), with their depth.
Both are scored by `vq3d eval` on 20 scenes never trained on (`--seed 1`, 7 views at 64 px):
canonical PSNR, novel-view PSNR against the 'nothing moves' floor (the input image scored against
the novel frames), depth delta<1.25 and AbsRel. Goal (issue 15): novel views >= 6 dB above the floor
with multi-view supervision.

    .venv/bin/python benchmarks/multiview.py [--steps 1000]

Finished rows are kept in `outputs/multiview/<row>/result.json` and reused on a rerun (delete the
folder to retrain).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import git_revision, machine, update_section
from quality_levers import train_and_score

ROWS = [
    ("single-view", "the preset: input views only", []),
    ("multiview", "+ 2 supervising views per input", ["--pipeline.datamanager.use-multiview-supervision", "True",
                                                      "--pipeline.datamanager.multiview-views", "2"]),
]
GOAL_DB = 6.0


def table(rows: list) -> str:
    lines = ["| training | canonical PSNR | novel PSNR | floor | novel - floor | δ<1.25 in | δ<1.25 novel | "
             "AbsRel novel | s/step | minutes |", "|---" * 10 + "|"]
    for name, change, r in rows:
        lines.append(
            f"| {name} ({change}) | {r['canonical_psnr']:.2f} | {r['novel_psnr']:.2f} | {r['still_psnr']:.2f} | "
            f"{r['novel_psnr'] - r['still_psnr']:+.2f} | {r['delta1_input']:.3f} | {r['delta1_novel']:.3f} | "
            f"{r['abs_rel_novel']:.3f} | {r['s_per_step']:.3f} | {r['wall_min']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="training steps of each run (the same for both)")
    parser.add_argument("--data", type=Path, default=Path("data/synth"), help="training scenes (made if missing)")
    parser.add_argument("--eval-scenes", type=Path, default=Path("data/synth_eval"), help="unseen scenes (made if missing)")
    parser.add_argument("--num-scenes", type=int, default=1000, help="training scenes to make when --data is missing")
    parser.add_argument("--out", type=Path, default=Path("outputs/multiview"), help="runs and per-row results")
    args = parser.parse_args()

    from vq3d_nerfstudio.data.synth import write_scenes

    write_scenes(args.data, num_scenes=args.num_scenes, resolution=64, num_views=7, seed=0)
    write_scenes(args.eval_scenes, num_scenes=20, resolution=64, num_views=7, seed=1)
    rows = [(name, change, train_and_score(name, extra, args)) for name, change, extra in ROWS]
    gain = rows[1][2]["novel_psnr"] - rows[1][2]["still_psnr"]
    body = (
        "## Multi-view supervision vs single views (`vq3d-tiny`, issue 15)\n\n"
        f"{table(rows)}\n\n"
        f"Goal: novel views >= {GOAL_DB:g} dB above the floor with multi-view supervision: "
        f"{gain:+.2f} dB ({'met' if gain >= GOAL_DB else 'not met'}).\n\n"
        f"Each run: `ns-train vq3d-tiny` for {args.steps} steps (8 input images a step, 256 rays each) on "
        f"{args.num_scenes} `vq3d synth` scenes (7 views, seed 0); the single-view run reads frame 0 of each "
        "scene, the multi-view run encodes frame 0 and shares each image's rays between it and 2 other views "
        "of its scene (yaw +-10/+-20, elevation +-10 degrees), with their depth. Scored by `vq3d eval` on 20 "
        "unseen scenes (`--seed 1`, 7 views at 64 px: the input and novel views 10 and 20 degrees away); "
        "'floor' is the PSNR of the unmoved input image against the novel frames. s/step: median training "
        "step; minutes: wall-clock of `ns-train` on 2 cores."
        + "".join(f" The {name} row is the run of {r['source']}, reused." for name, _, r in rows if "source" in r)
        + "\n\n"
        f"Machine: {machine()}. Revision {git_revision()}. Run here (CPU).\n\n"
        f"Command: `.venv/bin/python benchmarks/multiview.py --steps {args.steps}`\n"
    )
    print(body)
    update_section("multiview", body)


if __name__ == "__main__":
    main()

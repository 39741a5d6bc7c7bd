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
from pathlib import Path

from common import git_revision, machine, update_section
from quality_levers import run_row, table

M = "--pipeline.model."
# (name, compared with, what changed, ns-train flags)
ROWS = [
    ("preset", None, "`vq3d-tiny` as it is: one FSQ (8,8,8,6,5) code a token (14 bits)", []),
    ("groups-2", "preset", "2 codes a token (fsq-groups 2: 28 bits)", [M + "fsq-groups", "2"]),
    ("groups-4", "preset", "4 codes a token (fsq-groups 4: 56 bits)", [M + "fsq-groups", "4"]),
    ("none", "preset", "no quantizer: continuous tokens (128 floats; no codes, so no stage 2)", [M + "quantizer", "none"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1650, help="training steps per row (the preset's own by default)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (default: all)")
    parser.add_argument("--data", type=Path, default=Path("data/synth"), help="training scenes (made if missing)")
    parser.add_argument("--eval-scenes", type=Path, default=Path("data/synth_eval"), help="unseen scenes (made if missing)")
    parser.add_argument("--out", type=Path, default=Path("outputs/token_bits"), help="runs and per-row results")
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
    body = (
        "## More bits per token in 3D (`vq3d-tiny`, issue 22)\n\n"
        + table(rows) + "\n\n"
        f"Each row: `ns-train vq3d-tiny` with the row's flags for {args.steps} steps (the learning-rate schedule over "
        "those steps), scored by `vq3d eval` on the 20 unseen `vq3d synth --seed 1` scenes; codes used and perplexity "
        "over the first 500 training images' codes (every group's). s/step: median training step.\n\n"
        f"Machine: {machine()}. Revision {git_revision()}. Run here (CPU).\n\n"
        f"Command: `.venv/bin/python benchmarks/token_bits.py --steps {args.steps}`\n"
    )
    print(body)
    update_section("token-bits", body)


if __name__ == "__main__":
    main()

"""Benchmark: novel views against what one image allows (issue 23), one lever a row.

Each row is one real `ns-train vq3d-tiny` run at the preset's budget (1650 steps, the schedule over
those steps) on the same 1000 `vq3d synth` scenes, differing from the preset by one change, scored by
`vq3d eval` on the 20 unseen `--seed 1` scenes with its novel-view yardstick: the 'nothing moves'
floor, the perfect-geometry ceiling (the true input warped through the true geometry), the share of
the floor-to-ceiling gap the row gains, PSNR on co-visible pixels, and depth on the objects alone
(`vq3d synth`'s masks).

    .venv/bin/python benchmarks/novel_views.py [--rows preset gan ...] [--steps 1650]

Finished rows are kept in `outputs/novel_views/<row>/result.json` and reused (delete to retrain);
rows not run this time keep their published line.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from common import git_revision, machine, read_section, update_section
from quality_levers import published_lines, train_and_score
from quality_over_budget import novel_mean, summary_row

M, D = "--pipeline.model.", "--pipeline.datamanager."
# (name, compared with, what changed, ns-train flags)
ROWS = [
    ("preset", None, "`vq3d-tiny` as it is", []),
    ("gan", "preset", "novel-view adversarial loss 0.1 once the reconstruction has formed (from step 800, ramped over 400)",
     [M + "adversarial.loss-mult", "0.1", M + "adversarial.start-step", "800", M + "adversarial.ramp-steps", "400"]),
    ("multiview", "preset", "2 supervising views an input (issue 15), against the ceiling",
     [D + "use-multiview-supervision", "True", D + "multiview-views", "2"]),
    ("margin-6", "preset", "6 margin texels around the planes (3): more plane for what a 20 degree view sees",
     [M + "triplane-margin", "6"]),
    ("rays-1024", "preset", "1024 supervised rays an image (of 4096; 256)", [D + "rays-per-image", "1024"]),
    # round 2
    ("gan-stable", "gan", "the same GAN with VQGAN's recipe: adaptive weight, discriminator rate 1e-4 (1e-3), its gradients clipped to norm 1",
     [M + "adversarial.loss-mult", "0.1", M + "adversarial.start-step", "800", M + "adversarial.ramp-steps", "400",
      M + "adversarial.use-adaptive-weight", "True", "--optimizers.discriminator.optimizer.lr", "1e-4",
      "--optimizers.discriminator.optimizer.max-norm", "1.0"]),
    ("multiview-decoded-margin", "multiview", "the decoder writes a 4-texel margin (a ring of learned query tokens) instead of replicating 3 edge texels",
     [D + "use-multiview-supervision", "True", D + "multiview-views", "2", M + "triplane-margin", "4",
      M + "triplane-margin-source", "decoded"]),
    ("decoded-margin", "preset", "the decoder-written 4-texel margin alone (single views): is the collapse above the margin's?",
     [M + "triplane-margin", "4", M + "triplane-margin-source", "decoded"]),
]

# (header, key, format); gap = (novel - floor) / (ceiling - floor) over the novel views
COLUMNS = [
    ("canonical PSNR", "canonical_psnr", "{:.2f}"), ("novel PSNR", "novel_psnr", "{:.2f}"),
    ("floor", "still_psnr", "{:.2f}"), ("ceiling", "ceiling_psnr", "{:.2f}"), ("gap gained", "gap_gained", "{:.0%}"),
    ("co-visible PSNR", "covisible_psnr", "{:.2f}"), ("co-visible - canonical", "covisible_drop", "{:+.2f}"),
    ("δ<1.25 in", "delta1_input", "{:.3f}"), ("δ<1.25 novel", "delta1_novel", "{:.3f}"),
    ("objects δ in", "fg_delta1_input", "{:.3f}"), ("objects δ novel", "fg_delta1_novel", "{:.3f}"),
    ("objects PSNR in", "fg_psnr_input", "{:.2f}"), ("s/step", "s_per_step", "{:.3f}"), ("minutes", "wall_min", "{:.1f}"),
]
GOALS = [("gap gained", "gap_gained", ">=", 0.80), ("co-visible - canonical", "covisible_drop", ">=", -1.5),
         ("δ<1.25 novel", "delta1_novel", ">=", 0.85), ("objects δ in", "fg_delta1_input", ">=", 0.80),
         ("objects δ novel", "fg_delta1_novel", ">=", 0.70)]


def yardstick_row(summary: dict) -> dict:
    """A `vq3d eval` summary's figures for this table (novel views pooled over offsets by count)."""
    row = summary_row(summary)
    row["ceiling_psnr"] = novel_mean(summary, "ceiling_psnr")
    row["covisible_psnr"] = novel_mean(summary, "covisible_psnr")
    row["covisible_fraction"] = novel_mean(summary, "covisible_fraction")
    row["gap_gained"] = (row["novel_psnr"] - row["still_psnr"]) / (row["ceiling_psnr"] - row["still_psnr"])
    row["covisible_drop"] = row["covisible_psnr"] - row["canonical_psnr"]
    row["fg_delta1_input"] = summary["0"].get("fg_delta1", float("nan"))
    row["fg_psnr_input"] = summary["0"].get("fg_psnr", float("nan"))
    row["fg_delta1_novel"] = novel_mean(summary, "fg_delta1")
    return row


def table(rows: list, published: dict) -> str:
    lines = ["| row | vs | change | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * (3 + len(COLUMNS)) + "|"]
    for name, versus, change, row in rows:
        if row is None:
            lines.append(published.get(name, f"| {name} | {versus or '-'} | {change} | not run |" + " |" * (len(COLUMNS) - 1)))
            continue
        lines.append(f"| {name} | {versus or '-'} | {change} | " + " | ".join(f.format(row[k]) for _, k, f in COLUMNS) + " |")
    return "\n".join(lines)


def published_goals_and_commands() -> tuple:
    """The published goals paragraph and command lines (``- `command` (revision R)``), kept when a
    later run does not rescore the preset or reruns only some rows."""
    body = read_section("novel-views")
    goals = re.search(r"^Goals \(issue 23\).*$", body, re.M)
    commands = re.findall(r"^- (`\.venv/bin/python benchmarks/novel_views\.py[^`]*` \(revision \S+\))$", body, re.M)
    return (goals.group(0) + "\n\n" if goals else ""), commands


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1650, help="training steps per row (the preset's own by default)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (default: all); the others keep their published line")
    parser.add_argument("--data", type=Path, default=Path("data/synth"), help="training scenes (made if missing)")
    parser.add_argument("--eval-scenes", type=Path, default=Path("data/synth_eval"), help="unseen scenes (made if missing)")
    parser.add_argument("--out", type=Path, default=Path("outputs/novel_views"), help="runs and per-row results")
    args = parser.parse_args()

    from vq3d_nerfstudio.data.synth import write_scenes

    write_scenes(args.data, num_scenes=1000, resolution=64, num_views=7, seed=0)
    write_scenes(args.eval_scenes, num_scenes=20, resolution=64, num_views=7, seed=1)
    rows = []
    for name, versus, change, extra in ROWS:
        wanted = args.rows is None or name in args.rows or (args.out / name / "result.json").exists()
        rows.append((name, versus, change, train_and_score(name, extra, args, yardstick_row) if wanted else None))
    preset = rows[0][3]
    goals, commands = published_goals_and_commands()
    this = (f"`.venv/bin/python benchmarks/novel_views.py --steps {args.steps}"
            + (" --rows " + " ".join(args.rows) if args.rows else "") + f"` (revision {git_revision()})")
    commands = [c for c in commands if not c.startswith(this.split(" (revision")[0] + " ")]
    if preset is not None:
        met = [f"{label} {preset[key]:.2f} ({op} {target}: {'met' if preset[key] >= target else 'not met'})"
               for label, key, op, target in GOALS]
        goals = "Goals (issue 23) at the preset: " + "; ".join(met) + ".\n\n"
    body = (
        "## Novel views against what one image allows (`vq3d-tiny`, issue 23)\n\n"
        + table(rows, published_lines("novel-views")) + "\n\n" + goals
        + f"Each row: `ns-train vq3d-tiny` with the row's flags for {args.steps} steps (the learning-rate schedule over "
        "those steps), scored by `vq3d eval` on the 20 unseen `vq3d synth --seed 1` scenes (64 px, views at 10 and 20 "
        "degrees pooled). Floor: the input image scored against the novel frame ('nothing moves'). Ceiling: the true "
        "input warped through the true geometry, pixels the input cannot see left unmoved. Gap gained: (novel - floor) / "
        "(ceiling - floor). Co-visible: novel pixels whose surface the input sees. Objects: pixels of `vq3d synth`'s "
        "masks (not ground, not sky). s/step: median training step.\n\n"
        f"Machine: {machine()}. Run here (CPU). Commands, each row from the last one naming it "
        "(a row's result is reused until its `outputs/novel_views/<row>/result.json` is deleted):\n\n"
        + "".join(f"- {c}\n" for c in commands + [this])
    )
    print(body)
    update_section("novel-views", body)


if __name__ == "__main__":
    main()

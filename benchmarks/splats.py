"""Benchmark: `vq3d export-splats` on held-out scenes: how close the splat render is to the NeRF
render (PSNR) and how much faster it renders, on this CPU (no refinement: that needs a GPU).

Runs the real command once per held-out `vq3d synth` scene (seed 1) on a trained `vq3d-tiny` run and
reads the table it prints (input view and yaw 15 degrees, 64 px, 20k splats at most).

    .venv/bin/python benchmarks/splats.py --load-config outputs/bench_tiny/bench/vq3d-tiny/run/config.yml
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

from common import BIN, REPO, cli_env, git_revision, machine, update_section

ROW = re.compile(r"^(input view|yaw [\d.]+ deg)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-config", type=Path, default=REPO / "outputs/bench_tiny/bench/vq3d-tiny/run/config.yml")
    parser.add_argument("--scenes", type=Path, default=REPO / "data/synth_eval")
    parser.add_argument("--num-scenes", type=int, default=5)
    args = parser.parse_args()
    if not args.load_config.is_file():
        raise SystemExit(f"{args.load_config}: no trained run; run benchmarks/train_tiny.py first or pass --load-config")
    from vq3d_nerfstudio.data.synth import write_scenes

    write_scenes(args.scenes, num_scenes=20, resolution=64, num_views=7, seed=1)
    rows = {}
    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.num_scenes):
            image = args.scenes / f"scene_{i:05d}" / "images" / "frame_00000.png"
            result = subprocess.run(
                [str(BIN / "vq3d"), "export-splats", "--load-config", str(args.load_config), "--image", str(image),
                 "--output", f"{tmp}/scene{i}.ply", "--report-views", "0", "15"],
                env=cli_env(), capture_output=True, text=True, check=True,
            )
            counts += [int(m) for m in re.findall(r"\((\d+) splats;", result.stdout)]
            for line in result.stdout.splitlines():
                match = ROW.match(line.strip())
                if match:
                    rows.setdefault(match.group(1), []).append(tuple(float(match.group(k)) for k in (2, 3, 4)))
    lines = [
        "## Gaussian-splat export: splats vs the NeRF they came from (2 CPU cores)",
        "",
        f"Machine: {machine()}. Commit {git_revision()}. Command: `.venv/bin/python benchmarks/splats.py --load-config "
        f"<the 3000-step vq3d-tiny run of train_tiny.py>`: `vq3d export-splats` on {args.num_scenes} held-out "
        f"`vq3d synth` scenes (seed 1), {min(counts)}-{max(counts)} splats each, no refinement (it needs a GPU); "
        "64 px renders; the NeRF with the model's own renderer, the splats with the pure-torch CPU rasterizer.",
        "",
        "| view | PSNR splats vs NeRF (dB), mean (min-max) | NeRF ms/frame | splat ms/frame | speed-up |",
        "|---|---|---|---|---|",
    ]
    for view, values in rows.items():
        psnr = [v[0] for v in values]
        nerf = statistics.median(v[1] for v in values)
        splat = statistics.median(v[2] for v in values)
        lines.append(f"| {view} | {statistics.mean(psnr):.1f} ({min(psnr):.1f}-{max(psnr):.1f}) | {nerf:.0f} | {splat:.0f} | {nerf / splat:.1f}x |")
    lines += ["", "Times are medians over the scenes. On a GPU the splats would render with gsplat's CUDA rasterizer instead."]
    body = "\n".join(lines)
    print(body)
    update_section("splats", body)


if __name__ == "__main__":
    main()

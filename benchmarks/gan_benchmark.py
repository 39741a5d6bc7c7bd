"""Benchmark: reconstruction-only training vs + novel-view adversarial training, same CPU budget.

Three `ns-train vq3d-tiny` runs on the same 1000 `vq3d synth` scenes, each stopped (Ctrl-C, which
saves a checkpoint) after the same CPU time of its process tree (user + system seconds, so other
work on the machine does not change the budget):
1. reconstruction only (the default `vq3d-tiny`);
2. + the adversarial loss on canonical and novel-view renders (`--pipeline.model.adversarial.loss-mult 0.1`);
3. as 2, with the discriminator also seeing the disparity channel.
Each is scored by `vq3d eval` on 20 unseen scenes (`vq3d synth --seed 1`, 64 px): canonical PSNR,
novel-view PSNR and SSIM against the scenes' true novel views. Prints a table and updates
BENCHMARKS.md.

    .venv/bin/python benchmarks/gan_benchmark.py [--cpu-min 12]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
from common import BIN, cli_env, git_revision, machine, update_section
from quality_over_budget import novel_mean

# The tiny preset starts the adversarial loss at step 500; a GAN step costs ~2.8x a reconstruction
# step on 2 cores (the extra renders and D), so within this budget a GAN run makes ~370 steps: the
# benchmark starts the adversarial loss at step 100, ramped over 100 steps.
GAN = ["--pipeline.model.adversarial.loss-mult", "0.1", "--pipeline.model.adversarial.start-step", "100",
       "--pipeline.model.adversarial.ramp-steps", "100"]
VARIANTS = {
    "reconstruction only": [],
    "+ novel-view GAN": GAN,
    "+ novel-view GAN, D sees disparity": [*GAN, "--pipeline.model.adversarial.use-disparity", "True"],
}


def tree_cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def train(name: str, extra: list, args, out: Path) -> tuple:
    slug = "".join(c if c.isalnum() else "_" for c in name)
    command = [str(BIN / "ns-train"), "vq3d-tiny", "--data", str(args.data), "--vis", "tensorboard",
               "--output-dir", str(out), "--experiment-name", slug, "--timestamp", "run",
               "--max-num-iterations", "100000", *extra]
    print("running:", " ".join(command), flush=True)
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    start, cpu = time.time(), 0.0
    while proc.poll() is None:
        cpu = max(cpu, tree_cpu_seconds(ps))
        if cpu > args.cpu_min * 60:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=180)
            break
        time.sleep(0.5)
    run_dir = out / slug / "vq3d-tiny" / "run"
    step = max(int(c.stem.split("-")[1]) for c in (run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    print(f"  {name}: {step + 1} steps, {cpu / 60:.1f} CPU-min, {(time.time() - start) / 60:.1f} min", flush=True)
    return run_dir / "config.yml", step + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-min", type=float, default=12.0, help="CPU-minutes (user + system) per run")
    parser.add_argument("--data", type=Path, default=Path("data/synth"), help="training scenes (made if missing)")
    parser.add_argument("--eval-scenes", type=Path, default=Path("data/synth_eval"), help="unseen scenes (made if missing)")
    parser.add_argument("--variants", type=int, nargs="+", default=[0, 1, 2],
                        help="which runs: 0 reconstruction only, 1 + GAN, 2 + GAN with disparity")
    args = parser.parse_args()

    from vq3d_nerfstudio.data.synth import write_scenes
    from vq3d_nerfstudio.scripts.evaluate import evaluate_run

    write_scenes(args.data, num_scenes=1000, resolution=64, num_views=7, seed=0)
    write_scenes(args.eval_scenes, num_scenes=20, resolution=64, num_views=7, seed=1)
    out = Path(tempfile.mkdtemp(prefix="vq3d_gan_"))
    rows = {}
    for name, extra in [list(VARIANTS.items())[i] for i in args.variants]:
        config, steps = train(name, extra, args, out)
        summary, _ = evaluate_run(config, args.eval_scenes)
        rows[name] = {"steps": steps, "canonical_psnr": summary["0"]["psnr"], "novel_psnr": novel_mean(summary, "psnr"),
                      "novel_ssim": novel_mean(summary, "ssim"), "still_psnr": novel_mean(summary, "still_psnr"),
                      "abs_rel_novel": novel_mean(summary, "abs_rel")}
        print(name, rows[name], flush=True)
    (out / "gan.json").write_text(json.dumps(rows, indent=1))
    lines = [f"| {name} | {r['steps']} | {r['canonical_psnr']:.2f} | {r['novel_psnr']:.2f} | {r['novel_ssim']:.3f} | "
             f"{r['abs_rel_novel']:.3f} |" for name, r in rows.items()]
    floor = next(iter(rows.values()))["still_psnr"]
    body = (
        "## Novel-view adversarial training vs reconstruction only (same CPU budget)\n\n"
        "| training | steps in budget | canonical PSNR (dB) | novel PSNR (dB) | novel SSIM | novel depth AbsRel |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
        f"Each run: `ns-train vq3d-tiny` for {args.cpu_min:g} CPU-minutes (user + system time of the training "
        "process tree) on 1000 `vq3d synth` scenes; the GAN runs use the preset's GAN settings (32 px "
        "canonical + novel renders of 4 images per step, yaw +-30 / elevation +-15 degrees, non-saturating "
        "loss, R1 gamma 1 every 4 steps, adversarial weight 0.1 ramped in over steps 100-200). Scored by "
        "`vq3d eval` on 20 unseen scenes (`--seed 1`) at 64 px; novel views are 10 and 20 degrees from the "
        f"input; the 'nothing moves' floor on them is {floor:.2f} dB.\n\n"
        f"Machine: {machine()}. Revision {git_revision()}. Run here (CPU).\n\n"
        f"Command: `.venv/bin/python benchmarks/gan_benchmark.py --cpu-min {args.cpu_min:g} --variants "
        f"{' '.join(map(str, args.variants))}`\n"
    )
    print(body)
    update_section("gan-vs-reconstruction", body)


if __name__ == "__main__":
    main()

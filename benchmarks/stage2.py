"""Benchmark: stage 2 on 2 CPU cores.

1. Sampling speed, with and without the KV cache, of randomly initialised transformers (speed does
   not depend on the weights): `tiny` over an 8x8 grid of 1024 codes and `paper` over a 32x32 grid
   of 8192 codes (fixed sizes, not read from the presets, which give 16x16 and 32x32 tokens of
   15,360 codes). Without the cache every step re-runs the whole prefix; for the
   paper size that is hours per scene on a CPU, so that path is timed over the first
   --paper-uncached-tokens tokens only (later tokens cost more, so its tokens/s is an upper bound).
2. Held-out bits per token against training time: `vq3d-train-stage2 --model tiny` on a trained
   vq3d-tiny run (encoding its data to tokens first), beside two references computed from the same
   token cache: a uniform guess (log2 of the codebook size) and the training codes' frequencies
   (a model that ignores context and class).
3. Samples of each class from the trained model, rendered by `vq3d sample`, stacked into
   docs/stage2_samples.png for the README.

    .venv/bin/python benchmarks/stage2.py --stage1-config outputs/bench_tiny/bench/vq3d-tiny/run/config.yml

(`benchmarks/train_tiny.py` makes that stage-1 run.)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
from common import BIN, REPO, cli_env, git_revision, machine, update_section


def time_sampling(preset: str, vocab: int, grid: int, batch: int, use_cache: bool, max_tokens: int = 0) -> dict:
    """Seconds to draw ``batch`` scenes (or their first ``max_tokens`` tokens)."""
    from vq3d_nerfstudio.stage2.transformer import PRESETS, TokenTransformer, TokenTransformerConfig, sample_tokens

    torch.manual_seed(0)
    config = TokenTransformerConfig(vocab_size=vocab, num_classes=1000, block_size=grid * grid, **PRESETS[preset])
    model = TokenTransformer(config).eval()
    if max_tokens:
        model.config.block_size = max_tokens  # sample_tokens draws block_size tokens
    classes = torch.arange(batch) % 1000
    if grid <= 8:  # warm-up (allocator, kernels) where it is cheap
        sample_tokens(model, classes[:1], generator=torch.Generator().manual_seed(0), use_kv_cache=use_cache)
    start = time.perf_counter()
    tokens = sample_tokens(model, classes, generator=torch.Generator().manual_seed(0), use_kv_cache=use_cache)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {"preset": preset, "params_m": params / 1e6, "grid": grid, "vocab": vocab, "batch": batch,
            "cache": use_cache, "tokens": tokens.shape[1], "seconds": seconds,
            "tokens_per_s": tokens.numel() / seconds, "s_per_scene": seconds / batch * (grid * grid / tokens.shape[1])}


def unigram_bits(cache) -> float:
    """Held-out bits per token of the training codes' frequencies (add-one smoothed)."""
    counts = np.bincount(np.asarray(cache.train.codes).reshape(-1), minlength=cache.codebook_size).astype(np.float64) + 1
    probs = counts / counts.sum()
    held = np.asarray(cache.eval.codes).reshape(-1)
    return float(-np.log2(probs[held]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1-config", type=Path, default=REPO / "outputs/bench_tiny/bench/vq3d-tiny/run/config.yml")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs/bench_stage2")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--paper-uncached-tokens", type=int, default=64)
    parser.add_argument("--samples-per-class", type=int, default=6)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if not args.stage1_config.is_file():
        raise SystemExit(f"{args.stage1_config}: no stage-1 run; run benchmarks/train_tiny.py first or pass --stage1-config")
    torch.set_num_threads(2)

    speed = []
    if not args.skip_speed:
        for cache in (True, False):
            for batch in (1, 16):
                speed.append(time_sampling("tiny", 1024, 8, batch, cache))
                print(speed[-1])
        speed.append(time_sampling("paper", 8192, 32, 1, True))
        print(speed[-1])
        speed.append(time_sampling("paper", 8192, 32, 1, False, max_tokens=args.paper_uncached_tokens))
        print(speed[-1])

    # ---- train tiny stage 2 ----
    run_dir = args.output_dir / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    command = [str(BIN / "vq3d-train-stage2"), "--stage1-config", str(args.stage1_config), "--output-dir", str(run_dir),
               "--model", "tiny", "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size),
               "--eval-every", str(args.eval_every), "--save-every", str(args.max_steps), "--num-workers", "2",
               "--device", "cpu"]
    print(" ".join(command))
    start = time.perf_counter()
    subprocess.run(command, check=True, env=cli_env())
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/bits_per_token" in r]
    train = {r["step"]: r["train/bits_per_token"] for r in rows if "train/bits_per_token" in r}

    from vq3d_nerfstudio.stage2.data import load_token_cache

    info = json.loads(sorted((run_dir / "checkpoints").glob("step-*"))[-1].joinpath("config.json").read_text())
    cache = load_token_cache(Path(info["token_cache"]))
    uniform, unigram = math.log2(cache.codebook_size), unigram_bits(cache)

    # ---- samples per class -> docs/stage2_samples.png ----
    import imageio.v2 as imageio

    strips = []
    names = cache.class_names or ["none"]
    for label in names:
        out = args.output_dir / "samples" / label
        subprocess.run([str(BIN / "vq3d"), "sample", "--stage2-checkpoint", str(run_dir), "--class-label", label,
                        "--num-samples", str(args.samples_per_class), "--output-dir", str(out), "--num-frames", "24",
                        "--seed", "0"], check=True, env=cli_env())
        canonical = imageio.imread(out / "samples.png")
        views = [imageio.imread(out / f"{label}_{i:03d}_disparity.png") for i in range(args.samples_per_class)]
        strips.append(np.concatenate([canonical, np.concatenate(views, axis=1)], axis=0))
    sheet = np.concatenate(strips, axis=0)
    (REPO / "docs").mkdir(exist_ok=True)
    imageio.imwrite(REPO / "docs" / "stage2_samples.png", sheet.repeat(2, axis=0).repeat(2, axis=1))
    t0 = time.perf_counter()
    subprocess.run([str(BIN / "vq3d"), "sample", "--stage2-checkpoint", str(run_dir), "--class-label", names[0],
                    "--num-samples", "8", "--output-dir", str(args.output_dir / "timing"), "--num-frames", "1"],
                   check=True, env=cli_env(), capture_output=True)
    sample_cli_s = time.perf_counter() - t0

    lines = [
        "## Stage 2: sampling speed and held-out bits per token (2 CPU cores)",
        "",
        f"Machine: {machine()}. Commit {git_revision()}. Command: `.venv/bin/python benchmarks/stage2.py "
        f"--stage1-config <the 3000-step vq3d-tiny run of train_tiny.py> --max-steps {args.max_steps}`.",
        "",
    ]
    if speed:
        lines += [
            "Sampling one token grid per scene, randomly initialised weights, `sample_tokens` (temperature 1):",
            "",
            "| transformer | params | grid / codes | scenes per batch | KV cache | tokens timed | seconds | tokens/s | s per scene |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in speed:
            partial = "" if r["tokens"] == r["grid"] ** 2 else f" (first {r['tokens']})"
            lines.append(
                f"| {r['preset']} | {r['params_m']:.1f} M | {r['grid']}x{r['grid']} / {r['vocab']} | {r['batch']} | "
                f"{'yes' if r['cache'] else 'no'} | {r['tokens'] * r['batch']}{partial} | {r['seconds']:.2f} | "
                f"{r['tokens_per_s']:.0f} | {r['s_per_scene']:.2f}{' (extrapolated, lower bound)' if partial else ''} |"
            )
        tiny = {(r["batch"], r["cache"]): r for r in speed if r["preset"] == "tiny"}
        paper = {r["cache"]: r for r in speed if r["preset"] == "paper"}
        lines += [
            "",
            f"The cache makes tiny sampling {tiny[(1, False)]['seconds'] / tiny[(1, True)]['seconds']:.1f}x faster for one "
            f"scene and {tiny[(16, False)]['seconds'] / tiny[(16, True)]['seconds']:.1f}x for 16. At paper size the uncached "
            f"sampler manages {paper[False]['tokens_per_s']:.1f} tokens/s over the first {paper[False]['tokens']} tokens, "
            f"against {paper[True]['tokens_per_s']:.1f} tokens/s for the cached one over all 1024.",
            "",
        ]
    lines += [
        f"`vq3d sample` end to end for 8 scenes of the tiny model (start-up, sampling, decoding, one canonical and one "
        f"orbit frame each): {sample_cli_s:.1f} s.",
        "",
        f"Training `vq3d-train-stage2 --model tiny` (batch {args.batch_size}) on the tokens of {len(cache.train)} training "
        f"and {len(cache.eval)} held-out `vq3d synth` scenes ({len(names)} classes: {', '.join(names)}), "
        f"{args.max_steps} steps, {wall / 60:.1f} min wall clock including encoding the data:",
        "",
        "| step | training time (s) | train bits/token | held-out bits/token |",
        "|---|---|---|---|",
    ]
    for r in evals:
        lines.append(f"| {r['step']} | {r['time_s']:.0f} | {train.get(r['step'], float('nan')):.3f} | {r['eval/bits_per_token']:.3f} |")
    lines += [
        "",
        f"References on the same held-out tokens: uniform over the codebook {uniform:.3f} bits; the training codes' "
        f"frequencies (no context, no class) {unigram:.3f} bits.",
        "",
        "![samples per class](docs/stage2_samples.png)",
        "",
        f"*Rows: {', '.join(names)}; {args.samples_per_class} samples each (seed 0, temperature 1, no guidance), "
        "canonical view above its disparity.*",
    ]
    body = "\n".join(lines)
    print(body)
    update_section("stage2", body)


if __name__ == "__main__":
    main()

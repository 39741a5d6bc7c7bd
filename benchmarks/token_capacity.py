"""Benchmark: how much of the input image can `vq3d-tiny`'s tokens carry at all? (issue 14, session 2)

The 3D model's canonical PSNR stopped at ~21 dB (quality levers). This measures the ceiling that its
token path sets, with no 3D part: the same ViT encoder, quantizer and decoder transformer as
`vq3d-tiny`, but a linear head that writes each token's pixels directly (a 2D autoencoder), trained
on the same 1000 `vq3d synth` input views with the preset's batch (8 images), learning rate and
schedule, for the same number of steps per row, and scored by PSNR on the 20 unseen input views of
`vq3d synth --seed 1` (the canonical view `vq3d eval` scores). One change per row against a named
row. Two rows need no training: every 4x4 (2x2) patch replaced by its mean colour, i.e. what a
token that carries only its patch's average colour can give.

    .venv/bin/python benchmarks/token_capacity.py [--steps 300] [--rows ...]

Finished rows are kept in `outputs/token_capacity/steps-<N>/<row>.json` and reused (delete to rerun).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from common import git_revision, machine, update_section

# (name, compared with, what changed, model overrides, no quantizer: None / "identity" / "unrounded")
ROWS = [
    ("mean-4x4", None, "each 4x4 patch its mean colour (no model)", None, None),
    ("mean-2x2", None, "each 2x2 patch its mean colour (no model)", None, None),
    ("tiny-tokens", None, "`vq3d-tiny`'s token path: patch 4, FSQ (8,8,8,6,5) = 15,360 codes", {}, None),
    ("no-quantizer", "tiny-tokens", "tokens passed on unquantized (128 floats)", {}, "identity"),
    ("unrounded", "tiny-tokens", "FSQ's 5 bounded channels, not rounded", {}, "unrounded"),
    ("fsq-1000", "tiny-tokens", "FSQ (8,5,5,5) = 1000 codes (the preset before)", {"q_levels": (8, 5, 5, 5)}, None),
    ("levels-4x5", "fsq-1000", "FSQ (4,4,4,4,4): 1024 codes in 5 channels", {"q_levels": (4, 4, 4, 4, 4)}, None),
    ("binary-10", "fsq-1000", "FSQ (2,)*10: 1024 codes in 10 binary channels", {"q_levels": (2,) * 10}, None),
    ("encoder-4", "tiny-tokens", "4 encoder blocks instead of 2", {"num_encoder_layers": 4}, None),
    ("decoder-4", "tiny-tokens", "4 decoder blocks instead of 2", {"num_decoder_layers": 4}, None),
    ("lr-3e-3", "tiny-tokens", "learning rate 3e-3 instead of 1e-3", {"_lr": 3e-3}, None),
    ("patch-2", "tiny-tokens", "32x32 tokens (patch 2)", {"patch_size": 2}, None),
    ("groups-2", "tiny-tokens", "2 FSQ codes per token (groups 2: 28 bits)", {"q_groups": 2}, None),
    ("groups-4", "tiny-tokens", "4 FSQ codes per token (groups 4: 56 bits)", {"q_groups": 4}, None),
]


def eval_images(eval_scenes: Path, size: int):
    import torch

    from vq3d_nerfstudio.data.dataset import load_image

    files = sorted(eval_scenes.glob("scene_*/images/frame_00000.png"))
    return torch.stack([load_image(f, size).permute(2, 0, 1) for f in files])  # (N, 3, S, S)


def psnr(pred, gt) -> float:
    """Mean over images of each image's PSNR (`vq3d eval`'s, averaged over scenes as it does)."""
    from vq3d_nerfstudio.evaluation.metrics import psnr as image_psnr

    return sum(image_psnr(p, g) for p, g in zip(pred.clamp(0, 1), gt)) / len(gt)


def mean_colour_row(images, patch: int) -> dict:
    import torch.nn.functional as F

    blocks = F.interpolate(F.avg_pool2d(images, patch), scale_factor=patch, mode="nearest")
    return {"psnr": psnr(blocks, images)}


def train_row(overrides: dict, bypass, data: Path, images, steps: int) -> dict:
    """Train the tiny preset's token path as a 2D autoencoder for ``steps``; PSNR on ``images``."""
    import torch
    import torch.nn.functional as F

    from vq3d_nerfstudio.ns.method_configs import PRESETS, build_trainer_config

    torch.manual_seed(0)
    config = build_trainer_config("vq3d-tiny")
    lr = overrides.pop("_lr", PRESETS["vq3d-tiny"]["train"]["lr"])
    for key, value in overrides.items():  # q_*: the quantizer's own options
        target = config.pipeline.model.quantizer if key.startswith("q_") else config.pipeline.model
        setattr(target, key.removeprefix("q_"), value)
    config.pipeline.datamanager.data = data
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")
    model, datamanager = pipeline.model, pipeline.datamanager
    patch, grid = model.config.patch_size, model.grid_size
    head = torch.nn.Linear(model.config.hidden_dim, 3 * patch * patch)
    quantizer = model.quantizer

    def tokens(x):
        z = model.encoder(x)
        if bypass == "identity":
            return z
        if bypass == "unrounded":
            return quantizer.output_from_codes(quantizer.encode(z))
        return quantizer(z)[0]

    def decode(x):
        out = head(model.decoder.transformer(tokens(x)))  # (B, h*w, 3 p p)
        out = out.transpose(1, 2).reshape(x.shape[0], 3 * patch * patch, grid, grid)
        return torch.sigmoid(F.pixel_shuffle(out, patch))

    params = [*model.encoder.parameters(), *quantizer.parameters(), *model.decoder.transformer.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr, eps=1e-8)
    train = PRESETS["vq3d-tiny"]["train"]
    warmup, alpha = train["warmup"], 0.05  # the preset's WarmupCosineScheduler (learning_rate_alpha 0.05)

    def rate(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (alpha + (1 - alpha) * 0.5 * (1 + math.cos(math.pi * t)))

    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = rate(step)
        _, batch = datamanager.next_train(step)
        x = batch["input_images"]
        loss = F.mse_loss(decode(x), x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.time() - start
    with torch.no_grad():
        pred = decode(images)
        row = {"psnr": psnr(pred, images), "s_per_step": seconds / steps, "steps": steps}
        if bypass is None:
            _, indices = quantizer.quantize(model.encoder(images))
            row["codes_used"] = int(indices.unique().numel())
            row["codebook_size"] = quantizer.codebook_size
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per row (the same for all)")
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (default: all)")
    parser.add_argument("--data", type=Path, default=Path("data/synth"), help="training scenes (made if missing)")
    parser.add_argument("--eval-scenes", type=Path, default=Path("data/synth_eval"), help="unseen scenes (made if missing)")
    parser.add_argument("--out", type=Path, default=None, help="per-row results (default: outputs/token_capacity/steps-<N>)")
    args = parser.parse_args()
    args.out = args.out or Path("outputs/token_capacity") / f"steps-{args.steps}"

    from vq3d_nerfstudio.data.synth import write_scenes

    write_scenes(args.data, num_scenes=1000, resolution=64, num_views=7, seed=0)
    write_scenes(args.eval_scenes, num_scenes=20, resolution=64, num_views=7, seed=1)
    images = eval_images(args.eval_scenes, 64)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| row | vs | change | held-out PSNR | codes used (of) | s/step |", "|---|---|---|---|---|---|"]
    for name, versus, change, overrides, bypass in ROWS:
        if args.rows is not None and name not in args.rows and not (args.out / f"{name}.json").exists():
            continue
        result_file = args.out / f"{name}.json"
        if result_file.exists():
            row = json.loads(result_file.read_text())
        else:
            if overrides is None:
                row = mean_colour_row(images, 4 if name == "mean-4x4" else 2)
            else:
                row = train_row(dict(overrides), bypass, args.data, images, args.steps)
            result_file.write_text(json.dumps(row, indent=1))
        print(name, row, flush=True)
        codes = f"{row['codes_used']} ({row['codebook_size']})" if "codes_used" in row else "-"
        seconds = f"{row['s_per_step']:.2f}" if "s_per_step" in row else "-"
        lines.append(f"| {name} | {versus or '-'} | {change} | {row['psnr']:.2f} | {codes} | {seconds} |")
    body = (
        "## Token capacity: the 2D ceiling of `vq3d-tiny`'s tokens (issues 14 and 22)\n\n"
        + "\n".join(lines) + "\n\n"
        f"Trained rows: the preset's encoder, quantizer and decoder transformer with a linear pixel head "
        f"instead of the tri-plane and renderer (a 2D autoencoder), {args.steps} steps of 8 images from the 1000 "
        "`vq3d synth` input views (seed 0), the preset's learning rate, warm-up and cosine schedule; PSNR on "
        "the 20 unseen input views (`--seed 1`). Codes used: distinct codes in those 20 images' tokens "
        "(5,120 tokens, each of G codes with FSQ groups G; 20,480 at patch 2). s/step: training only, wall-clock on 2 cores (rows that shared the "
        "cores with other jobs are slower; compare PSNR, not s/step, unless a row ran alone).\n\n"
        f"Machine: {machine()}. Revision {git_revision()}. Run here (CPU).\n\n"
        f"Command: `.venv/bin/python benchmarks/token_capacity.py --steps {args.steps}`\n"
    )
    print(body)
    update_section("token-capacity", body)


if __name__ == "__main__":
    main()

"""Training stage 2: the token cache (:mod:`~vq3d_nerfstudio.stage2.token_cache`), then the
transformer (AdamW, warm-up + cosine, clipping, safe checkpoints and resume, tensorboard), on one
device or many through ``torchrun`` (DDP). Problems are one-line ``Vq3dError``s, which
``vq3d-train-stage2`` prints; the first Ctrl-C finishes the step, saves and stops
(:class:`~vq3d_nerfstudio.interrupts.StopRequest`).

Determinism: the global batch at step ``s`` and which of its labels are dropped depend only on
``(seed, s)``; under DDP rank ``r`` trains on positions ``r, r + W, ...`` of it. So a run resumed
from step ``s``, and a run on any number of processes, train on exactly the same data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from vq3d_nerfstudio.checks import (
    NonNegativeFloat,
    NonNegativeInt,
    OutputDir,
    PositiveFloat,
    PositiveInt,
    Probability,
    check_options,
    ranged,
)
from vq3d_nerfstudio.errors import Vq3dError
from vq3d_nerfstudio.files import write_atomic
from vq3d_nerfstudio.interrupts import StopRequest
from vq3d_nerfstudio.stage2 import checkpoint as ckpt
from vq3d_nerfstudio.stage2.data import TokenCache, global_batch, rank_share
from vq3d_nerfstudio.stage2.distributed import Dist, init_distributed
from vq3d_nerfstudio.stage2.token_cache import prepare_token_cache, recorded_stage1
from vq3d_nerfstudio.stage2.transformer import PRESETS, TokenTransformer, TokenTransformerConfig


@dataclass
class Stage2TrainConfig:
    """Train the class-conditional token transformer of VQ3D's stage 2 on a frozen stage-1 model.

    The dataset is first encoded to code grids with the stage-1 encoder (once: the cache is reused
    while the stage-1 checkpoint and the images are unchanged). Run under
    ``torchrun --nproc-per-node N`` for data-parallel training on N GPUs (NCCL) or CPU processes (gloo).
    """

    stage1_config: Optional[Path] = None
    """The stage-1 model: a run's config.yml (ns-train vq3d / vq3d-tiny), a model package folder, or
    a shipped or user model's name (vq3d models). Needed unless --token-cache names a finished cache."""
    data: Optional[Path] = None
    """Images to encode (the same folder layouts ns-train reads); default: the stage-1 run's data (a
    package has none: pass it)."""
    token_cache: Optional[Path] = None
    """Where the encoded dataset lives; default: <stage-1 run>/token_cache-<hash of the data path>
    (for a package: <output dir>/token_cache-<hash>)."""
    output_dir: OutputDir = Path("outputs/stage2")
    """Run folder: checkpoints/, tensorboard/, log.jsonl. A run already there is resumed."""
    resume: bool = True
    """Continue from the latest checkpoint in --output-dir when there is one."""
    model: Literal["nano", "tiny", "small", "paper"] = "tiny"
    """Network size preset (layers / heads / width): nano 2/2/64, tiny 4/4/128, small 8/8/512,
    paper 24/16/1024."""
    depth_layers: NonNegativeInt = 2
    """With G > 1 codes per token (a stage-1 run with FSQ groups): N > 0 is an RQ-Transformer depth
    head, N layers over a token's G codes, under a spatial transformer over h x w positions (1/G of the
    sequence to attend over); 0 reads a token's G codes as consecutive steps of one sequence of
    h x w x G. The depth head won on both counts in BENCHMARKS.md (fewer held-out bits, less time a
    step). Ignored with one code per token."""
    dropout: ranged(float, 0, 1, high_open=True) = 0.0
    """Dropout inside the transformer (0.1 helps on small datasets that it would otherwise memorise)."""
    max_steps: PositiveInt = 2000
    """Optimizer steps in total (a resumed run stops here too)."""
    batch_size: PositiveInt = 32
    """Scenes per step over all processes (must be divisible by the number of processes)."""
    learning_rate: PositiveFloat = 3e-4
    """Peak learning rate (after warm-up)."""
    min_lr_ratio: Probability = 0.1
    """The cosine schedule ends at learning_rate * min_lr_ratio."""
    warmup_steps: NonNegativeInt = 100
    """Linear warm-up from 0."""
    weight_decay: NonNegativeFloat = 0.01
    """AdamW decoupled weight decay on weight matrices and embeddings (not biases or norms)."""
    beta1: ranged(float, 0, 1, high_open=True) = 0.9
    """AdamW beta1."""
    beta2: ranged(float, 0, 1, high_open=True) = 0.95
    """AdamW beta2."""
    grad_clip: NonNegativeFloat = 1.0
    """Clip the gradient's global norm to this (0: no clipping)."""
    class_dropout: Probability = 0.1
    """Probability of replacing a label by the null class: trains unconditional generation and
    classifier-free guidance."""
    eval_every: PositiveInt = 250
    """Held-out bits per token every this many steps (and at the end)."""
    max_eval_scenes: NonNegativeInt = 512
    """Score at most this many held-out scenes per evaluation (0: all)."""
    eval_batch_size: PositiveInt = 64
    """Scenes per forward pass when evaluating."""
    save_every: PositiveInt = 500
    """Checkpoint every this many steps (and at the end, and on Ctrl-C)."""
    keep_checkpoints: PositiveInt = 3
    """Keep the newest this many checkpoints."""
    log_every: PositiveInt = 10
    """Training loss to tensorboard and log.jsonl every this many steps."""
    encode_batch_size: PositiveInt = 32
    """Images per stage-1 forward pass while building the token cache."""
    encode_chunk_size: PositiveInt = 1024
    """Images per cache chunk: an interrupted encoding resumes at the first unfinished chunk."""
    num_workers: NonNegativeInt = 2
    """Image-decoding worker processes while building the token cache."""
    seed: int = 0
    """Seeds the initial weights, the data order and the label dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """cuda when available (one GPU per process under torchrun), else cpu."""
    use_amp: bool = True
    """bfloat16 autocast on GPUs (ignored on the CPU)."""

    def to_dict(self) -> Dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


# ---- schedule and optimizer -----------------------------------------------------------------------
def lr_at(step: int, peak: float, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to ``peak * min_ratio`` at
    ``max_steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_step(
    model: TokenTransformer, ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer, codes: torch.Tensor,
    classes: torch.Tensor, amp: bool, grad_clip: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on ``(B, T)`` code grids and their ``(B,)`` labels: next-token cross entropy
    (bfloat16 autocast on a GPU when ``amp``), backward through ``ddp_model`` (the model itself, or its
    DDP wrapper), the gradient's global norm clipped to ``grad_clip`` (0: not clipped), one step.
    Returns ``(loss, gradient norm before clipping)``."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        logits = ddp_model(codes[:, :-1], classes)  # (B, T, vocab)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    return loss, grad_norm


def make_optimizer(model: TokenTransformer, cfg: Stage2TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on tensors of 2+ dimensions only (nanoGPT's split)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def drop_labels(classes: np.ndarray, batch_size: int, step: int, seed: int, prob: float, null_class: int,
                rank: int, world_size: int) -> np.ndarray:
    """Replace labels by the null class with probability ``prob``; the mask is drawn for the whole
    global batch (seeded by step) and sliced like the batch, so it does not depend on the split."""
    mask = np.random.default_rng([seed, step, 1]).random(batch_size) < prob
    return np.where(mask[rank::world_size], null_class, classes)


# ---- training ---------------------------------------------------------------------------------------
def batch_tensors(split_codes: np.ndarray, split_classes: np.ndarray, indices: np.ndarray, device) -> Tuple[torch.Tensor, np.ndarray]:
    codes = torch.from_numpy(np.asarray(split_codes[np.sort(indices)][np.argsort(np.argsort(indices))], dtype=np.int64))
    return codes.reshape(len(indices), -1).to(device), np.asarray(split_classes[indices])


@torch.no_grad()
def held_out_bits_per_token(model: TokenTransformer, cache: TokenCache, dist: Dist, max_scenes: int, batch_size: int) -> Optional[float]:
    """Mean cross-entropy of the held-out scenes' codes given their classes, in bits per token."""
    num = len(cache.eval) if max_scenes <= 0 else min(max_scenes, len(cache.eval))
    if num == 0:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    mine = np.arange(num)[dist.rank :: dist.world_size]
    for start in range(0, len(mine), batch_size):
        idx = mine[start : start + batch_size]
        codes, classes = batch_tensors(cache.eval.codes, cache.eval.classes, idx, dist.device)
        logits = model(codes[:, :-1], torch.from_numpy(classes).to(dist.device))
        total[0] += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), codes.reshape(-1), reduction="sum").double()
        total[1] += codes.numel()
    dist.all_reduce_sum(total)
    model.train(was_training)
    return float(total[0] / total[1]) / math.log(2.0)


def train(cfg: Stage2TrainConfig) -> Path:
    """Build or reuse the token cache, then train; returns the last checkpoint folder."""
    check_options(cfg)  # finite floats, positive counts, a writable --output-dir
    dist = init_distributed(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        if dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: Stage2TrainConfig, dist: Dist) -> Path:
    if cfg.depth_layers < 0:
        raise Vq3dError(f"--depth-layers must be >= 0, got {cfg.depth_layers}")
    if cfg.batch_size % dist.world_size:
        raise Vq3dError(
            f"--batch-size {cfg.batch_size} is not divisible by {dist.world_size} processes"
        )
    cache = prepare_token_cache(
        cfg.stage1_config, cfg.data, cfg.token_cache, cfg.output_dir, dist, cfg.encode_chunk_size, cfg.encode_batch_size,
        cfg.num_workers,
    )
    if len(cache.train) < cfg.batch_size:
        raise Vq3dError(
            f"{cache.path} holds {len(cache.train)} training scenes, fewer than "
            f"--batch-size {cfg.batch_size}; lower it"
        )
    preset = PRESETS[cfg.model]
    groups = int(cache.meta["grid"][2]) if len(cache.meta["grid"]) > 2 else 1
    model_config = TokenTransformerConfig(
        vocab_size=cache.codebook_size, num_classes=cache.num_classes, block_size=cache.num_tokens,
        dropout=cfg.dropout, groups=groups, depth_layers=cfg.depth_layers if groups > 1 else 0, **preset,
    )
    torch.manual_seed(cfg.seed)
    model = TokenTransformer(model_config).to(dist.device)
    optimizer = make_optimizer(model, cfg)
    info = {
        "model": model_config.to_dict(),
        "class_names": cache.class_names,
        "grid": cache.meta["grid"],
        "stage1_config": recorded_stage1(cfg.stage1_config, cache),
        "stage1_checkpoint": cache.meta.get("stage1_checkpoint"),
        "token_cache": str(cache.path.resolve()),
        "token_cache_fingerprint": cache.meta.get("fingerprint"),
    }
    start_step = 0
    latest = ckpt.latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if latest is not None:
        try:
            saved = json.loads((latest / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ckpt.CheckpointError(f"{latest}/config.json unreadable ({err}); delete that folder") from None
        if saved.get("model", {}).get("vocab_size") != model_config.vocab_size or saved.get("grid") != info["grid"]:
            raise ckpt.CheckpointError(
                f"{latest} was trained on another codebook or token grid "
                f"({saved.get('model', {}).get('vocab_size')} codes, grid {saved.get('grid')}); pass a new --output-dir"
            )
        if saved["model"].get("depth_layers", 0) != model_config.depth_layers:
            raise ckpt.CheckpointError(
                f"{latest} was trained with --depth-layers {saved['model'].get('depth_layers', 0)}, "
                f"not {model_config.depth_layers}; pass that or a new --output-dir"
            )
        state = ckpt.load_training_state(latest, model, optimizer)
        start_step = int(state["step"])
        if dist.is_main:
            print(f"Resuming from {latest} (step {start_step})")
    ddp_model = model
    if dist.world_size > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None
        )
    writer = None
    log_file = None
    if dist.is_main:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(cfg.output_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=1).encode("utf-8"))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(cfg.output_dir / "tensorboard"))
        log_file = open(cfg.output_dir / "log.jsonl", "a", encoding="utf-8")

    def log(record: Dict) -> None:
        if writer is None:
            return
        for key, value in record.items():
            if key not in ("step", "time_s"):
                writer.add_scalar(key, value, record["step"])
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    amp = cfg.use_amp and dist.device.type == "cuda"
    elapsed_before = float(state.get("train_time_s", 0.0)) if latest is not None else 0.0
    t0 = time.perf_counter()

    def save(step: int) -> Path:
        path = cfg.output_dir / "checkpoints" / f"step-{step:09d}"
        if dist.is_main:
            train_state = {"train_time_s": elapsed_before + time.perf_counter() - t0, "config": cfg.to_dict()}
            path = ckpt.save_checkpoint(cfg.output_dir, step, model, optimizer, train_state, info, cfg.keep_checkpoints)
        dist.barrier()
        return path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    last_path = latest
    step = start_step
    columns = [TextColumn("stage 2"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"), TimeRemainingColumn()]
    with StopRequest() as stop, Progress(*columns, disable=not dist.is_main) as progress:
        task = progress.add_task("train", total=cfg.max_steps, completed=start_step, status="")
        model.train()
        while step < cfg.max_steps:
            lr = lr_at(step, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            indices = rank_share(global_batch(len(cache.train), cfg.batch_size, step, cfg.seed), dist.rank, dist.world_size)
            codes, classes = batch_tensors(cache.train.codes, cache.train.classes, indices, dist.device)
            classes = drop_labels(classes, cfg.batch_size, step, cfg.seed, cfg.class_dropout, model.null_class, dist.rank, dist.world_size)
            torch.manual_seed(hash((cfg.seed, step, dist.rank)) % (2**31))  # transformer dropout
            loss, grad_norm = train_step(
                model, ddp_model, optimizer, codes, torch.from_numpy(classes).to(dist.device), amp, cfg.grad_clip
            )
            step += 1
            if step % cfg.log_every == 0 or step == start_step + 1:
                mean_loss = dist.all_reduce_sum(loss.detach().double().reshape(1)) / dist.world_size
                record = {
                    "step": step, "time_s": elapsed_before + time.perf_counter() - t0, "train/loss": float(mean_loss),
                    "train/bits_per_token": float(mean_loss) / math.log(2.0), "train/lr": lr, "train/grad_norm": float(grad_norm),
                }
                log(record)
                progress.update(task, status=f"loss {record['train/loss']:.3f}")
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                bits = held_out_bits_per_token(model, cache, dist, cfg.max_eval_scenes, cfg.eval_batch_size)
                if bits is not None:
                    log({"step": step, "time_s": elapsed_before + time.perf_counter() - t0, "eval/bits_per_token": bits})
            progress.update(task, completed=step)
            stop_now = torch.tensor([float(stop.requested)], device=dist.device)
            stop_now = bool(dist.all_reduce_sum(stop_now).item() > 0)
            if step % cfg.save_every == 0 or step == cfg.max_steps or stop_now:
                last_path = save(step)
            if stop_now:
                if dist.is_main:
                    print(f"Stopped at step {step}; resume with the same command")
                break
    if writer is not None:
        writer.close()
        log_file.close()
    if last_path is None:
        last_path = save(step)
    return last_path

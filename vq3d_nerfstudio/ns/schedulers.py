"""Learning-rate schedule whose state holds only Python floats.

nerfstudio's ``CosineDecayScheduler`` returns ``numpy.float64`` factors after warm-up; they end up in
the scheduler's and optimizer's state dicts, and torch >= 2.6 then refuses to load the checkpoint
(``weights_only`` loading: "Unsupported global: numpy.core.multiarray.scalar"). Same schedule, plain
floats.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Type

from nerfstudio.engine.schedulers import CosineDecayScheduler, CosineDecaySchedulerConfig
from torch.optim import Optimizer, lr_scheduler


def warmup_cosine_factor(step: int, warm_up_end: int, max_steps: int, alpha: float) -> float:
    """Linear warm-up from 0 to 1 over ``warm_up_end`` steps, then cosine decay from 1 to ``alpha``
    at ``max_steps`` (held at ``alpha`` after)."""
    if step < warm_up_end:
        return step / warm_up_end
    progress = min(1.0, (step - warm_up_end) / max(1, max_steps - warm_up_end))
    return (math.cos(math.pi * progress) + 1.0) * 0.5 * (1 - alpha) + alpha


@dataclass
class WarmupCosineSchedulerConfig(CosineDecaySchedulerConfig):
    """Linear warm-up, then cosine decay to ``learning_rate_alpha`` times the initial rate."""

    _target: Type = field(default_factory=lambda: WarmupCosineScheduler)
    max_steps: Optional[int] = None
    """Step at which the cosine reaches ``learning_rate_alpha``; None (the default): the run's
    --max-num-iterations, so a shortened or lengthened run still ends its schedule."""


class WarmupCosineScheduler(CosineDecayScheduler):
    """``LambdaLR`` with :func:`warmup_cosine_factor`."""

    config: WarmupCosineSchedulerConfig

    def get_scheduler(self, optimizer: Optimizer, lr_init: float) -> lr_scheduler.LRScheduler:
        cfg = self.config
        if cfg.max_steps is None:
            raise ValueError("WarmupCosineScheduler: max_steps is unset; the trainer sets it to --max-num-iterations")
        return lr_scheduler.LambdaLR(
            optimizer, lr_lambda=lambda step: warmup_cosine_factor(step, cfg.warm_up_end, cfg.max_steps, cfg.learning_rate_alpha)
        )


def schedules_for_run(optimizers: dict, max_num_iterations: int) -> dict:
    """A copy of a ``TrainerConfig.optimizers`` dict in which every warm-up cosine schedule without its
    own length (``max_steps`` None) runs over ``max_num_iterations`` steps."""
    resolved = {}
    for name, group in optimizers.items():
        scheduler = group.get("scheduler")
        if isinstance(scheduler, WarmupCosineSchedulerConfig) and scheduler.max_steps is None:
            group = {**group, "scheduler": dataclasses.replace(scheduler, max_steps=max_num_iterations)}
        resolved[name] = group
    return resolved

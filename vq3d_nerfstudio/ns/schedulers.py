"""Learning-rate schedule whose state holds only Python floats.

nerfstudio's ``CosineDecayScheduler`` returns ``numpy.float64`` factors after warm-up; they end up in
the scheduler's and optimizer's state dicts, and torch >= 2.6 then refuses to load the checkpoint
(``weights_only`` loading: "Unsupported global: numpy.core.multiarray.scalar"). Same schedule, plain
floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Type

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


class WarmupCosineScheduler(CosineDecayScheduler):
    """``LambdaLR`` with :func:`warmup_cosine_factor`."""

    config: WarmupCosineSchedulerConfig

    def get_scheduler(self, optimizer: Optimizer, lr_init: float) -> lr_scheduler.LRScheduler:
        cfg = self.config
        return lr_scheduler.LambdaLR(
            optimizer, lr_lambda=lambda step: warmup_cosine_factor(step, cfg.warm_up_end, cfg.max_steps, cfg.learning_rate_alpha)
        )

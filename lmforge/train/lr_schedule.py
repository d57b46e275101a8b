"""Learning-rate schedules as multipliers of the peak lr, wrapped in LambdaLR (which has state_dict).

cosine: linear warmup to 1, cosine decay to `min_lr_ratio` at the last step.
wsd:    linear warmup, stable at 1, linear decay to `min_lr_ratio` over the last `decay_fraction`.
constant: linear warmup, then 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from lmforge.config import SchedulerConfig


def lr_multiplier(cfg: SchedulerConfig, total_steps: int) -> Callable[[int], float]:
    warmup = cfg.warmup_steps
    floor = cfg.min_lr_ratio

    def f(step: int) -> float:
        # LambdaLR calls f(k) for the lr used by optimizer step k+1; warmup starts above zero.
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if cfg.kind == "constant":
            return 1.0
        if cfg.kind == "cosine":
            span = max(1, total_steps - warmup)
            progress = min(1.0, (step - warmup) / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = max(1, int(round(cfg.decay_fraction * total_steps)))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / decay_steps)
        return 1.0 - (1.0 - floor) * progress

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lr_multiplier(cfg, total_steps))

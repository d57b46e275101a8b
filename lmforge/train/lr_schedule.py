"""Learning-rate schedules as multipliers of the peak lr, wrapped in LambdaLR (which has state_dict).

cosine: linear warmup to 1, cosine decay to `min_lr_ratio` at the last step.
wsd:    linear warmup, stable at 1, linear decay to `min_lr_ratio` over the last `decay_fraction`.
constant: linear warmup, then 1.

Every run starts its schedule at its own step 0, so a continual pre-training run (train.init_from)
re-warms to the peak lr and re-decays whatever lr the run it starts from ended at. Param groups
tagged `unfreeze_step` (gradual unfreezing, lmforge/train/continual.py) read 0 before that step,
then re-warm linearly over warmup_steps (their AdamW moments start at zero), then follow the schedule.
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


def unfreeze_gate(start: int, warmup_steps: int) -> Callable[[int], float]:
    """A param group's multiplier on top of the schedule: 0 before its `unfreeze_step`, a linear
    re-warm over `warmup_steps` after it (none for groups training from step 0), then 1."""

    def g(step: int) -> float:  # LambdaLR's step k: the lr of optimizer step k + 1
        if step < start:
            return 0.0
        if start == 0 or warmup_steps <= 0:
            return 1.0
        return min(1.0, (step - start + 1) / warmup_steps)

    return g


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int) -> LambdaLR:
    f = lr_multiplier(cfg, total_steps)
    starts = [int(group.get("unfreeze_step", 0)) for group in optimizer.param_groups]
    if not any(starts):
        return LambdaLR(optimizer, f)
    gates = [unfreeze_gate(s, cfg.warmup_steps) for s in starts]
    return LambdaLR(optimizer, [lambda step, g=g: f(step) * g(step) for g in gates])

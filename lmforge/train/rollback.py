"""Where a stability rollback goes: the newest valid checkpoint saved before the spikes, decided on
rank 0 (which reads the checkpoint directory) and broadcast, so every rank loads the same one."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from lmforge.checkpoint.tiers import TieredCheckpoints

log = logging.getLogger("lmforge.train")


def rollback_target(ckpt: TieredCheckpoints, before_step: int, is_main: bool, world_size: int) -> Path | None:
    """Newest valid checkpoint saved before `before_step` (rank 0 decides, all ranks get it)."""
    box: list[str | None] = [None]
    if is_main:
        target, skipped = ckpt.newest_valid_before(before_step)
        for p, reason in skipped:
            log.warning("rollback: skipping invalid checkpoint %s: %s", p, reason)
        box[0] = str(target) if target is not None else None
    if world_size > 1:
        dist.broadcast_object_list(box, group_src=0)
    return Path(box[0]) if box[0] is not None else None

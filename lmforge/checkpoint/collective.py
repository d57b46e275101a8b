"""The process-group side of checkpointing: who is rank 0, and how its decisions reach every rank.

Decisions that read files (is this checkpoint valid? which is the newest valid one?) are made by
rank 0 alone and broadcast (`on_rank0`), so all ranks act on the same answer even if the
filesystem changes under them, and the hashing is done once, not once per rank. Every function
here takes the checkpoint's process group (None: the default group when torch.distributed is
initialised, else a single process, where they cost nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from lmforge.checkpoint.errors import CheckpointError, first_line

__all__ = ["barrier", "is_distributed", "on_rank0", "rank_and_world"]

_T = TypeVar("_T")


def is_distributed(group: dist.ProcessGroup | None) -> bool:
    """Whether checkpoint calls on `group` are collective (a group given, or torch.distributed up)."""
    return group is not None or (dist.is_available() and dist.is_initialized())


def rank_and_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(this process's rank in `group`, its size); (0, 1) without torch.distributed."""
    if not is_distributed(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def barrier(group: dist.ProcessGroup | None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)


def on_rank0(group: dist.ProcessGroup | None, fn: Callable[[], _T]) -> _T:
    """Run `fn` on rank 0 and give every rank its result, or make every rank raise (rank 0 its
    own exception, the others a CheckpointError/RuntimeError with its message)."""
    if not is_distributed(group):
        return fn()
    box: list[Any] = [None]
    failure: BaseException | None = None
    if rank_and_world(group)[0] == 0:
        try:
            box[0] = ("ok", fn())
        except CheckpointError as e:
            failure, box[0] = e, ("error", str(e))
        except Exception as e:  # noqa: BLE001 (other ranks must not wait forever)
            failure, box[0] = e, ("crash", f"checkpoint manager failed on rank 0: {first_line(e)}")
    dist.broadcast_object_list(box, group=group, group_src=0)
    if failure is not None:
        raise failure
    kind, value = box[0]
    if kind == "error":
        raise CheckpointError(value)
    if kind == "crash":
        raise RuntimeError(value)
    return value

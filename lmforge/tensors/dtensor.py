"""DTensor or plain tensor, handled alike: code that runs both unsharded and under FSDP/TP/EP asks
for this rank's shard or for the whole value through these two functions."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (no communication); a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective over its mesh: every rank must call it); a plain
    tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t

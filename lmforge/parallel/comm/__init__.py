"""Data-parallel gradient communication: compressors with error feedback (`compressors.py`), the
DDP comm hooks that run them (`ddp_hooks.py`; PowerSGD through torch's hook: `powersgd.py`) and
the byte accounting the trainer logs (`accounting.py`). Configured by `comm` (config/comm.py)."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from lmforge.parallel.comm.accounting import CommAccounting


class CommHookState(Protocol):
    """What the trainer holds of an installed hook: per-rank checkpoint state and the bytes it sent."""

    accounting: CommAccounting

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def dense_grad_norm(self) -> torch.Tensor | None:
        """The norm gradient clipping should use this step, or None: the reduced gradients' own."""

    def set_selection_divisors(self, divisors: dict[int, torch.Tensor]) -> None:
        """id(parameter) -> what top-k divides values by to pick them (frozen AdamW's denominators)."""

"""Counts the logits a loss exponentiates, so a test can hold a loss to computing each exponential
once (each one costs about as much as the rest of a cross-entropy's elementwise work)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class ExponentialCounter(TorchDispatchMode):
    """Counts the elements the ops it sees exponentiate: exp's outputs and logsumexp's inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func.overloadpacket in (torch.ops.aten.exp, torch.ops.aten.exp_, torch.ops.aten.logsumexp):
            self.elements += args[0].numel()
        return func(*args, **(kwargs or {}))

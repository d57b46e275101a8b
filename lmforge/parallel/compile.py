"""torch.compile per transformer block: small graphs compile fast and reuse across layers."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def apply_compile(model: nn.Module) -> None:
    """Compile each block of `model.layers` in place (torch.compile); the modules around them stay eager."""
    # Module.compile() compiles in place and keeps parameter names (no `_orig_mod` prefix).
    # Static shapes: training shapes do not change, and "automatic dynamic" recompiles (each block
    # carries its own layer index) tripped an inductor bug on symbolic sizes in torch 2.13.
    for block in model.layers.values():
        block.compile(dynamic=False)
    for emb in model.children():
        if not (isinstance(emb, nn.Embedding) and isinstance(emb.weight, DTensor)):
            continue
        # Tensor parallel: the embedding's output is the view `DTensor.to_local()` returns. In
        # torch 2.13 a compiled block taking that view as input sends its gradient past
        # to_local's backward, into the embedding's redistribute as a plain tensor
        # (AttributeError: '_local_tensor'). A copy of its own (one (batch, seq[/tp], dim) tensor
        # per micro-batch, in the eager embedding after TP's hook) avoids it.
        emb.register_forward_hook(_own_copy)


def _own_copy(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.clone()

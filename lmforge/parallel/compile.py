"""torch.compile per transformer block: small graphs compile fast and reuse across layers."""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> None:
    # Module.compile() compiles in place and keeps parameter names (no `_orig_mod` prefix).
    # Static shapes: training shapes do not change, and "automatic dynamic" recompiles (each block
    # carries its own layer index) tripped an inductor bug on symbolic sizes in torch 2.13.
    for block in model.layers.values():
        block.compile(dynamic=False)

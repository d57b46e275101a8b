"""torch.compile per transformer block: small graphs compile fast and reuse across layers."""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> None:
    # Module.compile() compiles in place and keeps parameter names (no `_orig_mod` prefix).
    for block in model.layers.values():
        block.compile()

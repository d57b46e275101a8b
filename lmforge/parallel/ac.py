"""Activation checkpointing (recomputation) applied per transformer block, from outside the model."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """`full`: every block recomputes its activations in backward (memory ~ one block per layer).

    The wrapper adds a `_checkpoint_wrapped_module` prefix to parameter names; DCP's
    get_state_dict strips it, so checkpoints stay independent of this choice.
    """
    if mode == "none":
        return
    if mode != "full":
        raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    for name, block in list(model.layers.named_children()):
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=True)

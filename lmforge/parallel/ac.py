"""Activation checkpointing (recomputation), applied per transformer block from outside the model.

- none: keep every activation.
- full: every block recomputes its forward in backward; memory ~ block inputs only.
- selective, `ac_every = k`: every k-th block recomputes (a memory/compute dial).
- op: every block saves the outputs of matmuls (dense, grouped expert) and attention and recomputes the cheap
  elementwise ops (norms, RoPE, SiLU, residual adds) — most of the memory saving of full
  recomputation for a small part of its compute (Korthikanti et al., 2022).

The wrapper adds a `_checkpoint_wrapped_module` prefix to parameter names; DCP's get_state_dict
strips it, so checkpoints stay independent of this choice.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_aten = torch.ops.aten
# Expensive ops whose outputs are kept under op-level selective checkpointing: the matmuls (also
# MoE's grouped expert matmul and oneDNN's dense linear, which lmforge's CPU linear may pick;
# see models/common/linear.py) and attention.
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._grouped_mm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}
if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # builds without oneDNN lack it
    SAVED_OPS.add(torch.ops.mkldnn._linear_pointwise.default)


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> None:
    if mode == "none":
        return
    if mode not in ("full", "selective", "op"):
        raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    for i, (name, block) in enumerate(list(model.layers.named_children())):
        if mode == "selective" and i % every != 0:
            continue
        if mode == "op":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=True,
                                         context_fn=partial(create_selective_checkpoint_contexts, _save_matmuls))
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=True)
        model.layers[name] = wrapped

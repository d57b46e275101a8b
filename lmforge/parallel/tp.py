"""Tensor parallelism (Megatron-style, Shoeybi et al., 2019) and sequence parallelism
(Korthikanti et al., 2022) on DTensor, applied from outside the plain Llama model.

The plan (the same as torchtitan's Llama plan):

- attention wq/wk/wv and feed-forward w1/w3 are column-parallel (each rank owns whole heads /
  hidden units), wo and w2 row-parallel: one all-reduce (or reduce-scatter) per sub-layer;
- with sequence parallelism the residual stream, the norms and the dropout-free elementwise work
  between sub-layers are sharded along the sequence (dim 1); attention and feed-forward all-gather
  the sequence on entry and reduce-scatter it on exit, so activation memory between sub-layers is
  divided by the TP degree at no extra communication volume;
- the token embedding is row-parallel (vocabulary-sharded) and the output projection
  column-parallel; with loss parallelism its logits stay vocabulary-sharded (a DTensor) and the
  cross-entropy runs on the shards, so the (batch, seq, vocab) logits are never gathered.

Attention reshapes with `view(b, s, -1, head_dim)`, so it runs unchanged on the local heads; the
RoPE tables are buffers and stay plain tensors.

With pipeline parallelism, stages exchange the residual stream as it is between blocks: the plain
local tensor, (batch, seq / tp, dim) under sequence parallelism. The first block of a later stage
takes it as Shard(1) like any other block (its SequenceParallel norm does), and each attention
slices the RoPE tables to the whole sequence it sees after the all-gather, not to the shard the
stage received.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel import loss_parallel as _torch_loss_parallel

from lmforge.models.common.cross_entropy import cross_entropy
from lmforge.models.common.moe import MoE

# Arguments of Attention.forward as TransformerBlock passes them: (x, cos, sin, cache, layer).
# Only x is converted; the RoPE tables, the cache and the layer index pass through untouched.
_ATTENTION_ARGS = 5


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True,
             loss_parallel: bool = True) -> None:
    """Shard `model` (an lmforge Llama `Transformer`, possibly a pipeline stage with some of
    tok_embeddings / norm / output set to None) over the 1-D `tp_mesh`, in place.

    Call it first, before activation checkpointing, torch.compile and fully_shard. Row/column
    shards are cut from rank 0's copy and norm weights under sequence parallelism are assumed equal
    everywhere (RMSNorm's ones init), so pass an initialised model (e.g. `build_model`). On a CPU
    mesh do NOT shard on meta and `init_weights` afterwards: DTensor has no RNG tracker for CPU
    meshes, every TP rank would draw the same values for its own shard (duplicated rows). On CUDA
    meta + `init_weights` after sharding is fine (DTensor's offset RNG, same seed on all ranks).

    With `loss_parallel` the model returns vocabulary-sharded DTensor logits: compute the loss with
    `tp_cross_entropy` inside `loss_parallel_ctx(True)`. Otherwise logits are a plain, replicated
    tensor. The sequence length must be divisible by the TP degree under sequence parallelism.
    """
    if tp_mesh.ndim != 1:
        raise ValueError(f"apply_tp: tp_mesh must be 1-D, got a {tp_mesh.ndim}-D mesh")
    sp = sequence_parallel
    tied = bool(getattr(getattr(model, "cfg", None), "tie_embeddings", False))

    root_plan: dict[str, object] = {}
    if getattr(model, "tok_embeddings", None) is not None:
        # Vocabulary-sharded table: each rank looks up the ids it owns, the partial sums are
        # reduce-scattered along the sequence (SP) or all-reduced.
        root_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(),
                                                      output_layouts=Shard(1) if sp else Replicate())
    if sp and getattr(model, "norm", None) is not None:
        root_plan["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        root_plan["output"] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(),
                                              output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                              use_local_output=not loss_parallel)
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)

    for block in model.layers.values():
        moe = isinstance(block.feed_forward, MoE)
        plan: dict[str, object] = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1) if sp else Replicate()),
        }
        if not moe:
            plan |= {
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1) if sp else Replicate()),
            }
        if sp:
            rest = (None,) * (_ATTENTION_ARGS - 1)
            plan |= {
                "attention_norm": SequenceParallel(),
                "attention": PrepareModuleInput(input_layouts=(Shard(1), *rest),
                                                desired_input_layouts=(Replicate(), *rest)),
                "ffn_norm": SequenceParallel(),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                                   desired_input_layouts=(Replicate(),)),
            }
            if moe:
                # The MoE is replicated over tp (plain weights): all-gather the sequence and hand it a
                # plain tensor, keep this rank's part of its (identical) output. Backward all-gathers
                # the output gradient: every tp rank computes the same MoE gradients. Without
                # sequence parallelism the MoE needs no plan: its input is already replicated.
                plan["feed_forward"] = PrepareModuleInputOutput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                    output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True)
        parallelize_module(block, tp_mesh, plan)

    # Tied embeddings: both styles shard the (vocab, dim) table along the vocabulary (Shard(0) on
    # the same mesh), so the two modules can share the embedding's DTensor parameter again.
    if tied and getattr(model, "output", None) is not None and getattr(model, "tok_embeddings", None) is not None:
        model.output.weight = model.tok_embeddings.weight


def loss_parallel_ctx(enabled: bool) -> contextlib.AbstractContextManager:
    """torch's `loss_parallel()` when enabled, else a no-op. Enter it ONCE per micro-batch around
    both the loss computation and its `.backward()` (the backward of the sharded cross-entropy runs
    custom DTensor handlers that exist only while the context is active). Do not nest it: torch's
    context does not count entries, the inner exit would switch it off for the outer one."""
    return _torch_loss_parallel() if enabled else contextlib.nullcontext()


def tp_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss_parallel: bool) -> torch.Tensor:
    """Mean token cross-entropy in fp32 for (batch, seq, vocab) logits and (batch, seq) targets.

    With `loss_parallel` the logits are the vocabulary-sharded DTensor that `apply_tp` returns and
    the loss is computed on the shards (each rank: local max / sum-exp / target logit, then small
    all-reduces). The result is a replicated scalar DTensor: identical on every TP rank, usable
    for `.backward()` and arithmetic (`/ accum`); `.item()` or `float(loss.full_tensor())`
    gives the value for logging. The caller must wrap this call AND the backward::

        with loss_parallel_ctx(cfg.loss_parallel):
            loss = tp_cross_entropy(model(x), y, cfg.loss_parallel) / accum
            loss.backward()

    Without `loss_parallel` (or for plain tensors) it is the ordinary cross-entropy; a
    vocabulary-sharded DTensor is then gathered first.
    """
    if isinstance(logits, DTensor) and not loss_parallel:
        logits = logits.full_tensor()
    if isinstance(targets, DTensor):
        targets = targets.full_tensor()
    if isinstance(logits, DTensor):  # vocabulary-sharded: torch's loss_parallel kernels
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))
    return cross_entropy(logits, targets)


def full_value(loss: torch.Tensor) -> torch.Tensor:
    """The full (gathered) value as a plain tensor of a loss that may be a DTensor (for logging,
    all-reduces over the data-parallel group and `GradScaler` bookkeeping)."""
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


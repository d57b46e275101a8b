"""Tensor parallelism (Megatron-style, Shoeybi et al., 2019) and sequence parallelism
(Korthikanti et al., 2022) on DTensor, applied from outside a plain model.

The plan (which module is column-, row- or sequence-parallel, which inputs are re-laid-out) is the
model family's: the model returns it from `tp_plan(sequence_parallel, loss_parallel)` (the Llama
plan: lmforge/models/llama/tp_plan.py). This module applies it and provides the loss on
vocabulary-sharded logits; it knows no module or parameter names.
"""

from __future__ import annotations

import contextlib
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module
from torch.distributed.tensor.parallel import loss_parallel as _torch_loss_parallel

from lmforge.models.common.cross_entropy import cross_entropy
from lmforge.parallel.vocab_parallel_loss import vocab_parallel_cross_entropy
from lmforge.tensors.dtensor import gathered


class TensorParallelModel(Protocol):
    """What `apply_tp` needs of a model: its plan (module path from the root -> parallel style),
    for the modules it holds now (a pipeline stage holds part of them). `tie_weights()`, when the
    model has it, is called after sharding to share tied parameters again."""

    def tp_plan(self, sequence_parallel: bool, loss_parallel: bool) -> dict[str, ParallelStyle]: ...


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True,
             loss_parallel: bool = True) -> None:
    """Shard `model` (a `TensorParallelModel`, possibly a pipeline stage) over the 1-D `tp_mesh`
    with the model's own plan, in place.

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
    if not hasattr(model, "tp_plan"):
        raise TypeError(f"apply_tp: {type(model).__name__} declares no tensor-parallel plan (tp_plan)")
    parallelize_module(model, tp_mesh, model.tp_plan(sequence_parallel, loss_parallel))
    # Each style replaced its module's parameters by DTensors: parameters two modules shared (tied
    # embeddings; both sides are sharded alike) are shared again.
    tie = getattr(model, "tie_weights", None)
    if tie is not None:
        tie()


def loss_parallel_ctx(enabled: bool) -> contextlib.AbstractContextManager:
    """torch's `loss_parallel()` when enabled, else a no-op. Enter it ONCE per micro-batch around
    both the loss computation and its `.backward()` (the backward of the sharded cross-entropy runs
    custom DTensor handlers that exist only while the context is active). Do not nest it: torch's
    context does not count entries, the inner exit would switch it off for the outer one."""
    return _torch_loss_parallel() if enabled else contextlib.nullcontext()


def tp_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss_parallel: bool,
                     overwrite_logits: bool = False) -> torch.Tensor:
    """Mean token cross-entropy in fp32 for (batch, seq, vocab) logits and (batch, seq) targets.

    With `loss_parallel` the logits are the vocabulary-sharded DTensor that `apply_tp` returns and
    the loss is computed on the shards (each rank: local max / sum-exp / target logit, then small
    all-reduces). On CPU that is lmforge's chunked vocab-parallel loss
    (parallel/vocab_parallel_loss.py), which returns a plain scalar tensor; elsewhere torch's
    `loss_parallel` kernels, which return a replicated scalar DTensor. Either is identical on
    every TP rank and usable for `.backward()` and arithmetic (`/ accum`); `full_value(loss)`
    gives the value for logging. The caller must wrap this call AND the backward::

        with loss_parallel_ctx(cfg.loss_parallel):
            loss = tp_cross_entropy(model(x), y, cfg.loss_parallel) / accum
            loss.backward()

    Without `loss_parallel` (or for plain tensors) it is the ordinary cross-entropy; a
    vocabulary-sharded DTensor is then gathered first. `overwrite_logits`: see
    `models.common.cross_entropy.cross_entropy` (the plain path only).
    """
    if isinstance(logits, DTensor) and not loss_parallel:
        logits = logits.full_tensor()
    if isinstance(targets, DTensor):
        targets = targets.full_tensor()
    if isinstance(logits, DTensor):  # vocabulary-sharded
        mesh, vocab = logits.device_mesh, logits.shape[-1]
        if logits.device.type == "cpu" and mesh.ndim == 1 and logits.placements == (Shard(logits.ndim - 1),):
            start = min(mesh.get_local_rank() * math.ceil(vocab / mesh.size()), vocab)  # DTensor's chunking
            return vocab_parallel_cross_entropy(logits.to_local(), targets, start, mesh.get_group())
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))  # torch's loss_parallel kernels
    return cross_entropy(logits, targets, overwrite_logits)


def full_value(loss: torch.Tensor) -> torch.Tensor:
    """The full (gathered) value as a plain tensor of a loss that may be a DTensor (for logging,
    all-reduces over the data-parallel group and `GradScaler` bookkeeping)."""
    return gathered(loss)


"""Validation loss: the first `n` micro-batches of the in-order validation stream, so every
evaluation, and every parallel layout, sees the same sequences."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.data.loader import DistributedTokenLoader
from lmforge.models.common.sparse_attention import document_starts
from lmforge.parallel.pp import PipelineParts, pipeline_eval
from lmforge.parallel.tp import full_value, loss_parallel_ctx, tp_cross_entropy
from lmforge.train.precision import autocast_context


@torch.no_grad()
def local_validation_loss(model: nn.Module, pipe: PipelineParts | None, loader: DistributedTokenLoader, n: int,
                          device: torch.device, loss_parallel: bool, precision: str,
                          eos_id: int | None = None) -> torch.Tensor:
    """This rank's mean loss over `n` micro-batches (zero on pipeline ranks without the last
    stage); the caller averages it over the data-parallel ranks. Leaves `model` in train mode.
    `eos_id`: document masking at that end-of-text id, as in training."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(n):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        doc_start = document_starts(x, eos_id) if eos_id is not None else None
        with loss_parallel_ctx(loss_parallel):
            with autocast_context(precision, device):
                if pipe is not None:
                    loss = pipeline_eval(pipe, x, y, doc_start)
                    total += loss if loss is not None else 0.0
                    continue
                logits = model(x) if doc_start is None else model(x, doc_start=doc_start)
            total += full_value(tp_cross_entropy(logits, y, loss_parallel))
    model.train()
    return total / n

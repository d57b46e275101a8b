"""Per-token negative log-likelihood of a model's logits: the one quantity perplexity and the cloze
task are both made of, in fp32 whatever the logits' dtype (as the trainer's loss,
models/common/cross_entropy.py), walked in row chunks so no fp32 copy of all logits exists."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.models.common.sparse_attention import document_starts

_CHUNK_BYTES = 2**22


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position: logits (..., vocab), targets (...) -> fp32 (...)."""
    shape = targets.shape
    flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    step = max(16, _CHUNK_BYTES // (4 * flat.shape[1]))
    for r in range(0, flat.shape[0], step):
        chunk = flat[r:r + step].float()
        out[r:r + step] = torch.logsumexp(chunk, -1) - chunk.gather(1, tgt[r:r + step, None]).squeeze(1)
    return out.reshape(shape)


@torch.inference_mode()
def sequence_nll(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                 eos_id: int | None = None) -> torch.Tensor:
    """-log p(targets | inputs) per position (batch, seq) in fp32. `eos_id`: document masking at that
    end-of-text id, as the trainer's forward and validation do (None: plain causal attention)."""
    logits = model(inputs) if eos_id is None else model(inputs, doc_start=document_starts(inputs, eos_id))
    return token_nll(logits, targets)

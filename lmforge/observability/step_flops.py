"""Training FLOPs of the sequences a run actually trained, exact under document masking.

`training_flops_per_token` counts every packed sequence as one document: an upper bound of the
attended pairs once document masking cuts sequences at end-of-text tokens, so MFU would over-read
(the default recipe packs Shakespeare lines and Bible verses: many short documents). Here each
micro-batch's document starts give the exact count: the query at position i of a document that
starts at s attends min(i - s + 1, w) keys (w: the layer's window, none for full attention), the
same rule `flops.attended_pairs(..., doc_lengths=...)` sums per document. Top-k layers are exact
too: their distant blocks lie wholly inside the query block's document, so how many keys a query
attends depends on the document starts alone, never on which blocks won."""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from lmforge.config import ModelConfig
from lmforge.observability.flops import BACKWARD_TO_FORWARD, attended_pairs, training_flops_per_token


def _masked_pairs(doc_start: torch.Tensor, window: int | None) -> torch.Tensor:
    """The count below as a 0-d tensor on doc_start's device (no host sync)."""
    pos = torch.arange(doc_start.shape[-1], device=doc_start.device)
    keys = pos - doc_start + 1
    if window is not None:
        keys = keys.clamp(max=window)
    return keys.sum()


def _topk_masked_pairs(doc_start: torch.Tensor, window: int, block: int, topk: int) -> torch.Tensor:
    """Top-k pairs as a 0-d tensor (no host sync), by the rule of `flops._topk_document_pairs`:
    the local keys of each query, plus `block` keys per chosen distant block for queries in the
    document of their block's first query."""
    n = doc_start.shape[-1]
    pos = torch.arange(n, device=doc_start.device)
    first = pos - pos % block
    local = pos - torch.maximum(torch.minimum(pos - window + 1, first), doc_start) + 1
    d = doc_start[:, first]  # each query block's first query's document start, per token
    eligible = torch.div(first - window + 1, block, rounding_mode="floor") - torch.div(d + block - 1, block,
                                                                                        rounding_mode="floor")
    distant = block * eligible.clamp(min=0, max=topk)
    return local.sum() + torch.where(doc_start == d, distant, torch.zeros_like(distant)).sum()


def document_masked_pairs(doc_start: torch.Tensor, window: int | None) -> int:
    """(query, key) pairs one head attends over a batch (doc_start (batch, seq): each token's
    document start), causal and document-masked, within `window` keys when given."""
    return int(_masked_pairs(doc_start, window))


class StepFlops:
    """Training FLOPs of this rank's micro-batches since the last `take`. Attention scores and
    values are counted from each micro-batch's document starts (every kind, exactly); everything
    else (projections, feed-forward, output) per token as `training_flops_per_token` does. The
    pair counts stay on the device until `take` (one sync per log step, not per micro-batch)."""

    def __init__(self, cfg: ModelConfig, seq_len: int) -> None:
        a = cfg.attention
        self.per_pair = (1.0 + BACKWARD_TO_FORWARD) * 2 * (2 * cfg.n_heads * cfg.head_dim)
        # layers per attention rule: "full", ("window", w) or ("topk", w, block, topk)
        self.layers_per_rule = Counter(_rule(a.kind(i), a.window, a.block_size, a.topk, seq_len)
                                       for i in range(cfg.n_layers))
        attention_per_seq = sum(n * attended_pairs(r[0], seq_len, *r[1:]) for r, n in self.layers_per_rule.items())
        per_token = training_flops_per_token(cfg, seq_len)
        self.other_per_token = per_token - self.per_pair * attention_per_seq / seq_len
        self.reset()

    def reset(self) -> None:
        """Forget what was added since the last `take` (e.g. steps a rollback undid)."""
        self._tokens = 0
        self._pairs: torch.Tensor | None = None

    def add(self, doc_start: torch.Tensor) -> None:
        """One micro-batch of shape (batch, seq_len) trained on this rank."""
        pairs = sum(n * _rule_pairs(doc_start, r) for r, n in self.layers_per_rule.items())
        self._pairs = pairs if self._pairs is None else self._pairs + pairs
        self._tokens += doc_start.numel()

    def take(self, group: dist.ProcessGroup | None, device: torch.device) -> float:
        """The FLOPs every data-parallel rank trained since the last call (summed over `group`;
        a collective: every rank of it calls), and start over."""
        pairs = self._pairs.to(device, torch.float64) if self._pairs is not None else \
            torch.zeros((), dtype=torch.float64, device=device)
        total = (self.other_per_token * self._tokens + self.per_pair * pairs).reshape(1)
        if group is not None:
            dist.all_reduce(total, group=group)
        self.reset()
        return float(total)


def _rule(kind: str, window: int, block: int, topk: int, seq_len: int) -> tuple:
    """A layer's attention rule as `attended_pairs` arguments; a window as long as the sequence
    is full causal (what the kernels run)."""
    if kind == "full" or window >= seq_len:
        return ("full",)
    return ("window", window) if kind == "window" else ("topk", window, block, topk)


def _rule_pairs(doc_start: torch.Tensor, rule: tuple) -> torch.Tensor:
    if rule[0] == "topk":
        return _topk_masked_pairs(doc_start, *rule[1:])
    return _masked_pairs(doc_start, rule[1] if rule[0] == "window" else None)

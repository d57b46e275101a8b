"""Training FLOPs of the sequences a run actually trained, exact under document masking.

`training_flops_per_token` counts every packed sequence as one document: an upper bound of the
attended pairs once document masking cuts sequences at end-of-text tokens, so MFU would over-read
(the default recipe packs Shakespeare lines and Bible verses: many short documents). Here each
micro-batch's document starts give the exact count: the query at position i of a document that
starts at s attends min(i - s + 1, w) keys (w: the layer's window, none for full attention), the
same rule `flops.attended_pairs(..., doc_lengths=...)` sums per document.

Top-k layers choose their distant blocks from the data: with document masking their count is
not closed-form, and those layers keep the one-document count (an upper bound; said in the
docstring of `StepFlops`)."""

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


def document_masked_pairs(doc_start: torch.Tensor, window: int | None) -> int:
    """(query, key) pairs one head attends over a batch (doc_start (batch, seq): each token's
    document start), causal and document-masked, within `window` keys when given."""
    return int(_masked_pairs(doc_start, window))


class StepFlops:
    """Training FLOPs of this rank's micro-batches since the last `take`. Layers whose pairs the
    document starts decide (full, window) are counted exactly; everything else (projections,
    feed-forward, output, top-k layers) per token as `training_flops_per_token` does. The pair
    counts stay on the device until `take` (one sync per log step, not per micro-batch)."""

    def __init__(self, cfg: ModelConfig, seq_len: int) -> None:
        a = cfg.attention
        self.per_pair = (1.0 + BACKWARD_TO_FORWARD) * 2 * (2 * cfg.n_heads * cfg.head_dim)
        kinds = [a.kind(i) for i in range(cfg.n_layers)]
        # exactly-counted layers per window (None: full causal); top-k layers stay per token
        self.layers_per_window = Counter(None if k == "full" else a.window for k in kinds if k != "topk")
        exact_per_seq = sum(n * attended_pairs("full" if w is None else "window", seq_len, w)
                            for w, n in self.layers_per_window.items())
        per_token = training_flops_per_token(cfg, seq_len)
        self.other_per_token = per_token - self.per_pair * exact_per_seq / seq_len
        self.reset()

    def reset(self) -> None:
        """Forget what was added since the last `take` (e.g. steps a rollback undid)."""
        self._tokens = 0
        self._pairs: torch.Tensor | None = None

    def add(self, doc_start: torch.Tensor) -> None:
        """One micro-batch of shape (batch, seq_len) trained on this rank."""
        pairs = sum(n * _masked_pairs(doc_start, w) for w, n in self.layers_per_window.items())
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

"""The early-exit loss (issue 17, LayerSkip): each exit's next-token cross-entropy, weighted, joins
the training loss, so the blocks below an exit learn to leave a state the shared final norm and LM
head can read (model.early_exit; lmforge/models/llama/model.py returns the exit logits from
forward with `exits=True`).

    loss = CE(final) + loss_weight * sum over exits e of CE(exit e)

The logged `loss` stays the final layer's cross-entropy (the number every other run logs, and
what validation measures); the exits' own means are logged as `exit_loss_<k>` (k: blocks before
the exit) at log steps, averaged over data-parallel ranks. Layouts: data parallelism only, refused
otherwise at config validation (config/job.py: _check_early_exit).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lmforge.config import ModelConfig
from lmforge.models.common.cross_entropy import cross_entropy


class ExitLoss:
    """Weighted exit cross-entropies for the trainer, and their running means for the log."""

    def __init__(self, layers: list[int], weight: float, device: torch.device):
        self.layers, self.weight = list(layers), weight
        self._sums = torch.zeros(len(self.layers) + 1, dtype=torch.float64, device=device)  # per exit + count

    @classmethod
    def for_model(cls, cfg: ModelConfig, device: torch.device) -> ExitLoss | None:
        """None when the model has no exits to train (no layers, or weight 0)."""
        ee = cfg.early_exit
        return cls(ee.layers, ee.loss_weight, device) if ee.layers and ee.loss_weight > 0 else None

    def loss(self, exit_logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """loss_weight x the sum of the exits' mean token cross-entropies (with grad). The logits are
        overwritten with their gradients (see models/common/cross_entropy.py)."""
        if len(exit_logits) != len(self.layers):
            raise ValueError(f"got {len(exit_logits)} exit logits for exits after {self.layers} blocks")
        losses = torch.stack([cross_entropy(z, targets, overwrite_logits=True) for z in exit_logits])
        self._sums[:-1] += losses.detach().to(torch.float64)
        self._sums[-1] += 1
        return self.weight * losses.sum()

    def window_metrics(self, group: dist.ProcessGroup | None) -> dict[str, float]:
        """Mean cross-entropy of each exit over the micro-batches since the last call, averaged
        over data-parallel ranks (one small all-reduce, at log steps only)."""
        sums = self._sums.clone()
        if group is not None:
            dist.all_reduce(sums, group=group)
        self._sums.zero_()
        count = max(float(sums[-1]), 1.0)
        return {f"exit_loss_{k}": float(s) / count for k, s in zip(self.layers, sums[:-1].tolist(), strict=True)}

"""What MoE layers report while training, and when a forward's expert load counts.

`RouterStats` is the collector (lmforge.models.common.moe.MoE reports to one); `PendingLoad` and
`counting_gate_weight` make a forward's load count only when that forward is trained.
"""

from __future__ import annotations

import torch

from lmforge.models.common.eager import eager_under_compile


class RouterStats:
    """The collector MoE layers report to, keyed by layer (block index): the trainer creates one,
    hands it to the layers (`MoE.report_to`) and reads it (lmforge.train.router_balance), so it
    never reads statistics off modules. A layer nobody handed one reports to its own.

    - `aux_loss[layer]`: weighted router loss of the layer's last training forward
      (aux_loss_coef * aux + z_loss_coef * z, with grad), to add to the training loss;
    - `load[layer]`: tokens per expert over the trained forwards since it was last cleared (the
      micro-batches of one optimizer step, for the bias update). A forward's load is added when
      its backward reaches the router (`_CountLoadInBackward`), so forwards that are not trained
      (pipeline shape inference, recomputation) never count;
    - `last[layer]`: detached figures of the last training forward (tokens_per_expert, dropped,
      aux_loss, z_loss), for metrics.
    """

    def __init__(self) -> None:
        self.aux_loss: dict[int, torch.Tensor] = {}
        self.load: dict[int, torch.Tensor] = {}
        self.last: dict[int, dict[str, torch.Tensor]] = {}

    def add_load(self, layer: int, load: torch.Tensor) -> None:
        prev = self.load.get(layer)
        self.load[layer] = load.clone() if prev is None else prev + load


class PendingLoad:
    """The load of one training forward, added to its collector when (and if) the backward of
    that forward reaches the router's gate weight."""

    def __init__(self, stats: RouterStats, layer: int):
        self.stats, self.layer = stats, layer
        self.load: torch.Tensor | None = None

    def commit(self) -> None:
        if self.load is not None:
            self.stats.add_load(self.layer, self.load)
            self.load = None  # at most once


class _CountLoadInBackward(torch.autograd.Function):
    """Identity on the router's gate weight; its backward commits the forward's load.

    Why in the backward, and on the weight: the balancing bias must move from the load of the
    forwards that train the model, and only those. Torch's pipelining runs an extra forward and
    an input-gradient backward to infer shapes (the first step of every process, and after each
    evaluation), and V-schedule evaluation runs a whole step; activation checkpointing recomputes
    forwards. A node between the gate weight and its use runs in backward exactly when that
    forward's weight gradients are computed: once per trained micro-batch, never for the shape
    inference (autograd.grad towards the stage inputs skips nodes that only lead to weights),
    not again for a recomputation (its graph is used for saved tensors, not run backwards)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, pending: PendingLoad) -> torch.Tensor:
        ctx.pending = pending
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.pending.commit()
        return grad, None


@eager_under_compile
def counting_gate_weight(weight: torch.Tensor, pending: PendingLoad) -> torch.Tensor:
    """`weight` through `_CountLoadInBackward`, always eager: its backward changes Python state,
    which a compiled graph cannot replay (under torch.compile this is one small graph break)."""
    return _CountLoadInBackward.apply(weight, pending)

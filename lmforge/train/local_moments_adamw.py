"""AdamW with each rank's moments before the compression (`comm.adam_moments = "local"`): the
optimizer half of lmforge/parallel/comm/local_moments.py.

A step hands every parameter's gradient (this rank's own: the DDP hook reduced nothing) to the
exchange, which makes this rank's AdamW update, compresses it with error feedback and returns the
mean of every rank's; the step applies AdamW's decoupled weight decay and subtracts that mean. The
weights are replicated, so the decay is the same on every rank.

State: each parameter's step count (the same on every rank, saved with the optimizer; it also
keeps the state non-empty, so DCP never runs a step to create it). The moments differ per rank and
live in the exchange, which the trainer checkpoints per rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.parallel.comm.local_moments import LocalMomentsExchange, LocalStep


class LocalMomentsAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) whose moments are each rank's and
    whose update travels compressed; amsgrad, maximize and capturable are not supported."""

    def __init__(self, params, exchange: LocalMomentsExchange, *, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.exchange = exchange
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["step"] = torch.tensor(0.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [(group, p) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not todo:
            return loss
        steps = []
        for group, p in todo:
            count = self.state[p]["step"]
            count += 1
            beta1, beta2 = group["betas"]
            steps.append(LocalStep(p, group["lr"], beta1, beta2, group["eps"], int(count)))
        for (group, p), update in zip(todo, self.exchange.averaged_updates(steps)):
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.sub_(update.view_as(p).to(p.dtype))
        return loss

"""AdamW whose second moment stops moving after a warm-up (`comm.adam_variance = "frozen"`): the
optimizer half of 1-bit Adam (Tang et al., 2021), for gradients that reach it through top-k with
error feedback (lmforge/parallel/comm/).

Why: with error feedback a coordinate that top-k 1% rarely picks arrives as one spike S, the sum
of the ~100 small gradients it held back. AdamW divides each coordinate by the root of its own
running mean square, so the spike moves the weight by a few lr steps where the 100 small
gradients would have moved it by up to 100. With the second moment v frozen the update is
m / denominator, linear in the gradients, so a late spike moves the weight as far as the
gradients it stands for (tests/unit/test_frozen_variance.py). v is estimated over the first
`freeze_after` optimizer steps with plain AdamW (the hook's warm-up: comm.warmup_steps).

Until a parameter has taken `freeze_after` steps this is torch's AdamW, bit for bit (its own
`step` runs); after that, per parameter: decoupled weight decay, the first moment as AdamW moves
it, and a fixed denominator: FROZEN_MARGIN x (sqrt(v_hat) + eps) of step `freeze_after`, v
floored at VARIANCE_FLOOR of its tensor's mean. The state is AdamW's (exp_avg, exp_avg_sq, step),
so checkpoints and resumes are AdamW's; the denominators are derived from it.

What it did (docs/benchmarks.md, 2026-12-04): on the 0.16M-parameter model top-k 1% after 30 int4
steps reached 0.961 of the baseline's loss with it, 0.949 with AdamW; on tiny-dense 0.897 with
it, 0.906-0.916 with AdamW, and even a second moment refreshed every step from the ranks' dense
gradients (bytes not counted) reached only 0.894: there the delay of top-k's error feedback, not
AdamW's normalisation, holds it back. Hence "adaptive" stays the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

# The frozen second moment of each coordinate at least this fraction of its tensor's mean. Why: a
# coordinate with no gradient during the warm-up (the embedding row of a token not yet seen: v = 0)
# would later divide its gradient by eps alone, a step of ~lr * |g| / 1e-8; AdamW would have
# normalised it to ~lr. With the floor it moves like a coordinate of 1/sqrt(0.1) ~ 3x less than
# the tensor's root-mean-square gradient, while the others keep their own.
VARIANCE_FLOOR = 0.1
# Frozen steps are this many times smaller than AdamW's would be with the same v. Why: AdamW's v
# grows when a coordinate's gradients do and so damps it; frozen, nothing does, and top-k's error
# feedback delivers bursts. Measured on the 0.16M-parameter model (top-k 1% after 30 int4 steps):
# loss 4.45 at 1x, 4.27 at 2x, 4.20 at 4x, 4.34 at 8x (baseline 4.02); with int8 throughout (and
# clipping by the dense estimate): 4.30 at 1x, 4.03 at 2x and 4x.
FROZEN_MARGIN = 4.0


class FrozenVarianceAdamW(torch.optim.AdamW):
    """torch.optim.AdamW for each parameter's first `freeze_after` steps, then its second moment
    frozen (see the module docstring). amsgrad and maximize are not supported."""

    def __init__(self, params, *, freeze_after: int, **kwargs) -> None:
        if freeze_after < 1:
            raise ValueError(f"freeze_after {freeze_after} must be >= 1 (steps that estimate the second moment)")
        if kwargs.get("amsgrad") or kwargs.get("maximize"):
            raise ValueError("FrozenVarianceAdamW supports neither amsgrad nor maximize")
        super().__init__(params, **kwargs)
        self.freeze_after = freeze_after
        self._denominators: dict[int, torch.Tensor] = {}  # id(p) -> its frozen denominator (derived, not saved)
        # GradScaler then unscales and skips non-finite steps itself instead of handing the fused
        # kernel its scale: the frozen update below is not a fused kernel.
        self._step_supports_amp_scaling = False

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._denominators.clear()  # derived from the second moments just loaded

    def frozen_denominator(self, p: torch.Tensor) -> torch.Tensor | None:
        """What the frozen steps of `p` divide by: FROZEN_MARGIN x (sqrt(v_hat) + eps), v floored at
        VARIANCE_FLOOR of its tensor's mean and bias-corrected at the freeze step; None before `p`
        froze. Computed once (not saved: derived from the state)."""
        if not self._is_frozen(p):
            return None
        denom = self._denominators.get(id(p))
        if denom is None:
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            v = self.state[p]["exp_avg_sq"]
            bc2_sqrt = math.sqrt(1 - group["betas"][1] ** self.freeze_after)  # v's bias correction when it froze
            denom = (v.clamp(min=VARIANCE_FLOOR * float(v.mean())).sqrt() / bc2_sqrt).add_(group["eps"])
            denom.mul_(FROZEN_MARGIN)
            self._denominators[id(p)] = denom
        return denom

    def _is_frozen(self, p: torch.Tensor) -> bool:
        st = self.state.get(p)
        return st is not None and "step" in st and int(st["step"]) >= self.freeze_after

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        frozen = [p for g in self.param_groups for p in g["params"] if p.grad is not None and self._is_frozen(p)]
        if len(frozen) < sum(p.grad is not None for g in self.param_groups for p in g["params"]):
            grads = [p.grad for p in frozen]  # the others take torch's AdamW step
            for p in frozen:
                p.grad = None
            super().step()
            for p, grad in zip(frozen, grads):
                p.grad = grad
        if frozen:
            self._frozen_step({id(p) for p in frozen})
        return loss

    def _frozen_step(self, frozen: set[int]) -> None:
        """AdamW's update (torch's single-tensor order of operations) without the v update."""
        for group in self.param_groups:
            lr, beta1, wd = group["lr"], group["betas"][0], group["weight_decay"]
            for p in group["params"]:
                if id(p) not in frozen:
                    continue
                denom = self.frozen_denominator(p)
                st = self.state[p]
                st["step"] += 1
                exp_avg = st["exp_avg"]
                p.mul_(1 - lr * wd)
                exp_avg.lerp_(p.grad, 1 - beta1)
                step_size = lr / (1 - beta1 ** float(st["step"]))
                p.addcdiv_(exp_avg, denom, value=-step_size)


def hand_over_frozen_variance(optimizer: torch.optim.Optimizer, hook: Any) -> bool:
    """Once every parameter's second moment is frozen, give the comm hook (CommHookState) the
    denominators, so top-k picks the values by the update they make (|g| / denominator, the same
    on every rank). True when handed over (or nothing to hand: not frozen-variance AdamW, no hook)."""
    if not isinstance(optimizer, FrozenVarianceAdamW) or hook is None:
        return True
    denominators = {id(p): optimizer.frozen_denominator(p) for g in optimizer.param_groups for p in g["params"]}
    if any(d is None for d in denominators.values()):
        return False
    hook.set_selection_divisors(denominators)
    return True

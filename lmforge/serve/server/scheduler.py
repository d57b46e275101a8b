"""What one engine step runs under its token budget: every decoding sequence gets its one token
first (running requests are never starved by new ones), then the budget left prefills waiting
prompts in arrival order, long prompts in chunks over several steps (chunked prefill)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class Schedulable(Protocol):
    @property
    def prefill_left(self) -> int: ...  # prompt tokens not yet in the KV cache


@dataclass
class StepPlan:
    decode: list = field(default_factory=list)                    # sequences: one token each
    prefill: list[tuple[object, int]] = field(default_factory=list)  # (sequence, tokens this step)

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)


def plan_step(running: list, budget: int, chunk: int) -> StepPlan:
    """`running`: the slot holders in arrival order. Decoders take one token each; prefills share
    what is left, at most `chunk` tokens per sequence per step."""
    plan = StepPlan(decode=[s for s in running if s.prefill_left == 0])
    left = budget - len(plan.decode)
    for s in running:
        if left <= 0:
            break
        if s.prefill_left > 0:
            n = min(s.prefill_left, chunk, left)
            plan.prefill.append((s, n))
            left -= n
    return plan

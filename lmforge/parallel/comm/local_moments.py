"""AdamW's moments before the compression (`comm.adam_moments = "local"`): each data-parallel rank
keeps AdamW's first and second moments of its *own* gradient and sends its update, not its
gradient, through the compressor with error feedback; the ranks' averaged updates move the weights
(lmforge/train/local_moments_adamw.py applies them).

Why: with AdamW after the reduction, top-k's error feedback hands AdamW a coordinate's held-back
gradients as one burst tens of steps late, and AdamW's normalisation shrinks that burst to a few lr
steps where the gradients it stands for would have moved the weight by many. Here the residual
holds AdamW steps already made: lr_t x m_hat / (sqrt(v_hat) + eps), each scaled by the lr of the
step that made it, so a late coordinate moves as far as dense AdamW would have moved it, and as the
lr schedule said at the time. DGC (Lin et al. 2018) carries the momentum through the residual for
the same reason; 1-bit Adam (Tang et al. 2021) compresses the momentum.

What is per rank, and checkpointed per rank (the trainer's PerRank): the moments and the residuals,
by parameter name. What is the same on every rank: the step count (which compressor runs: a
warm-up's first) and every decoded update, summed in rank order, so the replicas stay bit-equal.
The DDP hook (`local_gradient_hook`) sends nothing: backward leaves each rank its own gradient,
clipped by the trainer on that rank (its local norm). The exchange runs once per optimizer step,
after backward: it does not overlap with backward as the gradient hooks do; its time is counted as
exposed communication (`timer`, set by the trainer to the step breakdown's clock).

No `from __future__ import annotations` here: DDP checks the hook's annotations as objects.
"""

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmforge.parallel.comm.accounting import CommAccounting, allgather_bytes
from lmforge.parallel.comm.compressors import Compressor

# Parameters are exchanged in chunks of at most this many values: one encode and one all-gather
# each, so the temporaries stay bounded and top-k's int32 positions fit. Every compressor works
# per parameter, so where a chunk ends never changes a value.
CHUNK_VALUES = 1 << 26


@dataclass
class LocalStep:
    """One parameter's part of a step: its gradient on this rank and AdamW's settings for it."""

    param: torch.Tensor
    lr: float
    beta1: float
    beta2: float
    eps: float
    step: int  # this parameter's optimizer steps, this one included (bias correction)


class LocalMomentsExchange:
    """Per-rank AdamW moments and update residuals; `averaged_updates` makes this rank's updates,
    compresses them and returns the mean of every rank's. Stateful (checkpoint it per rank)."""

    def __init__(self, compressor: Compressor, group: dist.ProcessGroup | None, names: dict[int, str],
                 warmup: Compressor | None = None, warmup_steps: int = 0, error_feedback: bool = True) -> None:
        self.compressor = compressor
        self.error_feedback = error_feedback  # off: what a compressor drops is lost (comm.error_feedback)
        self.warmup, self.warmup_steps = warmup, warmup_steps if warmup is not None else 0
        self.group = group
        self.world = dist.get_world_size(group)
        self.names = names  # id(parameter) -> its name in the model
        self.steps = 0  # exchanges done (the optimizer steps they fed)
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (exp_avg, exp_avg_sq)
        self.residuals: dict[str, torch.Tensor] = {}
        self.accounting = CommAccounting()
        self.timer: Callable[[], AbstractContextManager] = contextlib.nullcontext  # around the collectives

    def _update(self, s: LocalStep) -> torch.Tensor:
        """This rank's AdamW step for `s.param` (torch's AdamW order of operations), flat, plus
        what error feedback held back of it."""
        name = self.names[id(s.param)]
        grad = s.param.grad.detach().float()
        if name not in self.moments:
            self.moments[name] = (torch.zeros_like(grad), torch.zeros_like(grad))
        exp_avg, exp_avg_sq = self.moments[name]
        exp_avg.lerp_(grad, 1 - s.beta1)
        exp_avg_sq.mul_(s.beta2).addcmul_(grad, grad, value=1 - s.beta2)
        denom = (exp_avg_sq.sqrt() / (1 - s.beta2 ** s.step) ** 0.5).add_(s.eps)
        update = torch.div(exp_avg, denom).mul_(s.lr / (1 - s.beta1 ** s.step)).view(-1)
        held = self.residuals.get(name)
        return update.add_(held.view(-1)) if held is not None else update

    def averaged_updates(self, steps: list[LocalStep]) -> list[torch.Tensor]:
        """The mean over ranks of each parameter's compressed update (what to subtract from it),
        in the order given; the same bits on every rank. Every rank must pass the same
        parameters in the same order."""
        compressor = self.warmup if self.steps < self.warmup_steps else self.compressor
        out: list[torch.Tensor] = []
        for chunk in _chunks(steps):
            out.extend(self._exchange(compressor, chunk))
        self.steps += 1
        return out

    def _exchange(self, compressor: Compressor, chunk: list[LocalStep]) -> list[torch.Tensor]:
        numels = tuple(s.param.numel() for s in chunk)
        y = torch.cat([self._update(s) for s in chunk])
        payload, local = compressor.roundtrip(y, numels)
        gathered = [[torch.empty_like(t) for _ in range(self.world)] for t in payload]
        with self.timer():
            for parts, t in zip(gathered, payload):
                dist.all_gather(parts, t.contiguous(), group=self.group)
        self.accounting.add_fp32_allreduce(allgather_bytes(compressor.wire_bytes(numels), self.world),
                                           sum(numels), self.world)
        if self.error_feedback:
            for s, held in zip(chunk, (y - local).split(numels)):  # what was not sent (a cast may alias y)
                self.residuals[self.names[id(s.param)]] = held
        total = compressor.sum_gathered(gathered, local, dist.get_rank(self.group), numels, torch.empty_like(local))
        return list(total.div_(self.world).split(numels))

    # CommHookState
    def dense_grad_norm(self) -> None:
        """None: the trainer clips each rank's own gradient by its own norm (nothing was reduced)."""
        return None

    def set_selection_divisors(self, divisors: dict[int, torch.Tensor]) -> None:
        raise RuntimeError("comm.adam_moments = 'local' keeps adaptive moments per rank; a frozen second "
                           "moment's divisors do not apply")

    def state_dict(self) -> dict:
        return {"adam_moments": "local", "world": self.world, "steps": self.steps,
                "moments": {k: (m.clone(), v.clone()) for k, (m, v) in self.moments.items()},
                "residuals": {k: v.detach().clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Moments and residuals are this rank's; saved by another number of ranks, every rank
        would get rank 0's (the checkpoint's per-rank rule): then every rank starts from rank 0's
        moments (one rank's estimate of the same gradients) and from no residual, which would
        otherwise send rank 0's held-back updates once per rank."""
        if state.get("adam_moments") != "local":
            raise ValueError("its comm state was saved with comm.adam_moments = 'global' (gradient "
                             "residuals, no moments); resume it with 'global', or start this run from its weights")
        same = state.get("world") == self.world
        self.moments = {k: (m.clone(), v.clone()) for k, (m, v) in state["moments"].items()}
        self.residuals = {k: v.clone() for k, v in state["residuals"].items()} if same else {}
        self.steps = int(state["steps"])


def _chunks(steps: list[LocalStep]) -> list[list[LocalStep]]:
    """Consecutive runs of parameters of at most CHUNK_VALUES values (a larger one alone)."""
    chunks: list[list[LocalStep]] = []
    size = 0
    for s in steps:
        n = s.param.numel()
        if not chunks or size + n > CHUNK_VALUES:
            chunks.append([])
            size = 0
        chunks[-1].append(s)
        size += n
    return chunks


def local_gradient_hook(state: LocalMomentsExchange, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook that reduces nothing: each rank keeps its own gradient (the exchange sends
    its update after backward)."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut

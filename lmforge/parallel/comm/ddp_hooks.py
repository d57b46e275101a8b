"""The DDP comm hook of the element-wise compressors (lmforge.parallel.comm.compressors), with
error feedback, and `register_compression`, which installs it (or PowerSGD) on a DDP model.

Per bucket, with W data-parallel ranks: y = grad / W + residual; the payload encodes y; the new
residual is y - decode(payload) (error feedback: what was not sent this step is sent later, so
the applied updates track the exact ones). Casts are all-reduced in their dtype; the rest are
all-gathered and every rank decodes and sums all payloads in rank order (gloo would wrap int8
sums around), so every replica gets the same bits. The hook encodes on DDP's autograd thread,
starts the collective and returns its future: backward goes on while the bytes travel, and the
other ranks' payloads are decoded in the future's callback when they arrive.

Residuals are kept per parameter (by name), not per bucket: DDP re-lays out its buckets after the
first step, and a resumed run starts from the first layout again.

A warm-up compressor (`comm.warmup_compression`) runs for the first `warmup_steps` synchronised
backward passes, counted by the hook (at the last bucket of each) and saved with the residuals,
which carry over from one compressor to the other. After a warm-up, top-k steps also measure the
norm gradient clipping needs (`dense_grad_norm`): top-k's decoded sum is not the gradient, error
feedback releases a coordinate's held-back gradients in one go (at 1%: about 10x the dense norm),
so clipping by its norm would cut every step after the warm-up ~10x against the warm-up's (and
with AdamW's second moment frozen nothing renormalises it). Each rank's local gradient's squared
norm is all-reduced (4 bytes, counted); sqrt(mean over ranks) clips, at least the averaged
gradient's norm, so it clips no later than plain all-reduce would. Plain top-k (no warm-up) clips
by the decoded sum's norm, as before; AdamW renormalises it.

`set_selection_divisors` (comm.adam_variance = "frozen"): top-k picks |value| / AdamW's frozen
denominator, the values whose update is largest (the same divisors on every rank).

No `from __future__ import annotations` here: DDP checks the hook's annotations as objects.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge.config.comm import CommConfig
from lmforge.parallel.comm.accounting import CommAccounting, allgather_bytes, allreduce_bytes
from lmforge.parallel.comm.compressors import Compressor, TopKCompressor, build_compressor
from lmforge.parallel.comm.local_moments import LocalMomentsExchange, local_gradient_hook


class CompressionHook:
    """State of `compressed_allreduce_hook`: the compressor, the group, the residuals by
    parameter name and the byte accounting. Stateful (`state_dict`) for checkpoints."""

    def __init__(self, compressor: Compressor, group: dist.ProcessGroup | None, names: dict[int, str],
                 error_feedback: bool = True, warmup: Compressor | None = None, warmup_steps: int = 0) -> None:
        self.compressor = compressor
        self.warmup, self.warmup_steps = warmup, warmup_steps if warmup is not None else 0
        self.steps = 0  # synchronised backward passes done (the optimizer steps they feed)
        self._local_sq: dict[str, torch.Tensor] = {}  # this pass's local squared norms (top-k after a warm-up)
        self._norm: tuple[torch.Tensor, dist.Work] | None = None  # its all-reduce, in flight
        self.divisors: dict[str, torch.Tensor] = {}  # top-k picks by |value| / divisor (frozen AdamW's denominators)
        self.group = group
        self.world = dist.get_world_size(group)
        self.names = names  # id(parameter) -> its name in the model
        self.error_feedback = error_feedback
        self.residuals: dict[str, torch.Tensor] = {}
        self.accounting = CommAccounting()

    def reduce(self, flat: torch.Tensor, names: list[str], numels: tuple[int, ...],
               out: torch.Tensor | None = None) -> torch.futures.Future:
        """A future of the mean over ranks of `flat` (this rank's gradients of parameters `names`),
        compressed, written into `out` (a new tensor when None; it may be `flat` itself). The
        collective runs on the process group's thread while the caller (DDP's autograd thread)
        goes on with backward; the other ranks' payloads are decoded when they arrive, in the
        future's callback. Every pass over the gradients costs as much as a quantiser's on CPU, so
        the residual is added and taken out in place."""
        compressor = self.warmup if self.steps < self.warmup_steps else self.compressor
        if self.warmup is not None and isinstance(compressor, TopKCompressor):  # for dense_grad_norm
            for name, piece in zip(names, flat.split(numels)):  # per parameter, its own aligned copy:
                piece = piece.clone()  # the same bits whatever the bucket layout (a resume starts another)
                self._local_sq[name] = torch.dot(piece, piece)
        y = torch.div(flat, self.world, out=torch.empty_like(flat, dtype=torch.float32))
        if self.error_feedback:
            for name, piece in zip(names, y.split(numels)):
                if name in self.residuals:
                    piece.add_(self.residuals[name].view(-1))
        if self.divisors and isinstance(compressor, TopKCompressor):
            payload = compressor.encode(y, numels, divisors=[self.divisors.get(n) for n in names])
        else:
            payload = compressor.encode(y, numels)
        summable = compressor.summable
        # this rank's own decode: before an all-reduce sums into the payload, while an all-gather runs
        local = compressor.decode(payload, numels) if summable and self.error_feedback else None
        wire = compressor.wire_bytes(numels)
        if summable:
            works = [dist.all_reduce(t, group=self.group, async_op=True) for t in payload]
            self.accounting.add_fp32_allreduce(allreduce_bytes(wire, self.world), sum(numels), self.world)
        else:
            gathered = [[torch.empty_like(t) for _ in range(self.world)] for t in payload]
            works = [dist.all_gather(parts, t.contiguous(), group=self.group, async_op=True)
                     for parts, t in zip(gathered, payload)]
            self.accounting.add_fp32_allreduce(allgather_bytes(wire, self.world), sum(numels), self.world)
            local = compressor.decode(payload, numels)
        if self.error_feedback:  # y becomes the residual: what was not sent this step
            for name, piece in zip(names, y.sub_(local).split(numels)):
                self.residuals[name] = piece
        me = dist.get_rank(self.group)

        def finish(_: torch.futures.Future) -> torch.Tensor:
            result = out if out is not None else torch.empty_like(flat)
            if summable:
                return result.copy_(compressor.decode(payload, numels))
            return compressor.sum_gathered(gathered, local, me, numels, result)
        return torch.futures.collect_all([w.get_future() for w in works]).then(finish)

    def step_done(self) -> None:
        """The last bucket of a backward pass has been handed over (the warm-up counts these);
        after the warm-up the local squared norm starts its all-reduce (after every bucket's
        collective, so the ranks issue them in the same order)."""
        self.steps += 1
        if self._norm is not None:  # a step whose norm nobody read: done before the next one starts
            self._norm[1].wait()
            self._norm = None
        if self._local_sq:
            total = torch.stack([self._local_sq[n] for n in sorted(self._local_sq)]).sum().reshape(1)
            self._local_sq = {}
            self._norm = (total, dist.all_reduce(total, group=self.group, async_op=True))
            self.accounting.add(allreduce_bytes(total.numel() * 4, self.world), 0)

    def set_selection_divisors(self, divisors: dict[int, torch.Tensor]) -> None:
        """id(parameter) -> what top-k divides its values by to pick them (the same on every rank)."""
        self.divisors = {self.names[pid]: d for pid, d in divisors.items() if pid in self.names}

    def dense_grad_norm(self) -> torch.Tensor | None:
        """The gradient norm to clip by after the warm-up: sqrt(mean over ranks of |local
        gradient|^2), >= the averaged gradient's norm; None when the decoded sum's own norm is
        the one (no warm-up configured, or still in it)."""
        if self._norm is None:
            return None
        total, work = self._norm
        self._norm = None
        work.wait()
        return (total[0] / self.world).sqrt()

    def state_dict(self) -> dict:
        return {"residuals": {k: v.detach().clone() for k, v in self.residuals.items()}, "world": self.world,
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Residuals are this rank's; saved by another number of ranks, every rank would get rank
        0's (the checkpoint's per-rank rule) and send it again: they start from zero instead. The
        step count (which compressor runs) is the same on every rank."""
        if "moments" in state:
            raise ValueError("its comm state was saved with comm.adam_moments = 'local' (update "
                             "residuals and per-rank moments); resume it with 'local', or start this run from its weights")
        same = state.get("world") == self.world
        self.residuals = {k: v.clone() for k, v in state["residuals"].items()} if same else {}
        self.steps = int(state.get("steps", 0))


def compressed_allreduce_hook(state: CompressionHook, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's gradients averaged over the ranks through `state.compressor`."""
    buffer = bucket.buffer()
    params = bucket.parameters()
    numels = tuple(p.numel() for p in params)
    if sum(numels) != buffer.numel():
        raise RuntimeError(f"DDP bucket of {buffer.numel()} values holds parameters of {sum(numels)}")
    fut = state.reduce(buffer, [state.names[id(p)] for p in params], numels, out=buffer)
    if bucket.is_last():
        state.step_done()
    return fut


def parameter_names(module: nn.Module) -> dict[int, str]:
    """id(parameter) -> name, the key of per-parameter comm state (the model's own names)."""
    return {id(p): name for name, p in module.named_parameters()}


def register_compression(model: DDP, cfg: CommConfig, group: dist.ProcessGroup,
                         wrap: Callable[[Callable], Callable] | None = None):  # -> CompressionHook | PowerSGDHook
    """Install `cfg.compression` on `model` (DDP, not "none"), its hook wrapped by `wrap` when
    given (a timer); return the hook's state (checkpoint it, read its `accounting`). With
    `cfg.adam_moments = "local"` the hook reduces nothing and the state is the exchange the
    optimizer sends its updates through (local_moments.py)."""
    def wrapped(hook: Callable) -> Callable:
        return wrap(hook) if wrap is not None else hook
    names = parameter_names(model.module)
    if cfg.compression == "powersgd":
        from lmforge.parallel.comm.powersgd import PowerSGDHook

        hook = PowerSGDHook(group, names, cfg.powersgd_rank, cfg.error_feedback, cfg.powersgd_start_step)
        model.register_comm_hook(hook, wrapped(PowerSGDHook.hook))
        return hook
    warmup = build_compressor(cfg, cfg.warmup_compression) if cfg.warmup_steps > 0 else None
    if cfg.adam_moments == "local":  # each rank keeps its gradient; its AdamW update travels after backward
        exchange = LocalMomentsExchange(build_compressor(cfg), group, names, warmup=warmup,
                                        warmup_steps=cfg.warmup_steps, error_feedback=cfg.error_feedback)
        model.register_comm_hook(exchange, wrapped(local_gradient_hook))
        return exchange
    state = CompressionHook(build_compressor(cfg), group, names, cfg.error_feedback, warmup=warmup,
                            warmup_steps=cfg.warmup_steps)
    model.register_comm_hook(state, wrapped(compressed_allreduce_hook))
    return state

"""The trainer's per-step accounting: where the time goes (lmforge.observability.breakdown), the
bytes the data-parallel gradient reduction sends, and the load balancing that acts on the time
(lmforge.train.load_balance), set up from the config in one place so the training step only marks
its phases.

Bytes have one counter, `lmforge.parallel.comm.accounting.CommAccounting` (per-rank ring traffic
against what an fp32 all-reduce of the same gradients would send): a compressing comm hook fills
its own as it sends; under plain DDP every optimizer step all-reduces the gradients once, counted
here (under comm.hierarchical too, as the flat ring's figure: the scheme's own per-link traffic is
not counted). Both come out as `comm_bytes`, `comm_bytes_per_step` and `comm_compression_ratio`.

The breakdown is made before the model (`make_breakdown`): DDP takes its comm hook once, at wrap
time, and the hook must be wrapped by the breakdown's timer then (a hook's own time, encoding
and decoding gradients, is communication the backward pays for, not compute).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmforge.config import JobConfig
from lmforge.data.loader import DistributedTokenLoader
from lmforge.observability.breakdown import (
    GradReadyClock,
    StepBreakdown,
    compute_advice,
    describe_limits,
    gather,
    summary_line,
    window_metrics,
)
from lmforge.parallel.comm import CommHookState
from lmforge.parallel.comm.accounting import CommAccounting, allreduce_bytes
from lmforge.train.load_balance import LoadBalancer
from lmforge.train.precision import choose_precision, detect_hardware


def make_breakdown(cfg: JobConfig, device: torch.device, data_parallel: bool) -> StepBreakdown:
    """The time breakdown, made before the model so its comm hook can be wrapped by the timer (a
    no-op with metrics.breakdown and comm.load_balance (across data-parallel ranks) both off)."""
    on = cfg.metrics.breakdown or (cfg.comm.load_balance and data_parallel)
    return StepBreakdown(device, None, enabled=on)


class StepAccounting:
    """`bd` times the phases; `comm` counts the bytes of the gradient reduction (None without
    data-parallel collectives)."""

    def __init__(self, cfg: JobConfig, bd: StepBreakdown, model: nn.Module, loader: DistributedTokenLoader,
                 device: torch.device, world_size: int, dp_group: torch.distributed.ProcessGroup | None,
                 hook: CommHookState | None, say: Callable[[str], None]) -> None:
        self.report = cfg.metrics.breakdown
        self.device, self.world_size, self.say = device, world_size, say
        self.bd = bd
        balance = cfg.comm.load_balance and dp_group is not None
        # the end of compute in backward; without data-parallel ranks there is no communication
        if bd.enabled and dp_group is not None and device.type != "cuda":
            bd.use_clock(GradReadyClock(model.parameters()))
        self.balancer = LoadBalancer(loader, cfg.comm.load_balance_interval, dp_group, device) if balance else None
        # FSDP2 gathers parameters inside forward and backward, where a fast rank waits for a slow
        # one: its busy time is the process CPU time (gloo waits sleep), DDP's the compute time
        self.fsdp = cfg.parallel.resolved(world_size).dp_shard > 1
        ddp = hasattr(model, "no_sync") and world_size > 1
        self.comm: CommAccounting | None = hook.accounting if hook is not None else CommAccounting() if ddp else None
        self.grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) \
            if ddp and hook is None else 0
        self.dp_world = torch.distributed.get_world_size(dp_group) if ddp and dp_group is not None else world_size
        self._steps = 0  # optimizer steps in the bytes window
        # the end-of-run advice names only what the run does not use yet
        mode = cfg.train.mixed_precision
        bf16_native = mode == "fp32" and choose_precision("auto", detect_hardware(cfg.train.device)).mode == "bf16"
        self.compute_advice = compute_advice(mode, bf16_native, cfg.train.compile)
        limits = describe_limits(device, fsdp=self.fsdp) if bd.enabled else None
        if limits:
            say(f"note: {limits}")

    def micro_batch_done(self, samples: int) -> None:
        if self.balancer is not None:
            self.balancer.add(self.bd.last_cpu if self.fsdp else self.bd.last_compute, samples)

    def loss_weight(self) -> float:
        """1.0 unless load balancing gave this rank an uneven share (load_balance.py)."""
        return self.balancer.weight() if self.balancer is not None else 1.0

    def step_done(self, step: int) -> None:
        """After each optimizer step (a collective every comm.load_balance_interval steps)."""
        self.bd.step_done()
        self._steps += 1
        if self.grad_bytes and self.comm is not None:  # plain DDP: one fp32 all-reduce of the gradients
            sent = allreduce_bytes(self.grad_bytes, self.dp_world)
            self.comm.add(sent, sent)
        msg = self.balancer.maybe_resplit(step) if self.balancer is not None else None
        if msg:
            self.say(msg)

    def comm_metrics(self) -> dict[str, float]:
        """This rank's bytes sent in the window, per step, and the compression ratio (none without
        data-parallel collectives); starts a new bytes window."""
        steps, self._steps = self._steps, 0
        if self.comm is None:
            return {}
        out = self.comm.window()
        if out["comm_bytes"] == 0:
            return {}
        return {**out, "comm_bytes_per_step": out["comm_bytes"] / max(steps, 1)}

    def window_metrics(self) -> dict[str, float | int]:
        """The log window's bytes, and with the breakdown on its time_*_s and bound (a collective
        over all ranks then; every rank calls it)."""
        comm = self.comm_metrics()
        if not self.report:
            return comm
        out = window_metrics(gather(self.bd.window(), self.device, self.world_size))
        if self.balancer is not None:
            out.update(self.balancer.metrics())
        return {**out, **comm}

    def summary(self) -> tuple[dict[str, float | int], str] | None:
        """The whole run's breakdown and its one-line verdict (collective; None when off)."""
        if not self.report:
            return None
        self.bd.window()  # what came after the last log step
        per_rank = gather(self.bd.run_total(), self.device, self.world_size)
        return window_metrics(per_rank), summary_line(per_rank, self.compute_advice)

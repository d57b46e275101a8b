"""The trainer's per-step accounting: where the time goes (lmforge.observability.breakdown) and
the load balancing that acts on it (lmforge.train.load_balance), set up from the config in one
place so the training step only marks its phases.

Bytes per collective: under DDP without compression every optimizer step all-reduces the
gradients once (their bytes are recorded here); a compressing comm hook records what it reduces and
what it sends through `StepBreakdown.record_comm` instead (`comm_compression_ratio`).
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
    describe_limits,
    gather,
    summary_line,
    window_metrics,
)
from lmforge.train.load_balance import LoadBalancer


class StepAccounting:
    """`bd` times the phases (a no-op with metrics.breakdown and comm.load_balance both off)."""

    def __init__(self, cfg: JobConfig, model: nn.Module, loader: DistributedTokenLoader, device: torch.device,
                 world_size: int, dp_group: torch.distributed.ProcessGroup | None,
                 say: Callable[[str], None]) -> None:
        self.report = cfg.metrics.breakdown
        self.device, self.world_size, self.say = device, world_size, say
        balance = cfg.comm.load_balance and dp_group is not None
        on = self.report or balance
        # the end of compute in backward; without data-parallel ranks there is no communication
        clock = GradReadyClock(model.parameters()) if on and dp_group is not None and device.type != "cuda" else None
        self.bd = StepBreakdown(device, clock, enabled=on)
        self.balancer = LoadBalancer(loader, cfg.comm.load_balance_interval, dp_group, device) if balance else None
        # FSDP2 gathers parameters inside forward and backward, where a fast rank waits for a slow
        # one: its busy time is the process CPU time (gloo waits sleep), DDP's the compute time
        self.fsdp = cfg.parallel.resolved(world_size).dp_shard > 1
        ddp = hasattr(model, "no_sync") and world_size > 1
        self.grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) \
            if ddp and cfg.comm.compression == "none" else 0
        limits = describe_limits(device, fsdp=self.fsdp) if on else None
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
        if self.grad_bytes:
            self.bd.record_comm(self.grad_bytes, self.grad_bytes)
        msg = self.balancer.maybe_resplit(step) if self.balancer is not None else None
        if msg:
            self.say(msg)

    def window_metrics(self) -> dict[str, float | int]:
        """The log window's time_*_s, bound, bytes (a collective over all ranks; every rank calls it)."""
        if not self.report:
            return {}
        comm = self.bd.comm_metrics()
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
        return window_metrics(per_rank), summary_line(per_rank)

"""What the planner predicts for one job on one cluster: bytes per rank and seconds per optimizer
step, each broken down by cause, so a report (or another model: simulation, cost, energy) can
say where memory and time go. Plain frozen dataclasses; `lmforge.plan.predict` fills them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes one rank holds at its peak (the busiest rank: pipeline stage 0 for 1F1B-like
    schedules, where most micro-batches are in flight).

    The first four are what the trainer measures (<run>/memory/rank<r>.json, lmforge/observability/
    memory.py): local parameter, gradient and optimizer-state storages, and the bytes autograd saves
    for backward over one micro-batch (`activations`, one micro-batch, as measured). The rest is
    predicted only: `in_flight` the activations of the other micro-batches a pipeline schedule
    keeps, `temporary` unsharded FSDP parameters and gradients, communication and MoE all-to-all
    buffers, logits and their gradient; `offloaded` bytes kept in host memory by cpu_offload."""

    params: int
    grads: int
    optimizer: int
    activations: int
    in_flight: int = 0
    temporary: int = 0
    offloaded: int = 0
    # FSDP: the gathered weights each matmul saves for backward. The trainer's meter counts them as
    # activations; FSDP frees them after forward and gathers again in backward, so they are not
    # in `total` (the two blocks gathered at a time are in `temporary`).
    fsdp_saved_weights: int = 0

    @property
    def measured_activations(self) -> int:
        """What the trainer's ActivationMeter reports for one micro-batch."""
        return self.activations + self.fsdp_saved_weights

    @property
    def measured_total(self) -> int:
        """The sum the trainer's memory report can check (params + grads + optimizer + activations)."""
        return self.params + self.grads + self.optimizer + self.measured_activations

    @property
    def total(self) -> int:
        """Device bytes at the peak (offloaded bytes live in host memory: not counted)."""
        return self.measured_total + self.in_flight + self.temporary

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step on the slowest rank. `compute` is forward + backward matmul
    and memory-bound work of all micro-batches, `recompute` the extra forward of activation
    checkpointing, `optimizer` the AdamW update; the communication terms are the full message
    times and `exposed_comm` the part not hidden behind compute (see the overlap assumptions
    in lmforge/plan/timing.py); `bubble` is the pipeline's idle time."""

    compute: float
    recompute: float = 0.0
    optimizer: float = 0.0
    overhead: float = 0.0  # per-operator launch / dispatch time
    tp_comm: float = 0.0
    dp_comm: float = 0.0  # FSDP all-gather + reduce-scatter, DDP/HSDP all-reduce
    pp_comm: float = 0.0
    ep_comm: float = 0.0
    exposed_comm: float = 0.0
    bubble: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.recompute + self.optimizer + self.overhead + self.exposed_comm + self.bubble

    def as_dict(self) -> dict[str, float]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total": self.total}


@dataclass(frozen=True)
class Prediction:
    """One layout's prediction. `layout` holds the degrees and the options that change the
    prediction (the keys of `lmforge.plan.search.LAYOUT_KEYS`), `tokens_per_step` the global
    batch in tokens."""

    layout: dict[str, object]
    world_size: int
    memory: MemoryBreakdown
    step_time: StepTime
    tokens_per_step: int
    device_memory_bytes: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.device_memory_bytes

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_time.total if self.step_time.total > 0 else 0.0

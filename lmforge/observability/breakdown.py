"""Where a step's wall time goes: compute, exposed communication, data, checkpoints, evaluation
and idle, measured with host timers, summing to the wall time of each log window.

- data: waiting for the next micro-batch (the loader reads ahead on a thread: only what that
  did not hide counts) and moving it to the device;
- compute: forward, backward up to the last gradient accumulated, clipping and the optimizer step;
- comm_exposed: from the last gradient accumulated to the end of `backward()` on a micro-batch
  that synchronises gradients. DDP starts each bucket's all-reduce as soon as its gradients are
  ready (gloo runs it on its own thread) and waits for all of them at the end of backward; what
  is left then is the communication not hidden under compute, whatever comm hook (compression,
  hierarchical) runs it. The time of the last gradient comes from post-accumulate-grad hooks on
  the parameters (`GradReadyClock`), which do not touch DDP's own hooks;
- ckpt, eval: the saves and validation runs inside the window;
- idle: the rest (logging, the loop itself, waiting in the small collectives of log steps).

Limits: on CUDA the clock synchronises the device at phase boundaries and the exposed
communication is not separated from compute (it would need CUDA events recorded in the hooks);
under FSDP2 the gradient hooks do not fire for sharded parameters, so its collectives count as
compute. Both are said in `describe_limits`.

Ranks differ: a fast rank waits in communication for a slow one. `classify` therefore reads the
*critical* rank, the one with the least exposed communication (the others wait on it): a slow
network shows on every rank, a slow rank shows as the others' waiting, not as a slow network.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

PARTS = ("compute", "comm_exposed", "data", "ckpt", "eval", "idle")
# What each part being the largest (compute excepted) means, and what to try.
BOUNDS = {"compute": "compute", "comm_exposed": "communication", "data": "data", "ckpt": "checkpoint"}
BOUND_CODES = {"compute": 0, "communication": 1, "data": 2, "checkpoint": 3}
COMPILE_HINT = "torch.compile (--train.compile true)"
ADVICE = {
    "compute": "{share:.0%} compute; try " + COMPILE_HINT,
    "communication": "{share:.0%} exposed comm; try int8 compression (--comm.compression int8) or a larger "
                     "micro-batch (--train.micro_batch_size)",
    "data": "{share:.0%} waiting on data; the loader reads one micro-batch ahead: move the data dir to faster "
            "storage or use fewer, larger micro-batches",
    "checkpoint": "{share:.0%} checkpointing; try async saves (--checkpoint.async_mode async), a larger "
                  "--checkpoint.interval, or memory-tier snapshots (--checkpoint.memory_interval)",
}


class GradReadyClock:
    """perf_counter time of the last gradient accumulated into a parameter since `reset()`."""

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        self.last: float | None = None
        self._handles = [p.register_post_accumulate_grad_hook(self._mark) for p in params if p.requires_grad]

    def _mark(self, _param: torch.Tensor) -> None:
        self.last = time.perf_counter()

    def reset(self) -> None:
        self.last = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass(frozen=True)
class Breakdown:
    """Seconds per part over `steps` optimizer steps; `wall` = their sum (idle is the rest)."""

    parts: dict[str, float]
    steps: int

    @property
    def wall(self) -> float:
        return sum(self.parts.values())

    def share(self, part: str) -> float:
        return self.parts[part] / self.wall if self.wall > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        out = {f"time_{p}_s": v for p, v in self.parts.items()}
        out["step_time_s"] = self.wall / max(self.steps, 1)
        return out


def classify(b: Breakdown) -> tuple[str, float]:
    """(bound, its share of the wall time): "compute" unless communication, data or checkpoints
    take more than compute does."""
    part = max(BOUNDS, key=lambda p: b.parts[p])
    return BOUNDS[part], b.share(part)


def critical_rank(per_rank: list[Breakdown]) -> int:
    """The rank the others wait for: the least exposed communication."""
    return min(range(len(per_rank)), key=lambda r: per_rank[r].parts["comm_exposed"])


def compute_advice(precision: str, bf16_native: bool, compiled: bool) -> str:
    """What to try when compute bounds the run, naming only what it does not use already: bf16
    where the hardware runs it natively and the run is in fp32, torch.compile when it is off."""
    tries = []
    if precision == "fp32" and bf16_native:
        tries.append("bf16 mixed precision (--train.mixed_precision bf16)")
    if not compiled:
        tries.append(COMPILE_HINT)
    if tries:
        return "{share:.0%} compute; try " + ", or ".join(tries)
    return "{share:.0%} compute, already " + precision + (" and compiled" if compiled else "") + \
        ": the matmuls themselves bound the step"


def summary_line(per_rank: list[Breakdown], compute: str | None = None) -> str:
    """ "communication-bound: 41% exposed comm; try int8 compression ..." for the critical rank,
    and which rank the others wait for when it is not everyone's story. `compute`: the advice
    when compute bounds the run (`compute_advice`; default: try torch.compile)."""
    crit = critical_rank(per_rank)
    bound, share = classify(per_rank[crit])
    advice = compute if bound == "compute" and compute is not None else ADVICE[bound]
    line = f"{bound}-bound: {advice.format(share=share)}"
    if len(per_rank) > 1:
        waits = [b.share("comm_exposed") for r, b in enumerate(per_rank) if r != crit]
        mine = per_rank[crit].share("comm_exposed")
        if max(waits) - mine > 0.2:  # the others wait on it, more than the network costs it
            line += (f" (rank {crit} is the slowest: {bound} {share:.0%} of its time, the other ranks wait "
                     f"{max(waits):.0%} in communication for it)")
    return line


def describe_limits(device: torch.device, fsdp: bool) -> str | None:
    if device.type == "cuda":
        return "breakdown on CUDA: the device is synchronised at phase boundaries; exposed communication is counted in compute"
    if fsdp:
        return "breakdown under FSDP2: its collectives are counted in compute (no per-gradient hooks on sharded parameters)"
    return None


class StepBreakdown:
    """Accumulates the parts of the current log window (and of the whole run) on this rank."""

    def __init__(self, device: torch.device, clock: GradReadyClock | None, enabled: bool = True) -> None:
        self.device = device
        self.enabled = enabled  # off: every context is a no-op (no clock reads, no CUDA syncs)
        self.clock = clock if device.type != "cuda" else None
        self.last_compute = 0.0  # compute seconds of the last forward_backward
        self.last_cpu = 0.0  # and this process's CPU seconds in it (collective waits sleep on gloo)
        self._window = dict.fromkeys(PARTS[:-1], 0.0)
        self._run = dict.fromkeys(PARTS, 0.0)
        self._run_steps = 0
        self._steps = 0
        self._in_hooks: list[tuple[float, float]] = []  # (start, end) of comm hook calls in this backward
        self._nested: list[float] = []  # per open phase, the time of the phases inside it so far
        self._t0 = self.now()

    def use_clock(self, clock: GradReadyClock | None) -> None:
        """Set once the model exists (the breakdown is made before it, to wrap its comm hook)."""
        self.clock = clock if self.device.type != "cuda" else None

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        """Begin the first window now (the training loop starts; setup is not a step's time)."""
        self._window = dict.fromkeys(PARTS[:-1], 0.0)
        self._steps, self._t0 = 0, self.now()

    @contextlib.contextmanager
    def phase(self, part: str) -> Iterator[None]:
        """Time the block as `part`. A phase inside another counts as its own part only: the
        outer one loses its time (an optimizer step's collective inside "compute"), so the parts
        still sum to the wall time."""
        if not self.enabled:
            yield
            return
        t = self.now()
        self._nested.append(0.0)
        try:
            yield
        finally:
            took = self.now() - t
            self._window[part] += took - self._nested.pop()
            if self._nested:
                self._nested[-1] += took

    @contextlib.contextmanager
    def forward_backward(self, sync: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: compute up to the last gradient, then
        communication (on the micro-batch that synchronises gradients)."""
        if not self.enabled:
            yield
            return
        if self.clock is not None:
            self.clock.reset()
        self._in_hooks = []
        t, cpu = self.now(), time.process_time()
        try:
            yield
        finally:
            end = self.now()
            self.last_cpu = time.process_time() - cpu
            ready = self.clock.last if self.clock is not None else None
            if sync and ready is not None and t <= ready <= end:
                # a comm hook that blocks (reduces inside the call) stalls backward before `ready`
                blocked = sum(max(0.0, min(e, ready) - s) for s, e in self._in_hooks)
                self.last_compute = ready - t - blocked
                self._window["comm_exposed"] += end - ready + blocked
            else:
                self.last_compute = end - t
            self._window["compute"] += self.last_compute

    def wrap_comm_hook(self, hook: Callable) -> Callable:
        """A DDP comm hook that runs `hook` and records how long the call blocked backward: work a
        hook does inside the call (a compressor encoding the bucket, a hook that reduces before it
        returns) stalls the autograd thread, which the end-of-backward wait alone would count as
        compute. Register the result in its place:
        `ddp.register_comm_hook(state, breakdown.wrap_comm_hook(hook))`."""
        def timed(state, bucket):  # noqa: ANN001, ANN202 - DDP checks the annotations (string ones fail)
            t = time.perf_counter()
            try:
                return hook(state, bucket)
            finally:
                if self.enabled:
                    self._in_hooks.append((t, time.perf_counter()))

        timed.__qualname__ = f"timed({getattr(hook, '__qualname__', 'hook')})"
        return timed

    def step_done(self) -> None:
        self._steps += 1

    def window(self) -> Breakdown:
        """This rank's window so far, idle = wall - the measured parts; starts a new window."""
        t = self.now()
        wall = t - self._t0
        parts = {**self._window, "idle": max(0.0, wall - sum(self._window.values()))}
        b = Breakdown(parts, self._steps)
        for p, v in parts.items():
            self._run[p] += v
        self._run_steps += self._steps
        self._window = dict.fromkeys(PARTS[:-1], 0.0)
        self._steps, self._t0 = 0, t
        return b

    def run_total(self) -> Breakdown:
        return Breakdown(dict(self._run), self._run_steps)


def gather(b: Breakdown, device: torch.device, world: int) -> list[Breakdown]:
    """Every rank's breakdown (a collective over the default group when world > 1)."""
    if world == 1:
        return [b]
    mine = torch.tensor([*(b.parts[p] for p in PARTS), float(b.steps)], dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    torch.distributed.all_gather(out, mine)
    return [Breakdown({p: float(v[i]) for i, p in enumerate(PARTS)}, int(v[-1])) for v in out]


def window_metrics(per_rank: list[Breakdown]) -> dict[str, float | int]:
    """The metrics row: parts averaged over ranks (each rank's sum to its wall time), the bound
    read on the critical rank, and that rank."""
    n = len(per_rank)
    mean = Breakdown({p: sum(b.parts[p] for b in per_rank) / n for p in PARTS}, per_rank[0].steps)
    crit = critical_rank(per_rank)
    bound, share = classify(per_rank[crit])
    return {**mean.metrics(), "bound": BOUND_CODES[bound], "bound_share": share, "critical_rank": crit}

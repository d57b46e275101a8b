"""Test-only fault injection, read from the environment variable LMFORGE_FAULTS (JSON).

Tests and chaos drills use it to make failures happen at chosen points of a real run, through
the real CLI and launcher, without special code paths in the training step:

    {"nan_steps": [3],            loss (and so the gradients) of these optimizer steps -> NaN
     "spike_steps": [7, 8, 9],    loss of these steps multiplied by "spike_factor" (default 10)
     "spike_positions": [40],     ... of every micro-batch holding these global loader positions
                                  (bad data: it spikes again whenever it is read)
     "kill": [[4, 1], [7, 0]],    SIGKILL rank r in the middle of step s (after backward, before
                                  the optimizer step), once: a marker file in "marker_dir"
                                  records that it happened, so the restarted run passes on
     "marker_dir": "/tmp/x",
     "delay_rank": 1, "delay_s": 0.05,   this rank burns CPU for delay_s each step (a straggler)
     "delay_per_sample_s": 0.02,  ... and this much per sample of each of its micro-batches (a slow
                                  device: its time grows with its share of the batch)
     "loader_delay_s": 0.05,      every rank's batches arrive this much late (a slow loader: sleeps)
     "comm_delay_s": 0.1,         every DDP gradient bucket's all-reduce completes this much later
                                  (a slow network: a sleep in the comm hook's completion callback,
                                  off the training thread, so it overlaps compute as a real link)
     "error": [3, 1]}             rank r raises InjectedFault at step s, where a kill would happen
                                  (a bug on one rank: the run must end with the error, not hang)

Steps count from 1 (the step being computed). Unset variable: every hook is a no-op.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

ENV = "LMFORGE_FAULTS"


class InjectedFault(RuntimeError):
    """The error the "error" hook raises."""


class FaultInjector:
    def __init__(self, spec: dict | None = None) -> None:
        spec = spec or {}
        self.nan_steps = {int(s) for s in spec.get("nan_steps", [])}
        self.spike_steps = {int(s) for s in spec.get("spike_steps", [])}
        self.spike_positions = {int(p) for p in spec.get("spike_positions", [])}
        self.spike_factor = float(spec.get("spike_factor", 10.0))
        self.kill = {(int(s), int(r)) for s, r in spec.get("kill", [])}
        self.marker_dir = Path(spec["marker_dir"]) if "marker_dir" in spec else None
        self.delay_rank = int(spec.get("delay_rank", -1))
        self.delay_s = float(spec.get("delay_s", 0.0))
        self.delay_per_sample_s = float(spec.get("delay_per_sample_s", 0.0))
        self.loader_delay_s = float(spec.get("loader_delay_s", 0.0))
        self.comm_delay_s = float(spec.get("comm_delay_s", 0.0))
        error = spec.get("error")
        self.error = (int(error[0]), int(error[1])) if error else None
        # Checked on every micro-batch: decided once.
        self.active = bool(self.nan_steps or self.spike_steps or self.spike_positions or self.kill
                           or self.delay_s > 0 or self.error is not None or self.delay_per_sample_s > 0
                           or self.loader_delay_s > 0 or self.comm_delay_s > 0)
        if self.kill and self.marker_dir is None:
            raise ValueError(f"{ENV}: 'kill' needs a 'marker_dir' (else a restarted run would be killed again)")

    @classmethod
    def from_env(cls) -> FaultInjector:
        raw = os.environ.get(ENV, "")
        return cls(json.loads(raw) if raw.strip() else None)


    def poison_loss(self, step: int, positions: Iterable[int], loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate at `step` for the micro-batch of these loader positions (NaN
        or scaled up when injected there)."""
        if step in self.nan_steps:
            return loss * float("nan")
        if step in self.spike_steps or not self.spike_positions.isdisjoint(int(p) for p in positions):
            return loss * self.spike_factor
        return loss

    def maybe_kill(self, step: int, rank: int) -> None:
        if self.error == (step, rank):
            raise InjectedFault(f"injected error at step {step} on rank {rank} ({ENV})")
        if (step, rank) not in self.kill or self.marker_dir is None:
            return
        marker = self.marker_dir / f"killed-step{step}-rank{rank}"
        if marker.exists():
            return
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        with open(marker, "w") as f:
            f.write(f"{time.time()}\n")
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def maybe_delay(self, rank: int, samples: int, first: bool) -> None:
        """Busy-wait (a slow device uses its time computing, not sleeping) before a micro-batch's
        forward: delay_per_sample_s x its samples, plus delay_s on the step's first micro-batch."""
        seconds = self.delay_per_sample_s * samples + (self.delay_s if first else 0.0)
        if rank != self.delay_rank or seconds <= 0:
            return
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    def maybe_slow_loader(self) -> None:
        if self.loader_delay_s > 0:
            time.sleep(self.loader_delay_s)

    def maybe_slow_network(self, model: torch.nn.Module, wrap: Callable[[Callable], Callable]) -> None:
        """With comm_delay_s: register a DDP comm hook (torch's plain all-reduce) whose result
        arrives comm_delay_s late. Only on a DDP module; a test-only injection, so it refuses to
        replace a hook someone else registered."""
        if self.comm_delay_s <= 0:
            return
        if not hasattr(model, "register_comm_hook"):
            raise ValueError(f"{ENV}: 'comm_delay_s' needs DDP (parallel.dp_replicate > 1, dp_shard 1)")
        if getattr(model, "_comm_hooks", None):
            raise ValueError(f"{ENV}: 'comm_delay_s' cannot join the DDP comm hook already registered")
        model.register_comm_hook((model.process_group, self.comm_delay_s), wrap(_slow_allreduce_hook))


def _slow_allreduce_hook(state, bucket):  # noqa: ANN001, ANN201 - DDP checks the annotations (string ones fail)
    """torch's all-reduce hook, completing `delay_s` later (on gloo's thread, as a slow link would).
    state: (process group, delay_s); bucket: dist.GradBucket; returns a Future of the bucket."""
    group, delay_s = state
    fut = default_hooks.allreduce_hook(group, bucket)

    def late(f: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        time.sleep(delay_s)
        return f.value()

    return fut.then(late)

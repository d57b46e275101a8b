"""Straggler detection: every rank's busy time per step, compared at log steps.

Collectives make every rank wait for the slowest, so wall-clock step times come out equal on all
ranks and cannot single out a slow one. What differs is the time a rank spends *working*: here
the process CPU time (waiting inside gloo collectives sleeps and is not counted; measured in
docs/benchmarks.md). At each log step the ranks all-gather one float (mean busy seconds per step
since the last log step); the slowest rank is reported when it is above `factor` x the median of
the *other* ranks (with the median of all, a rank could never exceed 2x in a world of two).

Limits: a rank slowed by sleeping (I/O stalls, preemption) is not seen by CPU time; on CUDA the
CPU time is host-side launch work only (device time would need CUDA events): there the report
covers host stalls, not slow GPUs.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("lmforge.train")

# A slowest rank less than this much busier than the median is scheduling noise, whatever the ratio
# (a 15 ms debug step varies by several ms on a shared CPU).
NOISE_FLOOR_S = 0.005


@dataclass(frozen=True)
class StragglerReport:
    times: list[float]  # busy seconds per step, by global rank
    median: float  # of the ranks other than the slowest
    max_over_median: float
    straggler_rank: int  # -1 when no rank exceeds the factor

    def metrics(self) -> dict[str, float | int]:
        return {"rank_busy_s_median": self.median, "rank_busy_s_max": max(self.times),
                "step_time_max_over_median": self.max_over_median, "straggler_rank": self.straggler_rank}


def find_straggler(times: list[float], factor: float) -> StragglerReport:
    """The slowest rank, reported when its time exceeds `factor` x the median of the other ranks
    (and that median by at least NOISE_FLOOR_S)."""
    slowest = max(range(len(times)), key=lambda r: times[r])
    others = [t for r, t in enumerate(times) if r != slowest] or [times[slowest]]
    median = statistics.median(others)
    ratio = times[slowest] / median if median > 0 else 1.0
    slow = ratio > factor and times[slowest] - median >= NOISE_FLOOR_S
    return StragglerReport(list(times), median, ratio, slowest if slow else -1)


class StragglerMonitor:
    """`start_step()` / `end_step()` around each optimizer step; `report()` at log steps
    (collective over the default group: every rank must call it)."""

    def __init__(self, factor: float, device: torch.device) -> None:
        self.factor = factor
        self.device = device
        self._busy = 0.0
        self._steps = 0
        self._t0 = 0.0

    def start_step(self) -> None:
        self._t0 = time.process_time()

    def end_step(self) -> None:
        self._busy += time.process_time() - self._t0
        self._steps += 1

    def report(self) -> StragglerReport | None:
        if self._steps == 0:
            return None
        mine = torch.tensor([self._busy / self._steps], dtype=torch.float64, device=self.device)
        self._busy, self._steps = 0.0, 0
        world = dist.get_world_size()
        out = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(out, mine)
        return find_straggler([float(t) for t in out], self.factor)

    def report_metrics(self, step: int, say: Callable[[str], None], is_main: bool) -> dict[str, float | int]:
        """`report()` as metrics; the straggler named in the log and by `say` (rank 0)."""
        report = self.report()
        if report is None:
            return {}
        if report.straggler_rank >= 0 and is_main:
            times = ", ".join(f"{t * 1e3:.1f}" for t in report.times)
            msg = (f"step {step}: straggler rank {report.straggler_rank}: busy {report.max_over_median:.2f}x the "
                   f"median of the other ranks per step (ms by rank: {times})")
            log.warning(msg)
            say(msg)
        return report.metrics()

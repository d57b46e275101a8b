"""Load balancing across uneven data-parallel ranks (comm.load_balance).

Every `comm.load_balance_interval` optimizer steps the ranks all-gather their busy seconds per
sample since the last re-split (DDP: forward and backward up to the last gradient; FSDP2, whose
parameter all-gathers inside forward and backward make a fast rank wait for a slow one there: the
process CPU time of forward and backward, as gloo's waits sleep; waiting on data or on the other
ranks is left out either way, so a fast rank does not look slow for waiting on a slow one) and
split each global micro-batch of `micro_batch_size x dp` samples in proportion to their speeds
(`balanced_split`: the smallest slowest-rank time; every rank keeps >= 1 sample, so every rank runs the same forwards and
backwards and DDP's / FSDP2's collectives line up). The loader serves the split
(`DistributedTokenLoader.set_split`): the samples of each global batch are the same as with the
equal split, only who computes which changes, and the split is in the loader's resumable state.

The loss is weighted by tokens: rank r's mean loss over its n_r samples is multiplied by
n_r x dp / N (N = sum of n_r); DDP and FSDP2 average gradients over the dp ranks, so the update is
the gradient of the mean over all N samples, as with equal shares (where the weight is 1). All
samples have seq_len targets (packed windows, nothing masked), so samples and tokens are in
proportion.

A new split is taken only when it is predicted to cut the step (the slowest rank's samples x its
seconds per sample) by more than `MIN_GAIN`: noise on a shared machine does not move samples
back and forth.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lmforge.data.loader import DistributedTokenLoader

MIN_GAIN = 0.05  # predicted step-time cut below which the split stays


def balanced_split(seconds_per_sample: list[float], total: int) -> list[int]:
    """Samples per rank, each >= 1, summing to `total`, that make the slowest rank's time
    (samples x seconds per sample) as small as it can be: one sample each, then every further
    sample to the rank that would finish it first (ties to the lower rank). This greedy order is
    optimal for that maximum; the result is about proportional to speed."""
    n = len(seconds_per_sample)
    if total < n:
        raise ValueError(f"cannot give {n} ranks >= 1 sample each out of {total}")
    counts = [1] * n
    for _ in range(total - n):
        r = min(range(n), key=lambda i: ((counts[i] + 1) * seconds_per_sample[i], i))
        counts[r] += 1
    return counts


def predicted_step(counts: list[int], seconds_per_sample: list[float]) -> float:
    """The slowest rank's compute per micro-batch under this split."""
    return max(c * t for c, t in zip(counts, seconds_per_sample))


class LoadBalancer:
    """`add(seconds, samples)` per micro-batch; `weight()` for the loss; `maybe_resplit(step)`
    after each optimizer step (a collective over the dp group at every interval)."""

    def __init__(self, loader: DistributedTokenLoader, interval: int, group: dist.ProcessGroup | None,
                 device: torch.device) -> None:
        self.loader = loader
        self.interval = interval
        self.group = group
        self.device = device
        self._seconds = 0.0
        self._samples = 0
        self.last_seconds_per_sample: list[float] = []

    def add(self, seconds: float, samples: int) -> None:
        self._seconds += seconds
        self._samples += samples

    def weight(self) -> float:
        """Loss weight of this rank's micro-batch: its share of the global micro-batch x dp."""
        return self.loader.local_batch_size * self.loader.dp_world / self.loader.global_batch_size

    def maybe_resplit(self, step: int) -> str | None:
        """Every `interval` steps: re-split from the gathered seconds per sample; a line saying so
        when the split changed (the same on every rank), else None."""
        if step % self.interval != 0 or self.group is None:
            return None
        mine = torch.tensor([self._seconds, float(self._samples)], dtype=torch.float64, device=self.device)
        self._seconds, self._samples = 0.0, 0
        out = [torch.empty_like(mine) for _ in range(self.loader.dp_world)]
        dist.all_gather(out, mine, group=self.group)
        per_sample = [float(v[0]) / max(float(v[1]), 1.0) for v in out]
        self.last_seconds_per_sample = per_sample
        current = list(self.loader.split or [self.loader.micro_batch_size] * self.loader.dp_world)
        new = balanced_split(per_sample, self.loader.global_batch_size)
        if new == current or predicted_step(new, per_sample) > (1 - MIN_GAIN) * predicted_step(current, per_sample):
            return None
        self.loader.set_split(new)
        ms = ", ".join(f"{t * 1e3:.1f}" for t in per_sample)
        return (f"step {step}: load balance: samples per rank per micro-batch {current} -> {new} (busy ms per "
                f"sample by rank: {ms})")

    def metrics(self) -> dict[str, float]:
        split = self.loader.split or [self.loader.micro_batch_size] * self.loader.dp_world
        return {"lb_min_share": min(split) / self.loader.global_batch_size,
                "lb_max_share": max(split) / self.loader.global_batch_size}

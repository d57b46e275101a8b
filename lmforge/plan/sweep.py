"""The planner core at many world sizes: the fastest layout a pruned search finds at each size and
the step time the core predicts for it, so the scaling and cost tables use the time model that
ranks layouts in `lmforge plan` (timing.py through predict.py), not a stand-in.

Why pruned: `search.search` predicts every layout `JobConfig.validate` accepts, thousands at a few
hundred devices (seconds per size for an 8B model); a table of 12 sizes has to answer in seconds.
The pruned space keeps what decides speed at scale and leaves out what the time model never
prefers or what only trades memory:

- tp: divisors of devices_per_node (TP's collectives are on the critical path in every block;
  across nodes they would run at the NIC's bandwidth);
- pp: divisors of world / tp up to the layer count, schedules 1f1b (least memory) and zbv (least
  bubble; interleaved_1f1b only where zbv does not validate): gpipe has 1f1b's bubble with more
  micro-batches in flight, interleaved_1f1b zbv's stages with three times its bubble;
- data parallel: FSDP over all data-parallel ranks, HSDP sharded over one node's ranks, DDP (tp =
  pp = 1 only); ep (MoE): 1, the largest degree inside a node and the largest overall;
- micro-batch and recompute: for each recompute level (none, selective, full) only the largest
  micro-batch that fits with it (memory grows with the micro-batch: a binary search), starting
  from the largest valid one of the `MAX_MICRO` largest; in the model a smaller micro-batch only
  adds operator launches, FSDP gathers and smaller matmuls, and more recompute only adds time.

Within that space the search is exact and best-first (`best_at`): lower bounds of step time order
the work, and it stops when no bound left beats the best layout that fits.
tests/unit/test_plan_sweep.py holds its answer to the full search's where that one is affordable.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from lmforge.config import JobConfig
from lmforge.config.checks import require
from lmforge.observability.flops import training_flops_per_token
from lmforge.plan.cluster import Cluster
from lmforge.plan.params import total_params
from lmforge.plan.predict import peak_memory, precision_for, predict
from lmforge.plan.search import RECOMPUTE, Candidate, make_layout
from lmforge.plan.timing import bubble_fraction, predict_step_time

__all__ = ["SizeResult", "best_at", "sweep", "weak_batch", "MAX_MICRO"]

MAX_MICRO = 4  # the largest micro-batch sizes tried for a structure's fastest form
STATE_BYTES_PER_PARAM = 16  # fp32 weights and gradients, AdamW's two moments: what memory.py counts at least


@dataclass(frozen=True)
class SizeResult:
    """The best layout at one world size (None: no layout is valid or fits; `why` says which)."""

    world_size: int
    global_batch: int  # sequences per step at this size
    best: Candidate | None
    predicted: int  # layouts timed or predicted (what the pruning left)
    why: str = ""

    @property
    def step_s(self) -> float:
        return self.best.prediction.step_time.total if self.best else math.inf


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _dp_splits(dp: int, tp: int, pp: int, per_node: int) -> list[tuple[int, int]]:
    """(dp_replicate, dp_shard): FSDP over all, HSDP sharded inside a node, DDP without tp / pp."""
    out = [(1, dp)]
    node_share = math.gcd(dp, max(1, per_node // tp))
    if 1 < node_share < dp:
        out.append((dp // node_share, node_share))
    if tp == pp == 1 and dp > 1:
        out.append((dp, 1))
    return out


def _ep_degrees(job: JobConfig, shard: int, in_node: int) -> list[int]:
    experts = job.model.moe.n_experts
    if not experts:
        return [1]
    ok = [d for d in _divisors(shard) if experts % d == 0]
    return sorted({1, max(ok), max(d for d in ok if d <= max(1, in_node))})


def _stages_per_rank(base: JobConfig, schedule: str) -> int:
    return replace(base.parallel, pp=2, pp_schedule=schedule, pp_stages_per_rank=0).stages_per_rank


def _fits(job: JobConfig, cluster: Cluster, world_size: int) -> bool:
    mem = peak_memory(job, world_size, precision_for(job, cluster), cluster.shared_host_memory)
    return mem.total <= cluster.accelerator.memory_bytes


class _Structure:
    """One (tp, pp, dp_replicate, dp_shard, ep, schedule) and its micro-batch sizes, largest first;
    layouts built (and validated) and their memory checked on demand, each once."""

    def __init__(self, base: JobConfig, cluster: Cluster, world_size: int, degrees: tuple[int, int, int, int, int],
                 schedule: str):
        self.base, self.cluster, self.world_size, self.degrees, self.schedule = (base, cluster, world_size, degrees,
                                                                                 schedule)
        tp, pp, rep, shard, ep = degrees
        self.micros = sorted(_divisors(base.train.global_batch_size // (rep * shard)), reverse=True)
        self._jobs: dict[tuple[int, str], JobConfig | None] = {}
        self._fits: dict[tuple[int, str], bool] = {}

    def job(self, micro: int, ac: str) -> JobConfig | None:
        """The layout at this micro-batch and recompute, None where it does not validate. Recompute
        is set on the validated layout without recompute: no rule of JobConfig.validate reads it
        beyond its own value, and validating costs more than predicting memory."""
        key = (micro, ac)
        if key not in self._jobs:
            if ac == "none":
                self._jobs[key] = make_layout(self.base, self.world_size, *self.degrees, micro, self.schedule, ac)
            else:
                plain = self.job(micro, "none")
                self._jobs[key] = plain and replace(plain, train=replace(plain.train, activation_checkpointing=ac))
        return self._jobs[key]

    def fits(self, micro: int, ac: str) -> bool:
        """Valid and within the device memory."""
        key = (micro, ac)
        if key not in self._fits:
            job = self.job(micro, ac)
            self._fits[key] = job is not None and _fits(job, self.cluster, self.world_size)
        return self._fits[key]

    def fastest(self) -> JobConfig | None:
        """The largest valid micro-batch without recompute: the fastest this structure can be."""
        return next((j for mb in self.micros[:MAX_MICRO] if (j := self.job(mb, "none")) is not None), None)

    def can_fit(self) -> bool:
        """Whether its least memory (the smallest valid micro-batch, full recompute) fits."""
        small = next((mb for mb in reversed(self.micros) if self.job(mb, "none") is not None), None)
        return small is not None and self.fits(small, "full")

    def largest_fitting(self, ac: str, largest: int) -> JobConfig | None:
        """The largest micro-batch up to `largest` that fits with recompute `ac`: memory grows with
        the micro-batch, so the smallest valid one is checked first (nothing fits when it does
        not), then a binary search."""
        micros = [m for m in self.micros if m <= largest and self.job(m, ac) is not None]
        if not micros or not self.fits(micros[-1], ac):
            return None
        lo, hi = 0, len(micros) - 1  # micros[hi] fits
        while lo < hi:
            mid = (lo + hi) // 2
            if self.fits(micros[mid], ac):
                hi = mid
            else:
                lo = mid + 1
        return self.job(micros[lo], ac)


def best_at(base: JobConfig, cluster: Cluster, world_size: int) -> SizeResult:
    """The fastest layout of `base` (its global batch, sequence length and model) that validates and
    fits on `world_size` devices of `cluster`, over the pruned space of the module docstring.

    Best first, over a queue keyed by lower bounds of step time: a structure enters at all FLOPs at
    the efficiency curve's maximum spread evenly over the devices, times one plus the least
    pipeline bubble it can have; popped, it goes back in at the time of its fastest form (largest
    micro-batch, no recompute); popped again, that form is predicted if it fits, else (where its
    least memory fits) each recompute level goes in, and when popped back in at the time of the
    largest micro-batch with that recompute (a smaller micro-batch is only slower in the model);
    popped again, the level's largest fitting micro-batch is predicted. Once the best that fits is
    faster than the head of the queue, nothing left can beat it. Structures whose parameters,
    gradients and AdamW state alone (16 bytes per parameter over tp x pp x dp_shard, a floor)
    exceed the device memory never enter."""
    require(world_size >= 1, "world size", world_size, "must be >= 1")
    m, gbs, seq = base.model, base.train.global_batch_size, base.train.seq_len
    precision, on_cpu = precision_for(base, cluster), cluster.shared_host_memory
    peak = cluster.accelerator.peak_flops(precision)
    ideal = training_flops_per_token(m, seq) * gbs * seq / (world_size * peak * cluster.efficiency.max)
    params = total_params(m)
    queue: list[tuple[float, int, int, tuple]] = []  # (time bound, tp x pp, order, what to do next)
    order = too_big = 0

    def push(bound: float, simple: int, item: tuple) -> None:
        nonlocal order
        order += 1
        heapq.heappush(queue, (bound, simple, order, item))

    for tp in _divisors(math.gcd(world_size, cluster.devices_per_node)):
        for pp in (p for p in _divisors(world_size // tp) if p <= m.n_layers):
            dp = world_size // (tp * pp)
            if dp > gbs or gbs % dp:
                continue  # some data-parallel rank would get no whole sequence
            for rep, shard in _dp_splits(dp, tp, pp, cluster.devices_per_node):
                if STATE_BYTES_PER_PARAM * params / (tp * pp * shard) > cluster.accelerator.memory_bytes:
                    too_big += 1
                    continue
                for ep in _ep_degrees(base, shard, cluster.devices_per_node // tp):
                    for group in ([("1f1b",)] if pp == 1 else [("1f1b",), ("zbv", "interleaved_1f1b")]):
                        spr = _stages_per_rank(base, group[0]) if pp > 1 else 1
                        r = replace(base.parallel, pp=pp, pp_schedule=group[0], pp_stages_per_rank=spr)
                        bound = ideal * (1 + bubble_fraction(r, pp * spr))
                        push(bound, tp * pp, ("new", (tp, pp, rep, shard, ep), group))

    def time_of(job: JobConfig) -> float:
        return predict_step_time(job, cluster, world_size, precision, on_cpu).total

    best: Candidate | None = None
    predicted = valid = 0
    while queue:
        bound, simple, _, item = heapq.heappop(queue)
        if best is not None and bound >= best.prediction.step_time.total:
            break  # every bound left is at least this: nothing can beat the best
        kind, job = item[0], None
        if kind == "new":  # the first schedule of the group that validates, timed in its fastest form
            for schedule in item[2]:
                st = _Structure(base, cluster, world_size, item[1], schedule)
                top = st.fastest()
                if top is not None:
                    valid += 1
                    push(time_of(top), simple, ("top", st, top))
                    break
        elif kind == "top":
            st, top = item[1], item[2]
            mb = top.train.micro_batch_size
            if st.fits(mb, "none"):
                job = top
            elif not st.can_fit():
                too_big += 1  # not even its least memory fits
            else:
                for ac in RECOMPUTE:  # timed when popped: most never are
                    push(bound, simple, ("level", st, ac, mb, ac == "none"))
        elif not item[4]:  # a recompute level: timed at the largest micro-batch, back in at that time
            st, ac, mb = item[1], item[2], item[3]
            push(time_of(st.job(mb, ac)), simple, ("level", st, ac, mb, True))
        else:  # the largest micro-batch that fits with this recompute
            job = item[1].largest_fitting(item[2], item[3])
        if job is not None:
            p = predict(job, cluster, world_size)
            predicted += 1
            if p.fits and (best is None or p.step_time.total < best.prediction.step_time.total):
                best = Candidate(job, p)
    why = ""
    if best is None:
        mem = cluster.accelerator.memory_bytes / 2**30
        why = (f"no layout fits {mem:.0f} GiB per device" if valid or too_big else
               f"no valid layout: {gbs} sequences per step are too few for {world_size:,} devices (each "
               f"data-parallel replica needs a whole sequence, a pipeline of pp stages at least pp; "
               f"tp <= {cluster.devices_per_node}, pp <= {m.n_layers} layers)")
    return SizeResult(world_size, gbs, best, valid + predicted, why)


def weak_batch(global_batch: int, world_size: int, reference: int) -> int:
    """Weak scaling's global batch at `world_size`: the per-device share of `global_batch` at
    `reference` devices kept (sequences are whole: it must come out even)."""
    require(global_batch * world_size % reference == 0, "global batch", global_batch,
            f"x {world_size} / {reference} devices must be a whole number of sequences for weak scaling")
    return global_batch * world_size // reference


def sweep(base: JobConfig, cluster: Cluster, sizes: Sequence[int],
          batch: Callable[[int], int] | None = None) -> list[SizeResult]:
    """`best_at` for every size; `batch(n)`: the global batch at n devices (None: the base's at
    every size, strong scaling)."""
    out = []
    for n in sizes:
        job = base if batch is None else replace(base, train=replace(base.train, global_batch_size=batch(n)))
        out.append(best_at(job, cluster, n))
    return out

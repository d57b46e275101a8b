"""A planned job on a fleet: the cluster file's `[failures]` and `[price]` tables and the
accelerator's power applied to one model at many sizes. Checkpoint intervals per size (Young,
Daly, the simulated optimum), the cost options for a number of tokens and a deadline, and the
pre-flight energy. The step times come in from outside (sweep.py: the core's time model), so this
module only combines failures.py, cost.py and observability/energy.py.

Why a checkpoint costs what it does here: lmforge's checkpoint holds the fp32 weights and AdamW's
two fp32 moments (12 bytes per parameter), written and read at the storage bandwidth the cluster
file states (`[failures] storage_gbps`, the whole job's), so the save and restore times follow
from the model, not from a guess per table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmforge.config import JobConfig
from lmforge.config.checks import require
from lmforge.observability.energy import EnergyEstimate, preflight_estimate
from lmforge.plan.cluster import Cluster
from lmforge.plan.cost import CostEstimate, cheapest
from lmforge.plan.failures import (
    CheckpointTier,
    FailureModel,
    best_interval,
    daly_goodput,
    daly_interval,
    young_interval,
)
from lmforge.plan.params import total_params

__all__ = ["CHECKPOINT_BYTES_PER_PARAM", "SIM_MTBFS", "SIM_RUNS", "IntervalRow", "checkpoint_bytes",
           "checkpoint_tier", "failure_model", "intervals", "cost_options", "energy_preflight"]

CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights + AdamW's exp_avg and exp_avg_sq (fp32)
# The simulated optimum is searched over runs of this many job MTBFs of training: long enough for
# the steady state the closed forms describe (about that many failures per run), short enough
# that 12 sizes take a fraction of a second (the simulation costs O(failures) per run).
SIM_MTBFS = 100
SIM_RUNS = 8


def checkpoint_bytes(job: JobConfig) -> int:
    return CHECKPOINT_BYTES_PER_PARAM * total_params(job.model)


def checkpoint_tier(job: JobConfig, cluster: Cluster) -> CheckpointTier:
    """The durable checkpoint of `job` on `cluster`'s storage (write stall = read = bytes / bandwidth)."""
    s = checkpoint_bytes(job) / cluster.failures.storage_bytes_per_s
    return CheckpointTier("storage", write_s=s, restore_s=s, survives_node_loss=True)


def failure_model(cluster: Cluster, devices: int) -> FailureModel:
    f = cluster.failures
    return FailureModel(devices=devices, device_mtbf_h=f.device_mtbf_h, devices_per_node=cluster.devices_per_node,
                        node_mtbf_h=f.node_mtbf_h, restart_s=f.restart_s)


@dataclass(frozen=True)
class IntervalRow:
    """The checkpoint interval at one size: closed forms for the disk tier and the simulated optimum
    (seconds of training between saves; inf where nothing fails)."""

    devices: int
    job_mtbf_h: float
    young_s: float
    daly_s: float
    daly_goodput: float  # at Daly's interval, Daly's closed form
    sim_best_s: float
    sim_best_goodput: float


def intervals(job: JobConfig, cluster: Cluster, sizes: Sequence[int], runs: int = SIM_RUNS,
              seed: int = 0) -> list[IntervalRow]:
    """One row per size; the simulation uses the same seed at every size (common random numbers)."""
    disk = checkpoint_tier(job, cluster)
    out = []
    for n in sizes:
        fm = failure_model(cluster, n)
        m = fm.job_mtbf_s
        daly = daly_interval(disk.write_s, m)
        if math.isinf(m):
            out.append(IntervalRow(n, math.inf, math.inf, math.inf, 1.0, math.inf, 1.0))
            continue
        sim = best_interval(fm, SIM_MTBFS * m, disk, runs=runs, seed=seed)
        out.append(IntervalRow(n, m / 3600.0, young_interval(disk.write_s, m), daly,
                               daly_goodput(daly, disk.write_s, fm.restart_s + disk.restore_s, m),
                               sim.interval_s, sim.goodput))
    return out


def cost_options(job: JobConfig, cluster: Cluster, total_tokens: float, deadline_h: float,
                 tokens_per_s: Callable[[int], float],
                 sizes: Sequence[int]) -> tuple[CostEstimate | None, list[CostEstimate]]:
    """cost.cheapest over `sizes` with the cluster's prices and failure rates: every (size,
    on-demand / reserved base, spot share of the nodes) option, cheapest first, and the cheapest
    that meets the deadline (None: none does). Spot preemptions are interruptions of the whole job,
    each paying a restart, a restore and the work since the last checkpoint (at Daly's interval)."""
    require(cluster.price is not None, "cluster price", None, "the cluster file needs a [price] table")
    assert cluster.price is not None
    return cheapest(total_tokens, deadline_h, tokens_per_s, sizes, cluster.price, failure_model(cluster, sizes[0]),
                    checkpoint_tier(job, cluster))


def energy_preflight(job: JobConfig, cluster: Cluster, step_s: float, devices: int) -> EnergyEstimate:
    """The run's energy before it starts: `train.steps` x the predicted step time x devices x power
    (the recipe's energy.watts_per_device, else the cluster file's accelerator power_w, a board
    power: an upper figure for a device that is not always busy), and its carbon at the recipe's
    energy.carbon_g_per_kwh."""
    watts = job.energy.watts_per_device or cluster.accelerator.power_w
    return preflight_estimate(step_s, job.train.steps, watts, devices, job.energy.carbon_g_per_kwh)

"""`predict(job, cluster, world_size)`: the memory and time models together for one layout, the
function the search, `lmforge plan` and the at-scale models (simulation, cost, energy) call."""

from __future__ import annotations

from lmforge.config import JobConfig
from lmforge.plan.cluster import Cluster
from lmforge.plan.memory import predict_memory
from lmforge.plan.prediction import MemoryBreakdown, Prediction
from lmforge.plan.timing import predict_step_time

# The layout keys a prediction depends on (and the search varies).
LAYOUT_KEYS = ("tp", "pp", "dp_replicate", "dp_shard", "ep", "pp_schedule", "pp_microbatches")

OVERLAP_NOTE = ("TP/SP and pipeline transfers are on the critical path; FSDP, DP and EP communication hides "
                "behind compute up to the cluster's comm_overlap")


def precision_for(job: JobConfig, cluster: Cluster) -> str:
    """The precision training would use: the config's, or for "auto" bf16 where the accelerator
    has a faster bf16 peak than fp32 (GPUs; CPUs with AMX / AVX512-BF16) and fp32 elsewhere."""
    mp = job.train.mixed_precision
    if mp != "auto":
        return mp
    acc = cluster.accelerator
    return "bf16" if acc.peak_bf16_flops > acc.peak_fp32_flops else "fp32"


def peak_memory(job: JobConfig, world_size: int, precision: str, on_cpu: bool) -> MemoryBreakdown:
    """The pipeline rank with the largest total (every rank is the same without pp)."""
    r = job.parallel.resolved(world_size)
    options = [predict_memory(job, world_size, precision, on_cpu, pp_rank=p) for p in range(max(r.pp, 1))]
    return max(options, key=lambda mb: mb.total)


def predict(job: JobConfig, cluster: Cluster, world_size: int) -> Prediction:
    """Memory (per rank, the fullest one) and step time (the slowest rank) of `job` on `world_size`
    ranks of `cluster`. `job` must validate at `world_size` (JobConfig.validate)."""
    precision = precision_for(job, cluster)
    on_cpu = cluster.shared_host_memory
    r = job.parallel.resolved(world_size)
    layout = {k: getattr(r, k) for k in LAYOUT_KEYS}
    layout |= {"micro_batch_size": job.train.micro_batch_size,
               "activation_checkpointing": job.train.activation_checkpointing}
    notes = [OVERLAP_NOTE, f"precision {precision}"]
    if r.pp > 1:
        notes.append("pipeline stages predicted with the 'even' layer split")
    return Prediction(layout=layout, world_size=world_size,
                      memory=peak_memory(job, world_size, precision, on_cpu),
                      step_time=predict_step_time(job, cluster, world_size, precision, on_cpu),
                      tokens_per_step=job.train.global_batch_size * job.train.seq_len,
                      device_memory_bytes=cluster.accelerator.memory_bytes, notes=tuple(notes))

"""Layout search: every (tp, pp, dp_replicate, dp_shard, ep, micro-batch, recompute, schedule)
that `JobConfig.validate(world_size)` accepts (the validity oracle: no rule is repeated here),
predicted, those that do not fit the device memory dropped, the rest ranked by predicted
tokens/s."""

from __future__ import annotations

from dataclasses import dataclass, replace

from lmforge.config import ConfigError, JobConfig
from lmforge.plan.cluster import Cluster
from lmforge.plan.predict import predict
from lmforge.plan.prediction import Prediction

SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", "zbv")
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Candidate:
    job: JobConfig
    prediction: Prediction


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_layout(base: JobConfig, world_size: int, tp: int, pp: int, rep: int, shard: int, ep: int, micro: int,
                schedule: str, ac: str) -> JobConfig | None:
    """`base` with these degrees, micro-batch, schedule and recompute (pipeline micro-batches: one per
    stage where the micro-batch splits so, else one per rank; embeddings untied under pp), or None
    where `JobConfig.validate(world_size)` refuses it."""
    par = replace(base.parallel, tp=tp, pp=pp, dp_replicate=rep, dp_shard=shard, ep=ep,
                  pp_schedule=schedule, pp_microbatches=0, pp_stages_per_rank=0,
                  pp_layers_per_stage=None, cpu_offload=False,
                  fsdp_reshard_after_forward="default",
                  fsdp_param_dtype=base.parallel.fsdp_param_dtype if shard > 1 else "fp32")
    job = replace(base, parallel=par, train=replace(base.train, micro_batch_size=micro,
                                                    activation_checkpointing=ac))
    if pp > 1:
        stages = pp * par.stages_per_rank
        if micro % stages and micro % pp:
            return None
        par.pp_microbatches = stages if micro % stages == 0 else pp
        if job.model.tie_embeddings:
            job = replace(job, model=replace(job.model, tie_embeddings=False))
    try:
        job.validate(world_size)
    except ConfigError:
        return None
    return job


def layouts(base: JobConfig, world_size: int) -> list[JobConfig]:
    """Every layout of `base` on `world_size` ranks that validates (global batch, sequence length
    and model kept; degrees, micro-batch, schedule and recompute varied)."""
    out = []
    moe = base.model.moe.n_experts > 0
    for tp in _divisors(world_size):
        for pp in _divisors(world_size // tp):
            rest = world_size // (tp * pp)
            for rep in _divisors(rest):
                shard = rest // rep
                for ep in (_divisors(shard) if moe else [1]):
                    dp = rep * shard
                    for micro in _divisors(max(base.train.global_batch_size // dp, 1)):
                        for schedule in (SCHEDULES if pp > 1 else ("1f1b",)):
                            for ac in RECOMPUTE:
                                job = make_layout(base, world_size, tp, pp, rep, shard, ep, micro, schedule, ac)
                                if job is not None:
                                    out.append(job)
    return out


def search(base: JobConfig, cluster: Cluster, world_size: int | None = None) -> tuple[list[Candidate], int]:
    """(fitting candidates ranked by predicted tokens/s, best first; how many valid layouts did not
    fit). Ties keep the simpler layout (fewer non-data-parallel degrees, no recompute) first."""
    ws = world_size or cluster.world_size
    fits, dropped = [], 0
    for job in layouts(base, ws):
        p = predict(job, cluster, ws)
        if p.fits:
            fits.append(Candidate(job, p))
        else:
            dropped += 1
    fits.sort(key=lambda c: (-c.prediction.tokens_per_s, c.job.parallel.tp * c.job.parallel.pp,
                             RECOMPUTE.index(c.job.train.activation_checkpointing)))
    return fits, dropped

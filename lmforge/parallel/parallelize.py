"""Parallelism composed in one place: a plain model in, the model as this rank trains it out.

Order (docs/architecture.md): pipeline split -> tensor parallel -> expert parallel -> activation
checkpointing -> torch.compile -> FSDP2 (experts, then blocks and root) or DDP. Each step changes
modules in place and expects the ones before it: TP shards whole modules, so it comes first; EP
wraps the experts TP left alone; checkpointing and compile wrap the sharded blocks; FSDP2 shards
what the others produced (DTensors included).

What a model family provides (nothing here names its modules or parameters):
- `layers`: a ModuleDict of blocks keyed by global index (the units of pipeline split,
  checkpointing, compile and FSDP2);
- `tp_plan(sequence_parallel, loss_parallel)`: its tensor-parallel plan (lmforge.parallel.tp);
- `first_stage_modules` / `last_stage_modules`: what only the first / last pipeline stage keeps;
- `init_weights(device)`: (re)initialise every parameter, after `to_empty`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from lmforge.config import JobConfig
from lmforge.parallel.ac import apply_activation_checkpointing
from lmforge.parallel.comm import CommHookState
from lmforge.parallel.compile import apply_compile
from lmforge.parallel.ddp import apply_ddp
from lmforge.parallel.ep import apply_ep, apply_expert_fsdp
from lmforge.parallel.fsdp import FSDPPolicy, apply_fsdp
from lmforge.parallel.mesh import ParallelDegrees, ParallelMesh
from lmforge.parallel.pp import (
    PipelineParts,
    build_schedule,
    materialise_part,
    parts_module,
    plan_pipeline,
    split_model,
)
from lmforge.parallel.tp import apply_tp, tp_cross_entropy
from lmforge.tensors.dtypes import DTYPES

# Models up to this size are initialised whole before sharding under train.init = "auto".
FULL_INIT_MAX_BYTES = 2 * 2**30


@dataclass
class ParallelModel:
    """What `parallelize` returns. `module` is what trains and is checkpointed: the model, its
    DDP wrapper, or under pipelining a view of this rank's stages under the model's own parameter
    names; `pipe` (pipelining only) holds the stages and the schedule that runs them."""

    module: nn.Module
    pipe: PipelineParts | None = None
    comm: CommHookState | None = None  # the DDP gradient compression hook's state (comm.compression)


def init_before_sharding(model: nn.Module, degrees: ParallelDegrees, device: torch.device, mode: str) -> bool:
    """Initialise the whole model before sharding? `mode` is train.init: "full", "sharded" or
    "auto" (whole when small: every layout then starts from the weights one process would have;
    big models initialise their shards after sharding, so they never exist whole in one process).
    DDP and one process need whole weights anyway; so do TP and EP on CPU, where DTensor has no
    RNG tracker and shards initialised after sharding would repeat each other."""
    if mode != "auto":
        full = mode == "full"
    else:
        full = sum(p.numel() * p.element_size() for p in model.parameters()) <= FULL_INIT_MAX_BYTES
    cpu = device.type == "cpu"
    return full or degrees.dp_shard == 1 or (degrees.tp > 1 and cpu) or (degrees.ep > 1 and cpu)


def materialise(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a meta model on `device` and initialise it from `seed`. The same seed on every
    rank: replicas start identical without a broadcast."""
    model.to_empty(device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.init_weights(device)


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: JobConfig, *, device: torch.device,
                scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                wrap_comm_hook: Callable[[Callable], Callable] | None = None) -> ParallelModel:
    """Apply every parallel dimension of `mesh.degrees` to `model` (built on the meta device, or
    initialised) in the order of the module docstring, initialising a meta model before or after
    sharding (`init_before_sharding`). `scale_loss` (e.g. a GradScaler's `scale`) multiplies the
    loss the pipeline schedule back-propagates; unused without pipelining. `wrap_comm_hook` wraps
    a DDP comm hook before it is registered (the time breakdown's timer around it)."""
    degrees = mesh.degrees
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    if on_meta and init_before_sharding(model, degrees, device, cfg.train.init):
        materialise(model, device, cfg.train.seed)
        on_meta = False
    # comm.compression under FSDP2 (the config refuses the others there) is the reduce-scatter's
    # dtype: bf16 / fp16 without error feedback (FSDP casts inside its own collective)
    policy = FSDPPolicy.from_config(cfg.parallel, device,
                                    reduce_dtype=DTYPES.get(cfg.comm.compression, torch.float32))
    if degrees.pp > 1:
        return _parallelize_pipeline(model, mesh, cfg, policy, device, on_meta, scale_loss)
    _apply_in_order(model, mesh, cfg, policy, pipeline=False)
    if on_meta:
        materialise(model, device, cfg.train.seed)
    if degrees.dp_shard == 1 and degrees.dp_replicate > 1:
        ddp, comm = apply_ddp(model, mesh["dp_replicate"], cfg.comm, wrap_comm_hook)
        return ParallelModel(ddp, comm=comm)
    return ParallelModel(model)


def _apply_in_order(module: nn.Module, mesh: ParallelMesh, cfg: JobConfig, policy: FSDPPolicy,
                    pipeline: bool) -> None:
    """TP -> EP -> activation checkpointing -> compile -> FSDP2, in place, on a model or one
    pipeline stage."""
    degrees, par = mesh.degrees, cfg.parallel
    if degrees.tp > 1:
        apply_tp(module, mesh["tp"], par.sequence_parallel, par.loss_parallel)
    if degrees.ep > 1:
        apply_ep(module, mesh["ep"])
    apply_activation_checkpointing(module, cfg.train.activation_checkpointing, cfg.train.ac_every)
    if cfg.train.compile:
        apply_compile(module)
    if degrees.ep > 1:  # experts over dp_shard / ep first; the blocks then leave them alone
        apply_expert_fsdp(module, mesh.expert_fsdp, policy, pipeline=pipeline)
    if degrees.dp_shard > 1:
        apply_fsdp(module, mesh.fsdp, policy, pipeline=pipeline)


def _parallelize_pipeline(model: nn.Module, mesh: ParallelMesh, cfg: JobConfig, policy: FSDPPolicy,
                          device: torch.device, on_meta: bool,
                          scale_loss: Callable[[torch.Tensor], torch.Tensor] | None) -> ParallelModel:
    """Split into this rank's stages, parallelise (and, from meta, initialise) each, build the schedule."""
    pp_mesh = mesh["pp"]
    pp_rank = pp_mesh.get_local_rank()
    plan = plan_pipeline(cfg.parallel, cfg.model, pp_mesh.size(), cfg.train.seq_len)
    parts = split_model(model, plan, pp_rank)
    for part, stage in zip(parts, plan.local_stages(pp_rank)):
        _apply_in_order(part, mesh, cfg, policy, pipeline=True)
        if on_meta:
            materialise_part(part, device, cfg.train.seed, stage)
    n_micro = cfg.parallel.pp_microbatches or plan.n_stages
    # The schedule keeps the last stage's output only for its autograd graph (return_outputs=False):
    # the loss may write its gradient into it, as in the trainer's plain path.
    loss_fn = partial(tp_cross_entropy, loss_parallel=mesh.degrees.tp > 1 and cfg.parallel.loss_parallel,
                      overwrite_logits=True)
    pipe = build_schedule(parts, plan, pp_mesh, loss_fn, n_micro, device,
                          accum_steps=cfg.accum_steps(mesh.world.size()), scale_loss=scale_loss)
    return ParallelModel(parts_module(parts), pipe)

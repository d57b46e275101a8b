"""Pipeline parallelism on torch.distributed.pipelining: split the layers over stages, give each
rank its stages (as pruned deep copies of the model), run a torch schedule.

A stage is the whole model with the modules it does not own removed (the blocks deleted from the
`layers` ModuleDict; the modules the model names in `first_stage_modules` set to None except on
the first stage, those in `last_stage_modules` except on the last; the model's forward passes
through what is missing) -- torchtitan's approach. Parameter names stay the model's own
(`layers.5.<...>` on whichever stage holds layer 5), so checkpoints do not depend on the pipeline
layout.

Order of use (docs/architecture.md: pipeline split -> TP -> EP -> AC -> compile -> FSDP):

    plan  = plan_pipeline(cfg.parallel, cfg.model, pp_size, seq_len)
    parts = split_model(model, plan, pp_rank)            # model: initialised, or on meta
    for part, stage in zip(parts, plan.local_stages(pp_rank)):
        apply_tp(part, ...); apply_activation_checkpointing(part, ...); apply_compile(part)
        apply_fsdp(part, ..., pipeline=True)
        (meta model only) materialise_part(part, device, seed, stage)
    pipe  = build_schedule(parts, plan, mesh["pp"], loss_fn, n_micro, device, accum_steps)
    loss  = pipeline_step(pipe, x, y)                    # mean loss on the last stage, else None
    loss  = broadcast_loss(pipe, loss)                   # the same value on every pp rank

Checkpoints: `parts_module(pipe.parts)` is one module with this rank's parameters under their
original names; give it to DCP (`ModelOptimizerState(parts_module(parts), optimizer)`).

Initial weights: pass a fully initialised model to `split_model` and every layout starts from
exactly the weights one process would have (the parts are copies). A meta model gives meta parts;
`materialise_part` then initialises each part from a per-stage seed: deterministic, but not the
single-process weights (the same holds for FSDP's sharded init).

Loss and gradient scaling: torch's `scale_grads=True` divides *all* gradients of a stage by the
number of microbatches at the end of each step, which would also shrink gradients accumulated by
earlier steps. So schedules are built with `scale_grads=False` and the loss that is
back-propagated is `loss_fn(out, y) / (n_microbatches * accum_steps)`: with a per-microbatch mean
`loss_fn` and equal microbatches the gradients of one optimizer step equal the full-batch mean's,
and accumulation over several `pipeline_step` calls is exact. The unscaled microbatch losses are
recorded and `pipeline_step` returns their mean.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lmforge.config import ModelConfig, ParallelConfig
from lmforge.config.parallel import SPLIT_BACKWARD_SCHEDULES, V_SCHEDULES
from lmforge.models.registry import family_of
from lmforge.observability.flops import flops_breakdown
from lmforge.tensors.dtensor import gathered

if TYPE_CHECKING:
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

__all__ = [
    "PipelineError", "PipelineParts", "StagePlan", "SCHEDULES", "V_STYLE", "balanced_partition", "broadcast_loss",
    "build_pipeline", "build_schedule", "materialise_part", "parts_module", "pipeline_eval", "pipeline_step", "plan_pipeline",
    "schedule_class", "split_layers", "split_model", "stage_costs", "stage_ranks",
]

# Schedule name -> its class in torch.distributed.pipelining.schedules. Resolved when a pipeline
# is built (`schedule_class`): importing torch's pipelining loads torch._dynamo (~0.7 s on a
# 2-core CPU), which every process that imports the trainer would otherwise pay, pp or not.
SCHEDULES: dict[str, str] = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "looped_bfs": "ScheduleLoopedBFS",
    "interleaved_zb": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}
V_STYLE = frozenset(V_SCHEDULES)  # rank r holds stages r and 2*pp-1-r
# Forward-only eval is a forward + backward step here (see pipeline_eval).
_EVAL_BY_STEP = V_STYLE
# Split input/weight backward: torch refuses them on compiled stage modules.
_SPLIT_BACKWARD = frozenset(SPLIT_BACKWARD_SCHEDULES)


def schedule_class(name: str) -> type:
    """torch's schedule class for `name` (a key of SCHEDULES), imported on first use."""
    return getattr(importlib.import_module("torch.distributed.pipelining.schedules"), SCHEDULES[name])


class PipelineError(ValueError):
    """A pipeline layout that cannot be built (one line: what, the value, what is allowed)."""


# -- splitting -------------------------------------------------------------------------------------


def stage_costs(method: str, cfg: ModelConfig, seq_len: int | None = None) -> tuple[list[int], int, int]:
    """(per-layer cost, extra cost of stage 0, extra cost of the last stage) for `method`.

    "params": parameter counts; stage 0 adds the embedding, the last stage the final norm and
    the output projection. "flops": forward matmul FLOPs per token from
    lmforge.observability.flops (attention at `seq_len`, default `cfg.max_seq_len`); the
    embedding is a gather (0), the last stage adds the output projection. Integers, so ties in
    the balancing are exact.
    """
    if method == "params":
        counts = family_of(cfg).count_params(cfg)
        output = counts["total"] - counts["embedding"] - counts["non_embedding"]
        return [counts["per_layer"]] * cfg.n_layers, counts["embedding"], output + cfg.dim
    if method == "flops":
        one = flops_breakdown(replace(cfg, n_layers=1), seq_len or cfg.max_seq_len)
        per_layer = round(one["forward"] - one["output"])
        return [per_layer] * cfg.n_layers, 0, round(one["output"])
    raise PipelineError(f"parallel.pp_split = {method!r}: allowed are 'even', 'params', 'flops'")


def balanced_partition(costs: list[int], n_stages: int, head: int = 0, tail: int = 0) -> list[list[int]]:
    """Contiguous split of layers (costs in order) into `n_stages` non-empty stages minimising the
    most expensive stage, then the sum of squared stage costs; stage 0 also carries `head`, the
    last stage `tail`. Remaining ties put more layers on earlier stages. O(stages * layers^2)."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise PipelineError(f"pipeline stages = {n_stages}: need 1 <= stages <= layers ({n})")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, j: int, i: int) -> int:
        return (prefix[i] - prefix[j] + (head if stage == 0 else 0)
                + (tail if stage == n_stages - 1 else 0))

    # best[k][i]: (max stage cost, sum of squares) of layers [0, i) on stages 0..k-1; back[k][i]: split point.
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    back = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = (0, 0)
    for k in range(1, n_stages + 1):
        last_i = range(n, n + 1) if k == n_stages else range(k, n - (n_stages - k) + 1)
        for i in last_i:
            for j in range(i - 1, k - 2, -1):  # descending: ties keep the larger j (earlier stages fuller)
                prev = best[k - 1][j]
                if prev == inf:
                    continue
                c = cost(k - 1, j, i)
                cand = (max(prev[0], c), prev[1] + c * c)
                if cand < best[k][i]:
                    best[k][i], back[k][i] = cand, j
    bounds = [n]
    for k in range(n_stages, 0, -1):
        bounds.append(back[k][bounds[-1]])
    bounds.reverse()
    return [list(range(bounds[s], bounds[s + 1])) for s in range(n_stages)]


def split_layers(n_layers: int, n_stages: int, method: str, cfg: ModelConfig,
                 explicit: list[int] | None = None, seq_len: int | None = None) -> list[list[int]]:
    """Layer indices per stage, contiguous and in order.

    - explicit (`parallel.pp_layers_per_stage`, layers per stage) wins over `method`.
    - "even": n_layers // n_stages each; when uneven the FIRST stages take one extra layer. The
      last stage never does (the extra count is < n_stages), which suits it: it also runs the
      output projection and the loss, the costliest non-layer work; stage 0's embedding is a
      cheap gather.
    - "params" / "flops": `balanced_partition` over `stage_costs` (embedding / output included).
    """
    if n_stages < 1 or n_stages > n_layers:
        raise PipelineError(f"pipeline stages = {n_stages}: need 1 <= stages <= model.n_layers ({n_layers})")
    if explicit is not None:
        if len(explicit) != n_stages or any(c < 1 for c in explicit) or sum(explicit) != n_layers:
            raise PipelineError(f"parallel.pp_layers_per_stage = {list(explicit)}: need {n_stages} counts, "
                                f"each >= 1, summing to model.n_layers ({n_layers})")
        out, start = [], 0
        for c in explicit:
            out.append(list(range(start, start + c)))
            start += c
        return out
    if method == "even":
        base, extra = divmod(n_layers, n_stages)
        out, start = [], 0
        for s in range(n_stages):
            c = base + (1 if s < extra else 0)
            out.append(list(range(start, start + c)))
            start += c
        return out
    if n_layers != cfg.n_layers:
        raise PipelineError(f"n_layers = {n_layers} differs from model.n_layers ({cfg.n_layers}) for {method!r}")
    per_layer, head, tail = stage_costs(method, cfg, seq_len)
    return balanced_partition(per_layer, n_stages, head, tail)


def stage_ranks(pp_size: int, stages_per_rank: int, schedule: str) -> dict[int, int]:
    """Stage index -> pp rank. Loop style (stage s on rank s % pp) for single-stage, interleaved
    and looped schedules; V style for "zbv"/"dualpipev" (zig-zag: with 2 stages per rank, rank r
    holds stages r and 2*pp-1-r, so the first and last stage share rank 0)."""
    if schedule not in SCHEDULES:
        raise PipelineError(f"parallel.pp_schedule = {schedule!r}: allowed are {', '.join(SCHEDULES)}")
    if pp_size < 1 or stages_per_rank < 1:
        raise PipelineError(f"pp = {pp_size}, stages per rank = {stages_per_rank}: both must be >= 1")
    n = pp_size * stages_per_rank
    if schedule in V_STYLE:
        return {s: (s % pp_size if (s // pp_size) % 2 == 0 else pp_size - 1 - s % pp_size) for s in range(n)}
    return {s: s % pp_size for s in range(n)}


@dataclass(frozen=True)
class StagePlan:
    """Which layers each stage holds and which pp rank runs it (the same on every rank)."""

    layers: list[list[int]]
    stage_to_rank: dict[int, int]
    schedule: str

    @property
    def n_stages(self) -> int:
        return len(self.layers)

    def local_stages(self, pp_rank: int) -> list[int]:
        """This rank's stage indices, ascending (the order of `split_model`'s parts)."""
        return sorted(s for s, r in self.stage_to_rank.items() if r == pp_rank)

    def rank_of_last_stage(self) -> int:
        return self.stage_to_rank[self.n_stages - 1]


def plan_pipeline(cfg: ParallelConfig, model_cfg: ModelConfig, pp_size: int | None = None,
                  seq_len: int | None = None) -> StagePlan:
    """The stage plan from the config: pp * stages_per_rank stages, layers split per `pp_split`
    (or `pp_layers_per_stage`), ranks per the schedule's style."""
    pp = pp_size or cfg.pp
    spr = cfg.stages_per_rank
    if model_cfg.tie_embeddings and pp * spr > 1:
        raise PipelineError("model.tie_embeddings = true: not supported with pipeline parallel "
                            "(the embedding and the output projection live on different stages); "
                            "use untied embeddings")
    mapping = stage_ranks(pp, spr, cfg.pp_schedule)
    layers = split_layers(model_cfg.n_layers, pp * spr, cfg.pp_split, model_cfg, cfg.pp_layers_per_stage, seq_len)
    return StagePlan(layers=layers, stage_to_rank=mapping, schedule=cfg.pp_schedule)


def split_model(model: nn.Module, plan: StagePlan, pp_rank: int) -> list[nn.Module]:
    """One pruned deep copy of `model` per local stage (ascending stage index). Only the owned
    modules are copied (unowned ones never are, so a big materialised model is not duplicated
    whole); names keep the original FQNs. Works on meta or materialised models; `model` is left
    untouched (drop it afterwards to free its memory)."""
    parts = []
    last = plan.n_stages - 1
    for stage in plan.local_stages(pp_rank):
        owned = {str(i) for i in plan.layers[stage]}
        memo: dict[int, object] = {id(block): None for name, block in model.layers.items() if name not in owned}
        if stage != 0:
            memo |= {id(getattr(model, name)): None for name in model.first_stage_modules}
        if stage != last:
            memo |= {id(getattr(model, name)): None for name in model.last_stage_modules}
        part = copy.deepcopy(model, memo)
        for name in [k for k, v in part.layers._modules.items() if v is None]:
            del part.layers[name]
        parts.append(part)
    return parts


@torch.no_grad()
def materialise_part(part: nn.Module, device: torch.device | str, seed: int, stage_index: int) -> None:
    """Allocate a meta part on `device` and initialise it from `seed` and its stage index (the
    same on every rank that holds this stage, different across stages). Deterministic for a
    layout, but not the single-process weights: for those, split an initialised model."""
    part.to_empty(device=device)
    with torch.random.fork_rng(devices=[] if torch.device(device).type == "cpu" else [torch.device(device)]):
        torch.manual_seed(seed + 1_000_003 * (stage_index + 1))
        part.init_weights(torch.device(device))


class _PartsView(nn.Module):
    """The local parts under the model's own names, for checkpoints and optimizers (never run)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        # In the model's order (first-stage modules, blocks, last-stage modules): parameters()
        # then lists them as the whole model would (the optimizer and the grad norm follow it).
        for name in parts[0].first_stage_modules:
            setattr(self, name, _first_held(parts, name))
        layers = {name: block for p in parts for name, block in p.layers.items()}
        self.layers = nn.ModuleDict({k: layers[k] for k in sorted(layers, key=int)})
        for name in parts[0].last_stage_modules:
            setattr(self, name, _first_held(parts, name))

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003
        raise RuntimeError("the pipeline parts view is for state dicts; run the pipeline schedule instead")


def _first_held(parts: list[nn.Module], name: str) -> nn.Module | None:
    return next((getattr(p, name) for p in parts if getattr(p, name) is not None), None)


def parts_module(parts: list[nn.Module]) -> nn.Module:
    """One module holding this rank's parts' modules (shared, not copied) with the original FQNs
    (`layers.5...`), so DCP's get_state_dict / set_state_dict (e.g.
    `ModelOptimizerState(parts_module(parts), optimizer)`) save a pipeline-layout-independent
    checkpoint: each rank writes its own FQNs, any layout (or one process) loads them."""
    return _PartsView(parts)


# -- schedule --------------------------------------------------------------------------------------


@dataclass
class PipelineParts:
    """This rank's share of the pipeline: modules, stages and the schedule that drives them."""

    schedule: PipelineScheduleSingle | PipelineScheduleMulti
    parts: list[nn.Module]
    stages: list[PipelineStage]
    stage_indices: list[int]
    plan: StagePlan
    group: dist.ProcessGroup
    n_microbatches: int
    has_first_stage: bool
    has_last_stage: bool
    device: torch.device
    raw_losses: list[torch.Tensor] = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter of the local parts (for the optimizer and gradient clipping)."""
        return [p for part in self.parts for p in part.parameters()]


def build_schedule(parts: list[nn.Module], plan: StagePlan, pp_group: dist.ProcessGroup | DeviceMesh,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_microbatches: int,
                   device: torch.device | str, accum_steps: int = 1,
                   scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PipelineParts:
    """Wrap the (already parallelised and materialised) parts in PipelineStages and build the
    torch schedule named by `plan.schedule`.

    `loss_fn(logits, targets)` must return the mean over its microbatch. The back-propagated loss
    is loss / (n_microbatches * accum_steps), then `scale_loss` (e.g. a GradScaler's `scale`).
    """
    group = pp_group.get_group() if isinstance(pp_group, DeviceMesh) else pp_group
    pp_rank, pp_size = dist.get_rank(group), dist.get_world_size(group)
    if pp_size != max(plan.stage_to_rank.values()) + 1:
        raise PipelineError(f"pp group size {pp_size} does not match the stage plan "
                            f"({plan.n_stages} stages over {max(plan.stage_to_rank.values()) + 1} ranks)")
    indices = plan.local_stages(pp_rank)
    if len(parts) != len(indices):
        raise PipelineError(f"{len(parts)} model parts given, rank {pp_rank} runs stages {indices}")
    if n_microbatches < 1 or accum_steps < 1:
        raise PipelineError(f"pp microbatches = {n_microbatches}, accum_steps = {accum_steps}: both must be >= 1")
    if plan.schedule in _SPLIT_BACKWARD and any(
            getattr(m, "_compiled_call_impl", None) is not None for part in parts for m in part.modules()):
        raise PipelineError(f"parallel.pp_schedule = {plan.schedule!r} splits the backward into input and "
                            f"weight passes, which torch does not support on compiled modules: "
                            f"disable train.compile or use gpipe/1f1b/interleaved_1f1b/looped_bfs")
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    device = torch.device(device)
    stages = [PipelineStage(part, stage_index=s, num_stages=plan.n_stages, device=device, group=group)
              for part, s in zip(parts, indices)]

    raw: list[torch.Tensor] = []
    factor = 1.0 / (n_microbatches * accum_steps)

    def scaled_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(output, target)
        detached = loss.detach()
        raw.append(gathered(detached))
        loss = loss * factor
        return scale_loss(loss) if scale_loss is not None else loss

    cls = schedule_class(plan.schedule)
    try:
        if issubclass(cls, PipelineScheduleSingle):
            if len(stages) != 1:
                raise PipelineError(f"parallel.pp_schedule = {plan.schedule!r} runs one stage per rank, "
                                    f"got {len(stages)}")
            schedule = cls(stages[0], n_microbatches=n_microbatches, loss_fn=scaled_loss, scale_grads=False)
        else:
            schedule = cls(stages, n_microbatches=n_microbatches, loss_fn=scaled_loss, scale_grads=False)
    except (ValueError, RuntimeError) as e:
        if isinstance(e, PipelineError):
            raise
        msg = " ".join(str(e).split())
        raise PipelineError(f"parallel.pp_schedule = {plan.schedule!r} with {n_microbatches} microbatches and "
                            f"{plan.n_stages} stages: {msg}") from e
    return PipelineParts(schedule=schedule, parts=list(parts), stages=stages, stage_indices=indices, plan=plan,
                         group=group, n_microbatches=n_microbatches, has_first_stage=0 in indices,
                         has_last_stage=plan.n_stages - 1 in indices, device=device,
                         raw_losses=raw)


def build_pipeline(model: nn.Module, pp_mesh: DeviceMesh, cfg: ParallelConfig, model_cfg: ModelConfig,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_microbatches: int | None,
                   device: torch.device | str, seq_len: int | None = None, accum_steps: int = 1) -> PipelineParts:
    """plan -> split -> stages -> schedule in one call, for an initialised model with no other
    parallelism. With TP/AC/compile/FSDP use `plan_pipeline`, `split_model`, then `build_schedule`.
    `n_microbatches` None or 0: `cfg.pp_microbatches`, or else the number of stages."""
    plan = plan_pipeline(cfg, model_cfg, pp_mesh.size(), seq_len)
    parts = split_model(model, plan, pp_mesh.get_local_rank())
    n_micro = n_microbatches or cfg.pp_microbatches or plan.n_stages
    return build_schedule(parts, plan, pp_mesh, loss_fn, n_micro, device, accum_steps)


# -- steps -----------------------------------------------------------------------------------------


def _run(pipe: PipelineParts, inputs: torch.Tensor | None, targets: torch.Tensor | None,
         train: bool, doc_start: torch.Tensor | None = None) -> torch.Tensor | None:
    # Checked wherever given (pass the batch on every pp rank), so all ranks refuse together
    # instead of some waiting forever for a peer that raised.
    for name, t, needed in (("inputs", inputs, pipe.has_first_stage), ("targets", targets, pipe.has_last_stage)):
        if (needed or t is not None) and (t is None or t.shape[0] % pipe.n_microbatches != 0):
            got = None if t is None else t.shape[0]
            raise PipelineError(f"pipeline {name} batch = {got}: must be a multiple of the "
                                f"{pipe.n_microbatches} microbatches (equal microbatches keep the mean exact)")
    pipe.raw_losses.clear()
    args = (inputs,) if pipe.has_first_stage else ()
    kwargs = {"target": targets, "losses": []} if pipe.has_last_stage else {}
    if doc_start is not None:  # a model keyword: split into microbatches and given to every stage
        kwargs["doc_start"] = doc_start
    if train:
        pipe.schedule.step(*args, return_outputs=False, **kwargs)
    elif pipe.plan.schedule in _EVAL_BY_STEP:
        # torch 2.13's eval() fails on V schedules (the backward actions still run their same-rank
        # hand-over and assert): run a training step and put the gradients back as they were.
        params = pipe.parameters()
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad():
                pipe.schedule.step(*args, return_outputs=False, **kwargs)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
    else:
        with torch.no_grad():
            pipe.schedule.eval(*args, return_outputs=False, **kwargs)
    if not pipe.has_last_stage:
        return None
    # The first step of a stage also calls the loss once for shape inference (on placeholder
    # tensors, before any microbatch): the real losses are the last n_microbatches.
    if len(pipe.raw_losses) < pipe.n_microbatches:
        raise RuntimeError(f"pipeline computed {len(pipe.raw_losses)} losses for {pipe.n_microbatches} microbatches")
    loss = torch.stack(pipe.raw_losses[-pipe.n_microbatches:]).mean()
    pipe.raw_losses.clear()
    return loss


def pipeline_step(pipe: PipelineParts, inputs: torch.Tensor | None, targets: torch.Tensor | None,
                  doc_start: torch.Tensor | None = None) -> torch.Tensor | None:
    """Forward + backward of one batch through the pipeline; gradients accumulate in the parts
    (scaled by 1 / (n_microbatches * accum_steps)). `inputs` are needed on the rank with the
    first stage, `targets` on the rank with the last; other ranks may pass None, but passing
    both everywhere lets every rank check the batch and fail together. Returns the
    mean microbatch loss (detached) on the last stage's rank, None elsewhere; see `broadcast_loss`.
    `doc_start` (document masking) is needed on every pp rank: each stage's attention uses it."""
    return _run(pipe, inputs, targets, train=True, doc_start=doc_start)


def pipeline_eval(pipe: PipelineParts, inputs: torch.Tensor | None, targets: torch.Tensor | None,
                  doc_start: torch.Tensor | None = None) -> torch.Tensor | None:
    """Forward only (schedule.eval under no_grad): the mean microbatch loss on the last stage's
    rank, None elsewhere; parameters and gradients are left as they were. For "zbv" and
    "dualpipev", whose eval() fails in torch 2.13, it runs a full training step (about 3x the
    cost of a forward) and restores the gradients."""
    return _run(pipe, inputs, targets, train=False, doc_start=doc_start)


def broadcast_loss(pipe: PipelineParts, loss: torch.Tensor | None) -> torch.Tensor:
    """The last stage's loss (fp32) on every rank of the pp group (a collective: all pp ranks
    call), e.g. before averaging over the data-parallel group for logging."""
    if loss is not None:
        value = loss.detach().to(device=pipe.device, dtype=torch.float32).clone()
    else:
        value = torch.zeros((), dtype=torch.float32, device=pipe.device)
    src = dist.get_global_rank(pipe.group, pipe.plan.rank_of_last_stage())
    dist.broadcast(value, src=src, group=pipe.group)
    return value

"""The parallel layout on one DeviceMesh, and the one list of pipeline schedule names (the pipeline
builder in lmforge/parallel/pp.py maps the same names to torch's schedule classes)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lmforge.config.checks import require

if TYPE_CHECKING:
    from lmforge.config.model import ModelConfig
    from lmforge.config.train import TrainConfig


def world_size_from_env() -> int:
    """World size as torchrun announces it (1 when launched as a plain process); torch-free, so the
    CLI validates a config against it before torch is imported."""
    return int(os.environ.get("WORLD_SIZE", "1"))


PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv", "dualpipev")
# Schedules that run several stages per rank (virtual stages); the V-shaped ones need exactly two.
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv", "dualpipev")
V_SCHEDULES = ("zbv", "dualpipev")
# Schedules that split the backward into input and weight passes (torch refuses compiled modules).
SPLIT_BACKWARD_SCHEDULES = ("interleaved_zb", "zbv", "dualpipev")
# Runtime schedules that run microbatches in rounds of pp: n_microbatches must fill whole rounds.
ROUND_SCHEDULES = ("interleaved_1f1b", "interleaved_zb")


@dataclass
class ParallelConfig:
    """The N-D layout on one DeviceMesh (pp, dp_replicate, dp_shard, tp), torchtitan's semantics:
    dp_shard > 1 is FSDP2 (ZeRO-3; ZeRO-2-like with `fsdp_reshard_after_forward = "never"`),
    dp_replicate > 1 alone is DDP, both is HSDP. dp_shard = -1 takes what the other degrees leave
    of the world size. Degrees multiply to the world size.

    `ep` (expert parallel, torchtitan's design) borrows its ranks from dp_shard; it is not a
    factor of the world size. With dp_shard = D and ep = P (P divides D and model.moe.n_experts):
    tokens stay data-parallel over all D (x dp_replicate) ranks; dense weights are FSDP-sharded
    over all D; each MoE layer's experts are split over P (rank j of an ep group owns experts
    j*E/P .. (j+1)*E/P - 1, tokens reach them by all-to-all) and FSDP-sharded over the D/P ranks
    that hold the same experts. So "ep=2 x dp_shard=2" runs on 2 ranks (each owns half the experts;
    the dense weights are FSDP-sharded over both); on 4 ranks it is dp_shard=4, ep=2: ep groups
    {0,1} and {2,3}, experts FSDP-sharded over {0,2} and {1,3}. Composes with dp_replicate (HSDP),
    pp (within each stage) and tp (attention TP; the MoE layer is replicated over tp, each tp rank
    runs its own ep all-to-alls)."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallel: borrowed from dp_shard (see above)
    sequence_parallel: bool = True  # with tp > 1: norms and residuals sharded along the sequence
    loss_parallel: bool = True  # with tp > 1: cross-entropy on vocab-sharded logits
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = "default"
    fsdp_param_dtype: Literal["fp32", "bf16"] = "fp32"  # bf16: FSDP casts params, reduces in fp32
    # params, grads, optimizer state on CPU (a no-op when training on CPU); these three need FSDP
    # (dp_shard > 1) and are refused without it. With ep > 1 they apply to the experts too.
    cpu_offload: bool = False
    pp_schedule: Literal[PP_SCHEDULES] = "1f1b"  # the names above: one list
    pp_microbatches: int = 0  # 0: as many as pipeline stages
    pp_stages_per_rank: int = 0  # 0: 1, or 2 for schedules that need several stages per rank
    pp_split: Literal["even", "params", "flops"] = "even"  # how layers are balanced over stages
    pp_layers_per_stage: list[int] | None = None  # explicit split; overrides pp_split
    # auto: nccl on CUDA, gloo on CPU (its tensor-parallel groups with one worker thread: parallel/gloo.py)
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    def resolved(self, world_size: int) -> ParallelConfig:
        """A copy with dp_shard = -1 replaced by what the world size leaves."""
        from dataclasses import replace

        if self.dp_shard != -1:
            return replace(self)
        others = self.dp_replicate * self.tp * self.pp
        return replace(self, dp_shard=max(1, world_size // others) if world_size % others == 0 else -1)

    @property
    def dp_degree(self) -> int:
        return self.dp_replicate * max(self.dp_shard, 1)

    @property
    def stages_per_rank(self) -> int:
        if self.pp_stages_per_rank:
            return self.pp_stages_per_rank
        return 2 if self.pp_schedule in MULTI_STAGE_SCHEDULES else 1

    def validate(self, world_size: int, model: ModelConfig, train: TrainConfig) -> None:
        for name in ("dp_replicate", "tp", "pp"):
            v = getattr(self, name)
            require(v >= 1, f"parallel.{name}", v, "must be >= 1")
        require(self.dp_shard == -1 or self.dp_shard >= 1, "parallel.dp_shard", self.dp_shard,
                "must be >= 1, or -1 for what the other degrees leave")
        r = self.resolved(world_size)
        product = r.dp_replicate * r.dp_shard * r.tp * r.pp
        require(r.dp_shard >= 1 and product == world_size, "parallel",
                f"dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x tp={self.tp} x pp={self.pp}",
                f"degrees must multiply to the world size ({world_size})")
        if r.dp_replicate > 1 and r.dp_shard == 1 and (r.tp > 1 or r.pp > 1):
            require(False, "parallel.dp_replicate", r.dp_replicate,
                    "plain DDP (dp_shard = 1) does not combine with tp or pp; use dp_shard (FSDP, or HSDP with "
                    "dp_replicate)")
        if r.tp > 1:
            require(model.n_heads % r.tp == 0, "parallel.tp", r.tp, f"must divide model.n_heads ({model.n_heads})")
            require(model.kv_heads % r.tp == 0, "parallel.tp", r.tp,
                    f"must divide the key/value heads ({model.kv_heads})")
            require(model.ffn_hidden_size % r.tp == 0, "parallel.tp", r.tp,
                    f"must divide the feed-forward width ({model.ffn_hidden_size})")
            require(model.vocab_size % r.tp == 0, "parallel.tp", r.tp,
                    f"must divide model.vocab_size ({model.vocab_size})")
            if r.sequence_parallel:
                require(train.seq_len % r.tp == 0, "parallel.tp", r.tp,
                        f"must divide train.seq_len ({train.seq_len}) with sequence parallel")
        if r.dp_shard == 1:  # no FSDP (one process, or DDP): these would be silently ignored
            for key, default in (("cpu_offload", False), ("fsdp_param_dtype", "fp32"),
                                 ("fsdp_reshard_after_forward", "default")):
                require(getattr(self, key) == default, f"parallel.{key}", getattr(self, key),
                        f"applies to FSDP only, which needs parallel.dp_shard > 1 (here 1 at world size "
                        f"{world_size}); allowed here: {default!r}")
        require(self.ep >= 1, "parallel.ep", self.ep, "must be >= 1")
        if r.ep > 1:
            require(model.moe.n_experts > 0, "parallel.ep", r.ep, "needs MoE layers (model.moe.n_experts > 0)")
            require(model.moe.n_experts % r.ep == 0, "parallel.ep", r.ep,
                    f"must divide model.moe.n_experts ({model.moe.n_experts})")
            require(r.dp_shard % r.ep == 0, "parallel.ep", r.ep,
                    f"must divide parallel.dp_shard ({r.dp_shard}): expert parallel borrows dp_shard ranks")
        if r.pp > 1:
            stages = r.pp * r.stages_per_rank
            if self.pp_schedule in V_SCHEDULES:
                require(r.stages_per_rank == 2, "parallel.pp_stages_per_rank", self.pp_stages_per_rank,
                        f"must be 2 (or 0) for the V-shaped schedule {self.pp_schedule!r}")
            elif self.pp_schedule in MULTI_STAGE_SCHEDULES:
                require(r.stages_per_rank >= 2, "parallel.pp_stages_per_rank", self.pp_stages_per_rank,
                        f"must be >= 2 for {self.pp_schedule!r}")
            else:
                require(r.stages_per_rank == 1, "parallel.pp_stages_per_rank", self.pp_stages_per_rank,
                        f"must be 1 (or 0) for single-stage schedule {self.pp_schedule!r}")
            require(stages <= model.n_layers, "parallel.pp", r.pp,
                    f"gives {stages} pipeline stages but model.n_layers is {model.n_layers}")
            if self.pp_layers_per_stage is not None:
                require(len(self.pp_layers_per_stage) == stages, "parallel.pp_layers_per_stage",
                        self.pp_layers_per_stage, f"must list {stages} stages")
                require(all(n >= 1 for n in self.pp_layers_per_stage), "parallel.pp_layers_per_stage",
                        self.pp_layers_per_stage, "each stage needs at least one layer")
                require(sum(self.pp_layers_per_stage) == model.n_layers, "parallel.pp_layers_per_stage",
                        self.pp_layers_per_stage, f"must sum to model.n_layers ({model.n_layers})")
            local_batch = train.global_batch_size // max(r.dp_degree, 1)
            micro = self.pp_microbatches or stages
            require(self.pp_microbatches >= 0, "parallel.pp_microbatches", self.pp_microbatches, "must be >= 0")
            minimum = stages if self.pp_schedule in ("dualpipev",) else r.pp
            require(micro >= minimum, "parallel.pp_microbatches", micro,
                    f"must be >= {minimum} for schedule {self.pp_schedule!r} with {stages} stages")
            require(train.micro_batch_size % micro == 0, "parallel.pp_microbatches", micro,
                    f"must divide train.micro_batch_size ({train.micro_batch_size}), the batch one pipeline "
                    f"step splits")
            del local_batch

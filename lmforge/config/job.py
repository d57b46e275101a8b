"""Component configs. Each component owns one small dataclass with its own range checks; the
JobConfig ties them together and checks what spans components (heads vs width, batch vs ranks).

Validation happens before any process group starts (see `lmforge.cli`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.config.loader import ConfigError, apply_override, build_dataclass, load_toml, nonfinite_fields


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _positive(section: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        require(v > 0, f"{section}.{n}", v, "must be > 0")


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward (issue 4). `n_experts = 0` keeps every layer dense.

    Layer i is MoE when n_experts > 0, i >= first_k_dense and (i - first_k_dense) % layer_interval
    == 0. Routed experts are SwiGLUs of width `expert_hidden` (None: the dense ffn width);
    `n_shared_experts` adds one always-on SwiGLU of width n_shared_experts * expert_hidden.
    `capacity_factor`: 0 = dropless token choice; > 0 caps each expert at
    ceil(capacity_factor * tokens * top_k / n_experts) assignments (token choice drops the rest;
    expert choice needs it > 0: it IS the per-expert capacity). `bias_update_rate` > 0 turns on
    auxiliary-loss-free balancing (DeepSeek-V3): a per-expert selection bias moved by
    rate * sign(mean load - load) after every optimizer step.
    """

    n_experts: int = 0
    top_k: int = 2
    n_shared_experts: int = 0
    expert_hidden: int | None = None
    first_k_dense: int = 0
    layer_interval: int = 1
    router: Literal["token_choice", "expert_choice"] = "token_choice"
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk: bool = True
    route_scale: float = 1.0
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(dim, 1)) scales the shared expert
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    capacity_factor: float = 0.0
    # Layers kept dense whatever the pattern above says (Qwen2-MoE `mlp_only_layers`).
    dense_layers: list[int] = field(default_factory=list)

    def validate(self, section: str = "model.moe") -> None:
        require(self.n_experts >= 0, f"{section}.n_experts", self.n_experts, "must be >= 0 (0 = dense)")
        if self.n_experts == 0:
            return
        require(1 <= self.top_k <= self.n_experts, f"{section}.top_k", self.top_k,
                f"must be in [1, n_experts = {self.n_experts}]")
        require(self.n_shared_experts >= 0, f"{section}.n_shared_experts", self.n_shared_experts, "must be >= 0")
        if self.expert_hidden is not None:
            require(self.expert_hidden > 0, f"{section}.expert_hidden", self.expert_hidden, "must be > 0")
        require(self.first_k_dense >= 0, f"{section}.first_k_dense", self.first_k_dense, "must be >= 0")
        require(self.layer_interval >= 1, f"{section}.layer_interval", self.layer_interval, "must be >= 1")
        require(all(i >= 0 for i in self.dense_layers), f"{section}.dense_layers", self.dense_layers,
                "must be layer indices >= 0")
        require(self.route_scale > 0, f"{section}.route_scale", self.route_scale, "must be > 0")
        for n in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "capacity_factor"):
            v = getattr(self, n)
            require(v >= 0, f"{section}.{n}", v, "must be >= 0 (0 = off)")
        require(not (self.shared_expert_gate and self.n_shared_experts == 0), f"{section}.shared_expert_gate",
                True, "needs n_shared_experts > 0")
        if self.router == "expert_choice":
            require(self.capacity_factor > 0, f"{section}.capacity_factor", self.capacity_factor,
                    "must be > 0 with router = 'expert_choice' (each expert takes capacity_factor * "
                    "tokens * top_k / n_experts tokens)")
            require(self.aux_loss_coef == 0, f"{section}.aux_loss_coef", self.aux_loss_coef,
                    "must be 0 with router = 'expert_choice' (balanced by construction)")
            require(self.bias_update_rate == 0, f"{section}.bias_update_rate", self.bias_update_rate,
                    "must be 0 with router = 'expert_choice' (balanced by construction)")
            require(self.score_func == "softmax", f"{section}.score_func", self.score_func,
                    "must be 'softmax' with router = 'expert_choice'")


@dataclass
class ModelConfig:
    """Llama-style decoder. `ffn_hidden=None` derives the SwiGLU width like Llama (8/3·dim, rounded)."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int = 8192
    ffn_hidden: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2 family)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` has a Mixture-of-Experts feed-forward (see MoEConfig)."""
        m = self.moe
        return (m.n_experts > 0 and layer >= m.first_k_dense and (layer - m.first_k_dense) % m.layer_interval == 0
                and layer not in m.dense_layers)

    @property
    def expert_hidden_size(self) -> int:
        return self.moe.expert_hidden if self.moe.expert_hidden is not None else self.ffn_hidden_size

    def moe_ffn_params(self) -> dict[str, int]:
        """Parameters of one MoE feed-forward: all of them, and those one token uses on average
        (router, routed experts, shared experts and their gate). Token choice uses top_k routed
        experts (dropless exact; an upper bound when it drops); expert choice gives each token
        capacity_factor * top_k on average (E experts x cf * T * k / E tokens each). The one
        count behind `lmforge sizes` and the FLOPs/MFU of lmforge.observability.flops."""
        m, d, f = self.moe, self.dim, self.expert_hidden_size
        router = d * m.n_experts
        shared = 3 * d * f * m.n_shared_experts + (d if m.shared_expert_gate else 0)
        routed = m.capacity_factor * m.top_k if m.router == "expert_choice" else m.top_k
        return {"total": router + 3 * d * f * m.n_experts + shared, "active": round(router + routed * 3 * d * f + shared)}

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def validate(self, section: str = "model") -> None:
        _positive(section, self, "dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len")
        _positive(section, self, "norm_eps", "rope_theta", "init_std")
        # Beyond these the model is dead or NaN from step one (RMSNorm divides by sqrt(ms + eps)).
        require(self.norm_eps <= 0.1, f"{section}.norm_eps", self.norm_eps, "must be in (0, 0.1] (typical 1e-5 or 1e-6)")
        require(self.init_std <= 1.0, f"{section}.init_std", self.init_std, "must be in (0, 1] (typical 0.02)")
        require(self.dim % self.n_heads == 0, f"{section}.n_heads", self.n_heads,
                f"must divide {section}.dim ({self.dim})")
        require(self.head_dim % 2 == 0, f"{section}.n_heads", self.n_heads,
                f"must leave an even head dim for RoPE ({section}.dim / n_heads = {self.head_dim})")
        if self.n_kv_heads is not None:
            require(self.n_kv_heads > 0, f"{section}.n_kv_heads", self.n_kv_heads, "must be > 0")
            require(self.n_heads % self.n_kv_heads == 0, f"{section}.n_kv_heads", self.n_kv_heads,
                    f"must divide {section}.n_heads ({self.n_heads})")
        if self.ffn_hidden is not None:
            require(self.ffn_hidden > 0, f"{section}.ffn_hidden", self.ffn_hidden, "must be > 0")
        if self.ffn_dim_multiplier is not None:
            require(self.ffn_dim_multiplier > 0, f"{section}.ffn_dim_multiplier", self.ffn_dim_multiplier,
                    "must be > 0")
        self.moe.validate(f"{section}.moe")
        if self.moe.n_experts:
            require(self.moe.first_k_dense < self.n_layers, f"{section}.moe.first_k_dense", self.moe.first_k_dense,
                    f"must be < {section}.n_layers ({self.n_layers}) or no layer is MoE")
            require(all(i < self.n_layers for i in self.moe.dense_layers), f"{section}.moe.dense_layers",
                    self.moe.dense_layers, f"must be layer indices < {section}.n_layers ({self.n_layers})")
            require(any(self.is_moe_layer(i) for i in range(self.n_layers)), f"{section}.moe.dense_layers",
                    self.moe.dense_layers, "leaves no MoE layer; set n_experts = 0 for a dense model")


@dataclass
class DataConfig:
    """Where the corpus comes from and where packed token shards live."""

    corpus: str = "default"  # "default" (embedded packages) or a path to a .jsonl file of {"text": ...}
    dir: str = "data/default"  # working dir: corpus.jsonl, tokenizer.json, packed shards
    val_fraction: float = 0.01
    seed: int = 1234
    max_documents: int | None = None  # cap for quick runs and tests

    def validate(self) -> None:
        require(0.0 < self.val_fraction < 0.5, "data.val_fraction", self.val_fraction, "must be in (0, 0.5)")
        if self.max_documents is not None:
            require(self.max_documents > 1, "data.max_documents", self.max_documents, "must be > 1")


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    min_frequency: int = 2

    def validate(self) -> None:
        require(self.vocab_size >= 260, "tokenizer.vocab_size", self.vocab_size,
                "must be >= 260 (256 bytes plus special tokens)")
        require(self.vocab_size <= 2**32 - 1, "tokenizer.vocab_size", self.vocab_size, "must fit in uint32")
        _positive("tokenizer", self, "min_frequency")


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"

    def validate(self) -> None:
        _positive("optimizer", self, "lr", "eps")
        # AdamW steps are about lr in size whatever the gradient: above 1 every weight is noise.
        require(self.lr <= 1.0, "optimizer.lr", self.lr, "must be in (0, 1] (typical 1e-4 to 1e-3)")
        require(self.eps <= 0.1, "optimizer.eps", self.eps, "must be in (0, 0.1] (typical 1e-8)")
        for n in ("beta1", "beta2"):
            v = getattr(self, n)
            require(0.0 <= v < 1.0, f"optimizer.{n}", v, "must be in [0, 1)")
        require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "must be >= 0")


@dataclass
class SchedulerConfig:
    """`cosine`: linear warmup then cosine to min_lr_ratio·lr. `wsd`: warmup, stable, then linear
    decay over the last `decay_fraction` of steps (MiniCPM / DeepSeek style)."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def validate(self) -> None:
        require(self.warmup_steps >= 0, "scheduler.warmup_steps", self.warmup_steps, "must be >= 0")
        require(0.0 <= self.min_lr_ratio <= 1.0, "scheduler.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(0.0 < self.decay_fraction <= 1.0, "scheduler.decay_fraction", self.decay_fraction,
                "must be in (0, 1]")


@dataclass
class TrainConfig:
    steps: int = 1000
    seq_len: int = 256
    global_batch_size: int = 8  # sequences per optimizer step, summed over data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward on one rank; the rest is gradient accumulation
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 0
    # "auto": bf16 where the hardware runs it natively (GPUs with bf16, CPUs with AMX/AVX512_BF16),
    # fp16 + loss scaling on older GPUs, fp32 elsewhere (lmforge.train.precision). The trainer
    # resolves it before the process group starts and writes the choice and its reason here.
    mixed_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    mixed_precision_reason: str = ""  # written by the trainer: why this precision (config.json)
    compile: bool = False
    # none | full (every block) | selective (every `ac_every`-th block) | op (save matmul and
    # attention outputs, recompute elementwise ops)
    activation_checkpointing: Literal["none", "full", "selective", "op"] = "none"
    ac_every: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_interval: int = 100  # 0 disables validation
    eval_batches: int = 8  # global batches of validation data per evaluation
    output_dir: str = "runs/default"
    deterministic: bool = False
    # "full": initialise the whole model, then shard (all layouts start from the same weights);
    # "sharded": initialise shards after sharding (any size); "auto": full up to 2 GiB of weights.
    init: Literal["auto", "full", "sharded"] = "auto"
    # Stop this run after this step although the schedule spans `steps` (Megatron's exit interval):
    # for time-limited cluster jobs that resume later, and for resume tests.
    stop_at: int | None = None
    # Debug: write <output_dir>/trace/rank<r>.jsonl, per step the loader positions and window ids
    # this rank consumed (to check that resumes and resharding see each sample exactly once).
    trace_samples: bool = False

    def validate(self) -> None:
        _positive("train", self, "steps", "seq_len", "global_batch_size", "micro_batch_size", "eval_batches",
                  "ac_every")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "must be >= 0 (0 disables)")
        require(self.eval_interval >= 0, "train.eval_interval", self.eval_interval, "must be >= 0 (0 disables)")
        require(self.output_dir != "", "train.output_dir", self.output_dir, "must be a non-empty path")
        if self.stop_at is not None:
            require(0 < self.stop_at <= self.steps, "train.stop_at", self.stop_at,
                    f"must be in [1, train.steps = {self.steps}]")


@dataclass
class CheckpointConfig:
    enabled: bool = True
    interval: int = 100
    keep_last: int = 3
    resume: str = "none"  # "none", "auto" (newest valid under <output_dir>/checkpoints) or a path
    folder: str = "checkpoints"
    # "async": the step loop is blocked only while the state is copied to host memory; the write,
    # manifest and rename run in a background thread (the next save or the end of training waits).
    async_mode: Literal["none", "async"] = "none"
    # Second tier: a snapshot every `memory_interval` steps (0: off) under memory_dir/<run> (host
    # RAM on Linux: survives a crashed worker, not a reboot), keeping the newest `memory_keep`.
    # Resume "auto" takes the newest valid checkpoint of either tier.
    memory_interval: int = 0
    memory_keep: int = 1
    memory_dir: str = "/dev/shm/lmforge"
    compression: Literal["none", "zstd"] = "none"  # lossless, durable tier
    # How AdamW moments are stored in the durable tier (weights are always exact): bf16, or int8
    # with one absmax scale per `quant_block` values.
    optimizer_states: Literal["fp32", "bf16", "int8"] = "fp32"
    quant_block: int = 256
    # Incremental durable checkpoints: a full one, then full_every-1 that store only the tensors
    # whose content changed since it (0: every checkpoint is full).
    full_every: int = 0

    def validate(self) -> None:
        _positive("checkpoint", self, "interval", "keep_last", "memory_keep", "quant_block")
        require(self.folder != "", "checkpoint.folder", self.folder, "must be a non-empty path")
        require(self.memory_interval >= 0, "checkpoint.memory_interval", self.memory_interval, "must be >= 0 (0 disables)")
        require(self.memory_dir != "", "checkpoint.memory_dir", self.memory_dir, "must be a non-empty path")
        require(self.full_every >= 0, "checkpoint.full_every", self.full_every,
                "must be >= 0 (0: every checkpoint full; k: a full one every k)")


@dataclass
class MetricsConfig:
    log_interval: int = 10
    jsonl: bool = True
    tensorboard: bool = True
    progress: Literal["auto", "rich", "plain", "none"] = "auto"
    peak_flops: float | None = None  # per device; None = known GPU peak or measured CPU peak
    plot: bool = True
    # At each log step every rank's busy time per step is all-gathered; a rank slower than the
    # median by this factor is reported as a straggler. 0 disables (no collective).
    straggler_factor: float = 1.5

    def validate(self) -> None:
        _positive("metrics", self, "log_interval")
        require(self.straggler_factor == 0 or self.straggler_factor > 1, "metrics.straggler_factor",
                self.straggler_factor, "must be > 1, or 0 to disable")
        if self.peak_flops is not None:
            require(self.peak_flops > 0, "metrics.peak_flops", self.peak_flops, "must be > 0")


@dataclass
class StabilityConfig:
    """Training stability policy (lmforge.train.stability). Off by default: when on, every step
    reads the global loss and grad norm on the host (one small all-reduce and a sync per step)."""

    enabled: bool = False
    skip_nonfinite: bool = True  # NaN/inf loss or grad norm -> skip the optimizer step
    spike_zscore: float = 6.0  # loss z-score over the window above this -> skip the batch; 0 disables
    spike_window: int = 50  # recent (accepted) losses the z-score is computed over
    spike_min_history: int = 10  # no spike verdict before this many losses are in the window
    max_consecutive_spikes: int = 3  # that many spikes in a row -> roll back; 0 never rolls back
    max_rollbacks: int = 5  # more rollbacks than this in one run -> stop with an error

    def validate(self) -> None:
        require(self.spike_zscore >= 0, "stability.spike_zscore", self.spike_zscore, "must be >= 0 (0 disables)")
        _positive("stability", self, "spike_window", "spike_min_history")
        require(self.spike_min_history <= self.spike_window, "stability.spike_min_history",
                self.spike_min_history, f"must be <= stability.spike_window ({self.spike_window})")
        require(self.spike_min_history >= 2, "stability.spike_min_history", self.spike_min_history,
                "must be >= 2 (a z-score needs a spread)")
        require(self.max_consecutive_spikes >= 0, "stability.max_consecutive_spikes", self.max_consecutive_spikes,
                "must be >= 0 (0 never rolls back)")
        require(self.max_rollbacks >= 0, "stability.max_rollbacks", self.max_rollbacks, "must be >= 0")


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
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv",
                         "dualpipev"] = "1f1b"
    pp_microbatches: int = 0  # 0: as many as pipeline stages
    pp_stages_per_rank: int = 0  # 0: 1, or 2 for schedules that need several stages per rank
    pp_split: Literal["even", "params", "flops"] = "even"  # how layers are balanced over stages
    pp_layers_per_stage: list[int] | None = None  # explicit split; overrides pp_split
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


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)

    def validate(self, world_size: int = 1) -> None:
        """Check every section, then what spans sections. Raises ConfigError (one line)."""
        for key, value in nonfinite_fields(self):  # also configs built in code, not only parsed ones
            raise ConfigError(key, value, "must be a finite number (not NaN or infinity)")
        for section in ("model", "data", "tokenizer", "optimizer", "scheduler", "train", "checkpoint", "metrics",
                        "stability"):
            getattr(self, section).validate()
        self.parallel.validate(world_size, self.model, self.train)
        t, m = self.train, self.model
        require(t.seq_len <= m.max_seq_len, "train.seq_len", t.seq_len,
                f"must be <= model.max_seq_len ({m.max_seq_len})")
        require(self.tokenizer.vocab_size <= m.vocab_size, "tokenizer.vocab_size", self.tokenizer.vocab_size,
                f"must be <= model.vocab_size ({m.vocab_size})")
        dp = self.parallel.resolved(world_size).dp_degree
        per_step = t.micro_batch_size * dp
        require(t.global_batch_size % per_step == 0, "train.global_batch_size", t.global_batch_size,
                f"must be a multiple of train.micro_batch_size x data-parallel ranks ({t.micro_batch_size} x "
                f"{dp} = {per_step})")
        require(self.scheduler.warmup_steps <= t.steps, "scheduler.warmup_steps", self.scheduler.warmup_steps,
                f"must be <= train.steps ({t.steps})")
        self._check_pipeline_combinations(world_size)

    def _check_pipeline_combinations(self, world_size: int) -> None:
        """What the pipeline builder (lmforge.parallel.pp) and torch's schedules would refuse on
        every rank after launch, refused here once, before torchrun or a process group starts."""
        r = self.parallel.resolved(world_size)
        if r.pp <= 1:
            return
        stages = r.pp * r.stages_per_rank
        require(not self.model.tie_embeddings, "model.tie_embeddings", True,
                f"must be false with pipeline parallel (parallel.pp = {r.pp}): the embedding and the output "
                "projection live on different stages")
        schedule = self.parallel.pp_schedule
        require(not (self.train.compile and schedule in SPLIT_BACKWARD_SCHEDULES), "train.compile", True,
                f"must be false with parallel.pp_schedule = {schedule!r}, which splits the backward into input "
                "and weight passes (unsupported on compiled modules); or use gpipe, 1f1b, interleaved_1f1b, "
                "looped_bfs")
        micro = self.parallel.pp_microbatches or stages
        if schedule in ROUND_SCHEDULES:
            rounds = max(1, micro // r.pp)
            require(micro % rounds == 0, "parallel.pp_microbatches", micro,
                    f"must be a multiple of its rounds of pp ({rounds}) for {schedule!r}; e.g. a multiple of "
                    f"parallel.pp ({r.pp})")

    def accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on one data-parallel rank (gradient accumulation)."""
        dp = self.parallel.resolved(world_size).dp_degree
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)


def load_job_config(recipe: str | None, overrides: list[tuple[str, str]] | None = None,
                    world_size: int = 1) -> JobConfig:
    """Recipe TOML (optional) + overrides -> validated JobConfig."""
    data = load_toml(recipe) if recipe else {}
    cfg = build_dataclass(JobConfig, data, where=str(recipe) if recipe else None)
    for key, value in overrides or []:
        apply_override(cfg, key, value)
    cfg.validate(world_size)
    return cfg

"""Component configs. Each component owns one small dataclass with its own range checks; the
JobConfig ties them together and checks what spans components (heads vs width, batch vs ranks).

Validation happens before any process group starts (see `lmforge.cli`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.config.checks import require, require_positive
from lmforge.config.comm import FSDP_COMPRESSORS, CommConfig, resolve_node_size
from lmforge.config.distill import DistillConfig
from lmforge.config.energy import EnergyConfig
from lmforge.config.loader import ConfigError, apply_override, build_dataclass, load_toml, nonfinite_fields
from lmforge.config.model import ModelConfig
from lmforge.config.parallel import ROUND_SCHEDULES, SPLIT_BACKWARD_SCHEDULES, ParallelConfig
from lmforge.config.train import TrainConfig


@dataclass
class DataConfig:
    """Where the corpus comes from and where packed token shards live."""

    corpus: str = "default"  # "default" (embedded packages) or a path to a .jsonl file of {"text": ...}
    dir: str = "data/default"  # working dir: corpus.jsonl, tokenizer.json, packed shards
    val_fraction: float = 0.01
    seed: int = 1234
    max_documents: int | None = None  # cap for quick runs and tests
    # Reed-Solomon pieces of each token file (lmforge.data.erasure): any erasure_m of the
    # erasure_k + erasure_m pieces may be lost; storage (k + m) / k. 0 / 0 = off.
    erasure_k: int = 0
    erasure_m: int = 0
    # The default corpus goes through the document pipeline (normalize, quality, exact and near
    # dedup, domain labels: lmforge.data.prepare_pipeline) before the tokenizer; "none" skips it.
    pipeline: Literal["default", "none"] = "default"
    # Domain mixing of the training stream (packs with domains; lmforge.data.mixing): explicit
    # "domain:weight" entries (normalised; a domain left out gets 0), or, when empty, weights
    # p_d ∝ train_tokens_d^(1/mixing_temperature) (1: natural proportions; larger: flatter).
    domain_weights: list[str] = field(default_factory=list)
    mixing_temperature: float = 1.0
    # Curriculum: the weights move linearly to domain_weights_end (empty: the temperature rule
    # again) over the first curriculum_steps optimizer steps, then stay (0: off).
    domain_weights_end: list[str] = field(default_factory=list)
    curriculum_steps: int = 0
    mixing_resolved: str = ""  # written by the trainer: the weights it sampled (config.json)
    # Replay (continual pre-training, lmforge.data.mixing: ReplaySchedule): this fraction of every
    # global batch comes from the old domains, the rest from the main mixture above (the new
    # domains). replay_domains: "domain:weight" entries, none of them in the main mixture; empty:
    # every domain the main mixture leaves at 0, by mixing_temperature. 0: off.
    replay_fraction: float = 0.0
    replay_domains: list[str] = field(default_factory=list)

    def validate(self) -> None:
        require(0.0 < self.val_fraction < 0.5, "data.val_fraction", self.val_fraction, "must be in (0, 0.5)")
        require(self.mixing_temperature > 0, "data.mixing_temperature", self.mixing_temperature, "must be > 0")
        require(self.curriculum_steps >= 0, "data.curriculum_steps", self.curriculum_steps, "must be >= 0")
        require(not self.domain_weights_end or self.curriculum_steps > 0, "data.domain_weights_end",
                self.domain_weights_end, "needs data.curriculum_steps > 0")
        for key in ("domain_weights", "domain_weights_end", "replay_domains"):
            _check_weight_entries(getattr(self, key), f"data.{key}")
        require(0.0 <= self.replay_fraction < 1.0, "data.replay_fraction", self.replay_fraction,
                "must be in [0, 1) (e.g. 0.1: a tenth of each batch from the old domains; 0: off)")
        require(not self.replay_domains or self.replay_fraction > 0, "data.replay_domains", self.replay_domains,
                "needs data.replay_fraction > 0")
        if self.max_documents is not None:
            require(self.max_documents > 1, "data.max_documents", self.max_documents, "must be > 1")
        if self.erasure_k or self.erasure_m:
            require(self.erasure_k >= 1, "data.erasure_k", self.erasure_k,
                    "must be >= 1 data pieces when erasure coding is on (0 with erasure_m = 0: off)")
            require(self.erasure_m >= 1, "data.erasure_m", self.erasure_m,
                    "must be >= 1 parity pieces when erasure coding is on (0 with erasure_k = 0: off)")
            require(self.erasure_k + self.erasure_m <= 256, "data.erasure_m", self.erasure_m,
                    f"erasure_k + erasure_m must be <= 256 (zfec's limit); erasure_k = {self.erasure_k}")


def _check_weight_entries(entries: list[str], key: str) -> None:
    """Each "domain:weight" entry well formed, weights finite and >= 0, some > 0 (names are checked
    against the packed data's domains when the loader is built)."""
    seen: set[str] = set()
    for entry in entries:
        name, sep, value = entry.partition(":")
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        require(bool(sep) and bool(name.strip()) and w == w and w >= 0 and w != float("inf"), key, entry,
                "each entry must be 'domain:weight' with a finite weight >= 0")
        require(name.strip() not in seen, key, entry, f"domain {name.strip()!r} is listed twice")
        seen.add(name.strip())
    if entries:
        require(sum(float(e.partition(":")[2]) for e in entries) > 0, key, entries, "at least one weight must be > 0")


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    min_frequency: int = 2

    def validate(self) -> None:
        require(self.vocab_size >= 260, "tokenizer.vocab_size", self.vocab_size,
                "must be >= 260 (256 bytes plus special tokens)")
        require(self.vocab_size <= 2**32 - 1, "tokenizer.vocab_size", self.vocab_size, "must fit in uint32")
        require_positive("tokenizer", self, "min_frequency")


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
        require_positive("optimizer", self, "lr", "eps")
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
        require_positive("checkpoint", self, "interval", "keep_last", "memory_keep", "quant_block")
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
    # Per log window: seconds in compute, exposed communication, data, checkpoints, evaluation and
    # idle (time_*_s), the bound and an end-of-run summary line (observability/breakdown.py).
    breakdown: bool = True

    def validate(self) -> None:
        require_positive("metrics", self, "log_interval")
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
        require_positive("stability", self, "spike_window", "spike_min_history")
        require(self.spike_min_history <= self.spike_window, "stability.spike_min_history",
                self.spike_min_history, f"must be <= stability.spike_window ({self.spike_window})")
        require(self.spike_min_history >= 2, "stability.spike_min_history", self.spike_min_history,
                "must be >= 2 (a z-score needs a spread)")
        require(self.max_consecutive_spikes >= 0, "stability.max_consecutive_spikes", self.max_consecutive_spikes,
                "must be >= 0 (0 never rolls back)")
        require(self.max_rollbacks >= 0, "stability.max_rollbacks", self.max_rollbacks, "must be >= 0")


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
    comm: CommConfig = field(default_factory=CommConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def validate(self, world_size: int = 1) -> None:
        """Check every section, then what spans sections. Raises ConfigError (one line)."""
        for key, value in nonfinite_fields(self):  # also configs built in code, not only parsed ones
            raise ConfigError(key, value, "must be a finite number (not NaN or infinity)")
        for section in ("model", "data", "tokenizer", "optimizer", "scheduler", "train", "checkpoint", "metrics",
                        "stability", "comm", "energy", "distill"):
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
        t.check_unfreeze_layers(m.n_layers)
        self._check_pipeline_combinations(world_size)
        r = self.parallel.resolved(world_size)
        layout = {"parallel.tp": r.tp, "parallel.pp": r.pp, "parallel.ep": r.ep}
        for key, degree in layout.items():  # uneven batches only where every rank holds whole samples
            require(not self.comm.load_balance or degree == 1, "comm.load_balance", True,
                    f"works with data parallelism only (DDP, FSDP2): turn it off or set {key} = 1 (is {degree})")
        require(not self.comm.load_balance or m.moe.n_experts == 0, "comm.load_balance", True,
                "does not weight MoE router losses by tokens: turn it off for MoE models (model.moe.n_experts > 0)")
        self._check_hierarchical(world_size)
        self._check_comm_combinations(world_size)
        self.distill.validate_layout(r.tp, r.pp, r.ep, m.vocab_size)
        self._check_early_exit(r.tp, r.pp)

    def _check_early_exit(self, tp: int, pp: int) -> None:
        """The exit loss (train/exit_loss.py) needs every exit's whole-vocabulary logits on the rank
        that runs the exit's blocks: data parallelism only (DDP, FSDP2, HSDP; EP inside it)."""
        ee = self.model.early_exit
        if not ee.layers or ee.loss_weight == 0:
            return
        for key, degree, why in (("parallel.pp", pp, "pipeline stages hold the exits' blocks apart from the LM head"),
                                 ("parallel.tp", tp, "tensor parallelism shards the logits over the vocabulary")):
            require(degree == 1, key, degree, f"must be 1 with model.early_exit.layers = {ee.layers} (exit loss "
                    f"weight {ee.loss_weight}): {why}; train exits with data parallelism (DDP, FSDP2, HSDP)")

    def _check_comm_combinations(self, world_size: int) -> None:
        """Gradient compression needs data-parallel ranks; FSDP2 can only cast (its reduce dtype)."""
        kind, r = self.comm.compression, self.parallel.resolved(world_size)
        if kind == "none":
            return
        require(r.dp_degree > 1, "comm.compression", kind,
                f"compresses data-parallel gradients, and this layout has one data-parallel rank (dp_replicate "
                f"x dp_shard = {r.dp_replicate} x {r.dp_shard}): nothing would be compressed; use 'none'")
        require(r.dp_shard == 1 or kind in FSDP_COMPRESSORS, "comm.compression", kind,
                f"not supported with FSDP2 (parallel.dp_shard = {r.dp_shard} > 1): use bf16/fp16 or DDP "
                "(parallel.dp_replicate)")
        require(r.dp_shard == 1 or self.comm.warmup_steps == 0, "comm.warmup_steps", self.comm.warmup_steps,
                f"needs DDP (the warm-up compressor is a DDP comm hook), and parallel.dp_shard = {r.dp_shard} > 1 "
                "is FSDP2: use 0 or parallel.dp_replicate")
        if self.comm.adam_moments == "local":
            self._check_local_moments(r.dp_shard)

    def _check_local_moments(self, dp_shard: int) -> None:
        """comm.adam_moments = "local": each rank's own optimizer moments, clipping and gradient
        scale decide what it sends, so whatever would read them per rank and act differently on
        each (a skipped step, a re-split batch) is refused; the replicas would drift apart."""
        local = "with comm.adam_moments = 'local' (each rank's AdamW moments of its own gradient)"
        require(dp_shard == 1, "parallel.dp_shard", dp_shard, f"must be 1 {local}: it runs under DDP "
                "(parallel.dp_replicate), not FSDP2")
        require(self.train.mixed_precision != "fp16", "train.mixed_precision", "fp16",
                f"is not supported {local}: fp16's loss scaler would skip steps on one rank and not another; "
                "use bf16 or fp32")
        require(not self.comm.load_balance, "comm.load_balance", True, f"must be false {local}: a rank's "
                "share of the batch would scale its gradient before its own normalisation")
        require(not self.stability.enabled, "stability.enabled", True, f"must be false {local}: the policy "
                "reads a gradient norm that differs per rank and could skip a step on one rank only")

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

    def _check_hierarchical(self, world_size: int) -> None:
        """comm.hierarchical is a DDP comm hook (lmforge.parallel.hierarchical): DDP over
        dp_replicate (which parallel.validate already keeps apart from tp and pp), uncompressed,
        node_size dividing the data-parallel degree."""
        if not self.comm.hierarchical:
            return
        r = self.parallel.resolved(world_size)
        require(self.comm.compression == "none", "comm.compression", self.comm.compression,
                "must be 'none' with comm.hierarchical = true (the two do not compose yet)")
        require(r.dp_shard == 1, "parallel.dp_shard", r.dp_shard,
                "must be 1 with comm.hierarchical (DDP); under FSDP2 use HSDP instead, already two-level: "
                "parallel.dp_replicate = nodes x parallel.dp_shard = ranks per node")
        node = resolve_node_size(self.comm.node_size)
        require(node == 0 or r.dp_replicate % node == 0, "comm.node_size", node,
                f"must divide the data-parallel degree parallel.dp_replicate ({r.dp_replicate}) for "
                "comm.hierarchical (0: LOCAL_WORLD_SIZE)")

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

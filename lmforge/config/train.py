"""The `[train]` section: steps, batch, precision, device, evaluation and the run directory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.config.checks import require, require_positive


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
    # fp32 CPU matmuls of a one-process run: "auto" fuses q/k/v and gate/up and, on AVX512/AMX CPUs,
    # times torch's GEMM against oneDNN's per shape (models/common/linear.py); "plain": F.linear
    # per layer, what every multi-process layout runs, so a one-process run can be compared with
    # one bit for bit (on AVX2-only CPUs "auto" already is "plain")
    matmul_kernels: Literal["auto", "plain"] = "auto"
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
        require_positive("train", self, "steps", "seq_len", "global_batch_size", "micro_batch_size", "eval_batches",
                  "ac_every")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "must be >= 0 (0 disables)")
        require(self.eval_interval >= 0, "train.eval_interval", self.eval_interval, "must be >= 0 (0 disables)")
        require(self.output_dir != "", "train.output_dir", self.output_dir, "must be a non-empty path")
        if self.stop_at is not None:
            require(0 < self.stop_at <= self.steps, "train.stop_at", self.stop_at,
                    f"must be in [1, train.steps = {self.steps}]")

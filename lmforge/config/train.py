"""The `[train]` section: steps, batch, precision, device, evaluation and the run directory."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from lmforge.config.checks import require, require_positive

LAYER_SPEC = re.compile(r"top:(\d+)|all")


@dataclass
class UnfreezeStage:
    """One stage of gradual unfreezing (`train.unfreeze`): from optimizer step `step + 1` on, the
    layers `layers` train ("top:N": the output head and final norm plus the top N blocks; "all":
    every parameter, embeddings too), and the token embeddings as well when `embeddings` (with
    "top:0": the new-language recipe of training the embeddings and the head around a frozen body
    first). `lr_scale` multiplies the learning rate of the layers this stage adds (those the
    previous stage did not train), for the rest of the run: lower layers, unfrozen later, usually
    at a smaller rate (lmforge/train/continual.py)."""

    step: int = 0
    layers: str = "all"
    lr_scale: float = 1.0
    embeddings: bool = False

    def reach(self) -> float:
        """The stage's extent in blocks, for ordering stages: N of "top:N", infinity for "all"."""
        return math.inf if self.layers == "all" else int(self.layers.split(":")[1])

    def trains_embeddings(self) -> bool:
        """Whether the token embeddings train from this stage on ("all", or `embeddings`)."""
        return self.embeddings or self.layers == "all"

    def blocks(self, n_layers: int) -> int:
        """How many blocks (from the top) this stage trains; n_layers + 1 for "all" (embeddings too)."""
        return n_layers + 1 if self.layers == "all" else int(self.layers.split(":")[1])


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
    # "auto": when training on the CPU, glibc keeps freed memory for the next step instead of
    # returning it to the kernel and faulting it back (train/host_allocator.py: 12-31% more tokens/s
    # on a Zen 3; the process's resident size stays near its peak); "system": malloc as the process started
    host_allocator: Literal["auto", "system"] = "auto"
    # "full": initialise the whole model, then shard (all layouts start from the same weights);
    # "sharded": initialise shards after sharding (any size); "auto": full up to 2 GiB of weights.
    init: Literal["auto", "full", "sharded"] = "auto"
    # Stop this run after this step although the schedule spans `steps` (Megatron's exit interval):
    # for time-limited cluster jobs that resume later, and for resume tests.
    stop_at: int | None = None
    # Debug: write <output_dir>/trace/rank<r>.jsonl, per step the loader positions and window ids
    # this rank consumed (to check that resumes and resharding see each sample exactly once).
    trace_samples: bool = False
    # Continual pre-training (lmforge/train/continual.py): start from the model weights of this run
    # directory (its newest valid checkpoint) or checkpoint step directory; a fresh optimizer, LR
    # schedule and step 0 ("": off). A resume of this run's own checkpoints takes precedence.
    init_from: str = ""
    # Gradual unfreezing, top first: [{step = 0, layers = "top:1", lr_scale = 1.0}, {step = 50,
    # layers = "all", lr_scale = 0.3}]; empty: every layer trains from the start (UnfreezeStage).
    # `embeddings = true` adds the token embeddings to a "top:N" stage (and must stay in later ones).
    unfreeze: list[UnfreezeStage] = field(default_factory=list)

    def validate(self) -> None:
        require_positive("train", self, "steps", "seq_len", "global_batch_size", "micro_batch_size", "eval_batches",
                  "ac_every")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "must be >= 0 (0 disables)")
        require(self.eval_interval >= 0, "train.eval_interval", self.eval_interval, "must be >= 0 (0 disables)")
        require(self.output_dir != "", "train.output_dir", self.output_dir, "must be a non-empty path")
        if self.stop_at is not None:
            require(0 < self.stop_at <= self.steps, "train.stop_at", self.stop_at,
                    f"must be in [1, train.steps = {self.steps}]")
        self._check_unfreeze()

    def _check_unfreeze(self) -> None:
        """Stages in increasing steps from 0 (before train.steps), layer specs "top:N" or "all",
        each training more layers than the one before (never fewer blocks, never the embeddings
        again frozen), lr_scale in (0, 10]."""
        previous: UnfreezeStage | None = None
        for i, st in enumerate(self.unfreeze):
            key = f"train.unfreeze[{i}]"
            require(LAYER_SPEC.fullmatch(st.layers) is not None, f"{key}.layers", st.layers,
                    "must be 'top:N' (the output head and the top N blocks) or 'all' (every layer, embeddings too)")
            require(0 < st.lr_scale <= 10, f"{key}.lr_scale", st.lr_scale, "must be in (0, 10]")
            if previous is None:
                require(st.step == 0, f"{key}.step", st.step, "the first stage must start at step 0")
            else:
                require(st.step > previous.step, f"{key}.step", st.step,
                        f"must be greater than the previous stage's step ({previous.step})")
                require(st.reach() >= previous.reach(), f"{key}.layers", st.layers,
                        f"must train more layers than the previous stage ({previous.layers!r})")
                require(st.trains_embeddings() or not previous.trains_embeddings(), f"{key}.embeddings",
                        st.embeddings, "must be true: the previous stage trains the embeddings, and a stage "
                        "freezes nothing again (set embeddings = true, or layers = 'all')")
                require(st.reach() > previous.reach() or st.trains_embeddings() > previous.trains_embeddings(),
                        f"{key}.layers", st.layers, f"must train more layers than the previous stage "
                        f"({previous.layers!r}{', embeddings' if previous.embeddings else ''})")
            require(st.step < self.steps, f"{key}.step", st.step,
                    f"must be < train.steps ({self.steps}): a stage starting later never trains")
            previous = st

    def check_unfreeze_layers(self, n_layers: int) -> None:
        """Every "top:N" names blocks the model has (N <= model.n_layers)."""
        for i, st in enumerate(self.unfreeze):
            require(st.reach() <= n_layers or st.layers == "all", f"train.unfreeze[{i}].layers", st.layers,
                    f"the model has {n_layers} blocks (model.n_layers): use top:0 to top:{n_layers}, or 'all'")

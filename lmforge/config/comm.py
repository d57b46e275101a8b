"""Data-parallel gradient communication (lmforge.parallel.comm): compression with error feedback,
hierarchical all-reduce, and load balancing across uneven ranks.

Compressors (DeepSpeed 1-bit Adam / ZeRO++, PowerSGD: Vogels et al., 2019): "bf16" / "fp16" cast
the gradient for the reduction; "int8" / "int4" / "int2" (ternary) quantise it with one absmax
scale per `quant_block` values; "topk" sends the `topk_fraction` largest-magnitude values and their indices;
"powersgd" sends rank-`powersgd_rank` factors of each matrix. With `error_feedback` what a
compressor dropped this step is added to the next step's gradient (the residuals are saved in
checkpoints; a resume on another number of ranks starts them from zero). Under FSDP2 only the
casts run, as FSDP's reduce dtype and without error feedback (FSDP casts inside its own
reduce-scatter); the rest are refused there, and so is any compression with one data-parallel
rank (nothing to compress). DDP: lmforge/parallel/comm/.

`warmup_steps` (element-wise compressors): the first optimizer steps reduce the gradients through
`warmup_compression` (a dense cheap one; its bytes counted) before `compression` takes over, as
torch's PowerSGD starts after plain steps (`powersgd_start_step`): the early gradients move the
model most, and top-k 1% would send 1% of them. Measured (docs/benchmarks.md): on tiny-dense it did
not move top-k 1% measurably (0.906 and 0.916 of the baseline's loss in two runs a rounding apart,
0.909 without); on the 0.16M-parameter model 0.949, from 0.942.

`adam_variance = "frozen"` (1-bit Adam, Tang et al. 2021; needs `warmup_steps`): AdamW normalises
each coordinate by its own running mean square, so a coordinate top-k rarely sends, whose held-back
gradients error feedback releases as one spike, moves a few lr steps instead of the many it stands
for. Frozen after the warm-up, the second moment makes the update linear in the gradient, so the
delayed mass is not lost (lmforge/train/frozen_adamw.py); top-k then picks values by the update
they make. Measured: better than AdamW on the 0.16M-parameter model (0.961), worse on tiny-dense
(0.897); so "adaptive" stays the default.

`topk_payload = "compact"` halves top-k's bytes (bf16 values, 16-bit positions inside 64 Ki
windows with one count per window): the bytes a run may spend at a given ratio then pay for a
longer dense warm-up. Measured on tiny-dense (docs/benchmarks.md): 55 int4 steps then compact
top-k 1% reached 0.944 of the baseline's loss at 31.4x fewer bytes.

`adam_moments = "local"` (element-wise compressors, DDP): AdamW's moments move from after the
reduction to before it. Each rank keeps them for its own gradient (clipped to
`train.max_grad_norm` on that rank) and sends its update lr x m_hat / (sqrt(v_hat) + eps) through
the compressor and error feedback. The ranks' averaged updates are then applied with decoupled
weight decay (lmforge/parallel/comm/local_moments.py). Why, for top-k: AdamW after the reduction
sees a coordinate's held-back gradients arrive as one burst tens of steps late and normalises it
down to a few lr steps. Here what is held back is already AdamW's step, scaled by the lr of the
step that made it, so the weights move as far as dense AdamW's would, only later. DGC (Lin et al.
2018) carries momentum through the residual the same way. Measured on tiny-dense (docs/benchmarks.md):
top-k 1% after 55 int4 steps reached 0.972 / 0.964 / 0.970 of the baseline's loss at three seeds
(31.4x fewer bytes), where "global" reached 0.944 / 0.938; after 120 ternary steps (`int2`, the
same bytes buy twice the steps) 0.978 / 0.972 / 0.972 (30.7x). No overlap: the updates travel
after backward, in the optimizer step.

`hierarchical`: the all-reduce runs inside each node, then across nodes, then back inside
(`node_size` ranks per node; 0: torchrun's LOCAL_WORLD_SIZE). `load_balance`: a persistently
slower rank gets fewer samples of the global batch (losses and gradients weighted by tokens, so
the update equals the balanced one)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from lmforge.config.checks import require, require_positive

COMPRESSORS = ("none", "bf16", "fp16", "int8", "int4", "int2", "topk", "powersgd")
# What FSDP2's reduce-scatter can do in our torch range: a reduce dtype, nothing else.
FSDP_COMPRESSORS = ("none", "bf16", "fp16")
# The element-wise compressors of the DDP hook (parallel/comm/ddp_hooks.py): what a warm-up and a
# frozen second moment work with; what can run the warm-up ("none": the plain fp32 all-reduce)
ELEMENTWISE_COMPRESSORS = ("bf16", "fp16", "int8", "int4", "int2", "topk")
WARMUP_COMPRESSORS = ("none", "bf16", "fp16", "int8", "int4", "int2")


@dataclass
class CommConfig:
    compression: Literal[COMPRESSORS] = "none"
    error_feedback: bool = True
    quant_block: int = 256  # values per absmax scale (int8, int4, int2)
    topk_fraction: float = 0.01  # of each gradient bucket's values sent (topk)
    # "fp32": fp32 values + int32 positions (8 bytes a value); "compact": bf16 values + 16-bit
    # positions in 64 Ki windows (4 bytes a value, + 4 per window)
    topk_payload: Literal["fp32", "compact"] = "fp32"
    powersgd_rank: int = 4
    # optimizer steps of plain all-reduce before PowerSGD starts (torch's start_powerSGD_iter, >= 2;
    # torch suggests ~10% of the run: early gradients are the most sensitive to approximation)
    powersgd_start_step: int = 2
    hierarchical: bool = False
    node_size: int = 0  # ranks per node; 0: LOCAL_WORLD_SIZE (torchrun)
    load_balance: bool = False
    load_balance_interval: int = 10  # optimizer steps between re-splits of the global batch
    warmup_steps: int = 0  # first optimizer steps through warmup_compression (element-wise compressors)
    warmup_compression: Literal[WARMUP_COMPRESSORS] = "int4"
    # "frozen": AdamW's second moment frozen after warmup_steps (1-bit Adam, for top-k); "adaptive": AdamW
    adam_variance: Literal["adaptive", "frozen"] = "adaptive"
    # "local": each rank's AdamW moments of its own gradient, its update compressed (see above);
    # "global": AdamW after the reduction, on the averaged gradient
    adam_moments: Literal["global", "local"] = "global"

    def validate(self) -> None:
        require_positive("comm", self, "quant_block", "powersgd_rank", "load_balance_interval")
        require(0.0 < self.topk_fraction <= 1.0, "comm.topk_fraction", self.topk_fraction, "must be in (0, 1]")
        require(self.powersgd_start_step >= 2, "comm.powersgd_start_step", self.powersgd_start_step,
                "must be >= 2 (torch's PowerSGD hook with error feedback and warm start)")
        require(self.node_size >= 0, "comm.node_size", self.node_size, "must be >= 0 (0: LOCAL_WORLD_SIZE)")
        for kind, per_byte in (("int4", 2), ("int2", 4)):
            used = self.compression == kind or (self.warmup_steps > 0 and self.warmup_compression == kind)
            require(not used or self.quant_block % per_byte == 0, "comm.quant_block", self.quant_block,
                    f"must be a multiple of {per_byte} with {kind} ({per_byte} values per byte)")
        require(self.warmup_steps >= 0, "comm.warmup_steps", self.warmup_steps, "must be >= 0 (0: no warm-up)")
        elementwise = ", ".join(ELEMENTWISE_COMPRESSORS)
        require(self.warmup_steps == 0 or self.compression in ELEMENTWISE_COMPRESSORS, "comm.warmup_steps",
                self.warmup_steps, f"needs an element-wise comm.compression ({elementwise}), not "
                f"{self.compression!r} (PowerSGD: comm.powersgd_start_step)")
        require(self.topk_payload == "fp32" or self.compression == "topk", "comm.topk_payload", self.topk_payload,
                f"applies to comm.compression = 'topk' only, not {self.compression!r}; leave it at 'fp32'")
        require(self.adam_variance == "adaptive" or self.warmup_steps > 0, "comm.adam_variance", self.adam_variance,
                "'frozen' needs comm.warmup_steps >= 1 (the AdamW steps that estimate the second moment), "
                "and an element-wise comm.compression; or use 'adaptive'")

        require(self.adam_moments == "global" or self.compression in ELEMENTWISE_COMPRESSORS, "comm.adam_moments",
                self.adam_moments, f"'local' needs an element-wise comm.compression ({elementwise}), not "
                f"{self.compression!r}; or use 'global'")
        require(self.adam_moments == "global" or self.adam_variance == "adaptive", "comm.adam_moments",
                self.adam_moments, "'local' keeps each rank's own adaptive second moment: it needs "
                "comm.adam_variance = 'adaptive', not 'frozen'")

    def variance_freeze_step(self) -> int:
        """Optimizer steps after which AdamW's second moment is frozen (0: never)."""
        return self.warmup_steps if self.adam_variance == "frozen" else 0


def resolve_node_size(node_size: int) -> int:
    """Ranks per node for `comm.hierarchical`: `node_size`, or for 0 the LOCAL_WORLD_SIZE torchrun
    sets (0 when unknown: a launcher before torchrun, or a plain process)."""
    return node_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0"))

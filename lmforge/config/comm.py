"""Data-parallel gradient communication (lmforge.parallel.comm): compression with error feedback,
hierarchical all-reduce, and load balancing across uneven ranks.

Compressors (DeepSpeed 1-bit Adam / ZeRO++, PowerSGD: Vogels et al., 2019): "bf16" / "fp16" cast
the gradient for the reduction; "int8" / "int4" quantise it with one absmax scale per
`quant_block` values; "topk" sends the `topk_fraction` largest-magnitude values and their indices;
"powersgd" sends rank-`powersgd_rank` factors of each matrix. With `error_feedback` what a
compressor dropped this step is added to the next step's gradient (the residuals are saved in
checkpoints; a resume on another number of ranks starts them from zero). Under FSDP2 only the
casts run, as FSDP's reduce dtype and without error feedback (FSDP casts inside its own
reduce-scatter); the rest are refused there, and so is any compression with one data-parallel
rank (nothing to compress). DDP: lmforge/parallel/comm/.

`hierarchical`: the all-reduce runs inside each node, then across nodes, then back inside
(`node_size` ranks per node; 0: torchrun's LOCAL_WORLD_SIZE). `load_balance`: a persistently
slower rank gets fewer samples of the global batch (losses and gradients weighted by tokens, so
the update equals the balanced one)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from lmforge.config.checks import require, require_positive

COMPRESSORS = ("none", "bf16", "fp16", "int8", "int4", "topk", "powersgd")
# What FSDP2's reduce-scatter can do in our torch range: a reduce dtype, nothing else.
FSDP_COMPRESSORS = ("none", "bf16", "fp16")


@dataclass
class CommConfig:
    compression: Literal[COMPRESSORS] = "none"
    error_feedback: bool = True
    quant_block: int = 256  # values per absmax scale (int8, int4)
    topk_fraction: float = 0.01  # of each gradient bucket's values sent (topk)
    powersgd_rank: int = 4
    # optimizer steps of plain all-reduce before PowerSGD starts (torch's start_powerSGD_iter, >= 2;
    # torch suggests ~10% of the run: early gradients are the most sensitive to approximation)
    powersgd_start_step: int = 2
    hierarchical: bool = False
    node_size: int = 0  # ranks per node; 0: LOCAL_WORLD_SIZE (torchrun)
    load_balance: bool = False
    load_balance_interval: int = 10  # optimizer steps between re-splits of the global batch

    def validate(self) -> None:
        require_positive("comm", self, "quant_block", "powersgd_rank", "load_balance_interval")
        require(0.0 < self.topk_fraction <= 1.0, "comm.topk_fraction", self.topk_fraction, "must be in (0, 1]")
        require(self.powersgd_start_step >= 2, "comm.powersgd_start_step", self.powersgd_start_step,
                "must be >= 2 (torch's PowerSGD hook with error feedback and warm start)")
        require(self.node_size >= 0, "comm.node_size", self.node_size, "must be >= 0 (0: LOCAL_WORLD_SIZE)")
        require(self.compression != "int4" or self.quant_block % 2 == 0, "comm.quant_block", self.quant_block,
                "must be even with int4 (two values per byte)")


def resolve_node_size(node_size: int) -> int:
    """Ranks per node for `comm.hierarchical`: `node_size`, or for 0 the LOCAL_WORLD_SIZE torchrun
    sets (0 when unknown: a launcher before torchrun, or a plain process)."""
    return node_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0"))

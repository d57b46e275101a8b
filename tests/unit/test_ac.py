"""Op-level activation checkpointing keeps the outputs of the expensive ops: in backward no matmul
(dense or grouped expert) and no attention kernel runs a second time; elementwise ops do."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmforge.config import ModelConfig, MoEConfig
from lmforge.models.llama import build_model
from lmforge.parallel.ac import SAVED_OPS, apply_activation_checkpointing

MOE = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=32,
                  moe=MoEConfig(n_experts=4, top_k=2))


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def op_counts(mode: str) -> Counter:
    model = build_model(MOE, seed=0)
    apply_activation_checkpointing(model, mode)
    x = torch.randint(0, MOE.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with OpCounter() as counter:
        model(x).sum().backward()
    return counter.counts


def test_op_mode_recomputes_no_matmul_nor_attention() -> None:
    none, op, full = op_counts("none"), op_counts("op"), op_counts("full")
    grouped = torch.ops.aten._grouped_mm.default
    assert none[grouped] > 0, "the MoE layers did not take the grouped matmul path"
    assert op[grouped] == none[grouped], "grouped expert matmuls ran again in backward"
    for saved in SAVED_OPS:
        assert op[saved] == none[saved], f"{saved} ran again in backward under op-level checkpointing"
    assert full[grouped] > none[grouped]  # full recomputation does run them again (the test can tell)
    silu = torch.ops.aten.silu.default
    assert op[silu] > none[silu]  # cheap elementwise ops are recomputed

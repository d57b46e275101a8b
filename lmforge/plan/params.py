"""The parameter tensors of a Llama-family model, from its config alone (no model code): name,
shape, layer and how tensor / expert parallelism shards it. The memory model sums their local
shards per rank; tests/unit/test_plan_memory.py holds the total to the family's own count
(lmforge/models/registry.py), so the two cannot drift apart."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lmforge.config import ConfigError, ModelConfig

# How tensor parallelism splits a tensor (lmforge/models/llama/tp_plan.py): "col" shards dim 0
# (wq/wk/wv, w1/w3, output, embedding rows), "row" shards dim 1 (wo, w2), "rep" replicates
# (norms; MoE layers are replicated over tp, expert parallel splits them instead).
TP_STYLES = ("col", "row", "rep")


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple[int, ...]
    layer: int | None  # None: embedding (stage 0) or final norm / output (last stage)
    tp: str  # one of TP_STYLES
    expert: bool = False  # routed expert weights: dim 0 split over ep
    matmul: bool = True  # used as a matmul weight (saved for backward under FSDP)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def param_tensors(m: ModelConfig, layers: Iterable[int] | None = None, first: bool = True,
                  last: bool = True) -> list[ParamTensor]:
    """Every parameter tensor of the model, in order (tied output counted once, as the embedding).
    A pipeline stage asks for its `layers` only, with the embedding (`first`) and the final norm
    and output (`last`) where it holds them: building all layers for each of pp stages made a
    prediction O(pp x layers) (the at-scale sweep predicts hundreds of layouts)."""
    if m.family != "llama":
        raise ConfigError("model.family", m.family, "the planner knows the 'llama' family only")
    d, h, kv, hd = m.dim, m.n_heads, m.kv_heads, m.head_dim
    out = [ParamTensor("tok_embeddings.weight", (m.vocab_size, d), None, "col", matmul=False)] if first else []
    for i in (range(m.n_layers) if layers is None else sorted(layers)):
        p = f"layers.{i}."
        out.append(ParamTensor(p + "attention_norm.weight", (d,), i, "rep", matmul=False))
        out += [ParamTensor(p + "attention.wq.weight", (h * hd, d), i, "col"),
                ParamTensor(p + "attention.wk.weight", (kv * hd, d), i, "col"),
                ParamTensor(p + "attention.wv.weight", (kv * hd, d), i, "col"),
                ParamTensor(p + "attention.wo.weight", (d, h * hd), i, "row")]
        if m.qkv_bias:
            out += [ParamTensor(p + f"attention.{w}.bias", (n,), i, "col", matmul=False)
                    for w, n in (("wq", h * hd), ("wk", kv * hd), ("wv", kv * hd))]
        out.append(ParamTensor(p + "ffn_norm.weight", (d,), i, "rep", matmul=False))
        if not m.is_moe_layer(i):
            f = m.ffn_hidden_size
            out += [ParamTensor(p + "feed_forward.w1.weight", (f, d), i, "col"),
                    ParamTensor(p + "feed_forward.w3.weight", (f, d), i, "col"),
                    ParamTensor(p + "feed_forward.w2.weight", (d, f), i, "row")]
            continue
        e, f = m.moe.n_experts, m.expert_hidden_size
        out += [ParamTensor(p + "feed_forward.gate.weight", (e, d), i, "rep"),
                ParamTensor(p + "feed_forward.experts.w1", (e, f, d), i, "rep", expert=True),
                ParamTensor(p + "feed_forward.experts.w3", (e, f, d), i, "rep", expert=True),
                ParamTensor(p + "feed_forward.experts.w2", (e, d, f), i, "rep", expert=True)]
        if m.moe.n_shared_experts:
            fs = m.moe.n_shared_experts * f
            out += [ParamTensor(p + "feed_forward.shared_experts.w1.weight", (fs, d), i, "rep"),
                    ParamTensor(p + "feed_forward.shared_experts.w3.weight", (fs, d), i, "rep"),
                    ParamTensor(p + "feed_forward.shared_experts.w2.weight", (d, fs), i, "rep")]
        if m.moe.shared_expert_gate:
            out.append(ParamTensor(p + "feed_forward.shared_expert_gate.weight", (1, d), i, "rep"))
    if last:
        out.append(ParamTensor("norm.weight", (d,), None, "rep", matmul=False))
        if not m.tie_embeddings:
            out.append(ParamTensor("output.weight", (m.vocab_size, d), None, "col"))
    return out


def total_params(m: ModelConfig) -> int:
    return sum(t.numel for t in param_tensors(m))


def stage_layers(m: ModelConfig, n_stages: int, explicit: list[int] | None = None) -> list[list[int]]:
    """Layers per pipeline stage: `pp_layers_per_stage`, else the "even" split of
    lmforge/parallel/pp.py (the first stages take one extra layer when uneven). The "params" and
    "flops" splits are predicted as "even" (they differ by at most a layer at these sizes)."""
    counts = explicit or [m.n_layers // n_stages + (1 if s < m.n_layers % n_stages else 0) for s in range(n_stages)]
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out

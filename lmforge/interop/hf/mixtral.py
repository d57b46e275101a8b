"""Hugging Face Mixtral (`MixtralForCausalLM`): every layer MoE, no shared expert, no biases, and
the top-k weights always renormalised (so top-1, whose weight would become 1.0, is refused)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmforge.config import ModelConfig
from lmforge.interop.hf.llama import decoder_fields
from lmforge.interop.hf.moe import MoEAdapter, config_error, positive_int


class MixtralAdapter(MoEAdapter):
    """Mixtral: the expert width is `intermediate_size`; experts named w1 / w3 / w2."""

    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    display_name = "Mixtral"
    moe_hf_prefix = "block_sparse_moe"
    expert_hf_names = {"w1": "w1", "w3": "w3", "w2": "w2"}

    def family_refusal(self, cfg: ModelConfig) -> str | None:
        m, out = cfg.moe, []
        if m.n_shared_experts:
            out.append(f"model.moe.n_shared_experts = {m.n_shared_experts} (Mixtral has none)")
        if not all(cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
            out.append("dense layers (Mixtral: every layer MoE)")
        if cfg.qkv_bias:
            out.append("model.qkv_bias = true (Mixtral: no bias)")
        if not m.norm_topk or m.top_k == 1:
            out.append(f"top_k = {m.top_k}, norm_topk = {m.norm_topk} (Mixtral renormalises top_k >= 2 weights)")
        return "no " + "; ".join(out) if out else None

    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        return dict(intermediate_size=cfg.expert_hidden_size, num_local_experts=cfg.moe.n_experts,
                    sliding_window=None, router_jitter_noise=0.0)

    def family_fields(self, d: Mapping[str, Any], max_positions: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Refuses sliding-window attention, router jitter and top-1 (renormalised to 1.0)."""
        fields = decoder_fields(d)
        n_experts = positive_int(d, "num_local_experts")
        window = d.get("sliding_window")
        if window is not None and window < max_positions:
            raise config_error(d, "sliding_window", f"sliding-window attention is not supported; must be null "
                                                    f"or >= max_position_embeddings ({max_positions})")
        if d.get("router_jitter_noise", 0.0):
            raise config_error(d, "router_jitter_noise", "router jitter is not supported; must be 0")
        moe = dict(n_experts=n_experts, top_k=positive_int(d, "num_experts_per_tok"), norm_topk=True,
                   expert_hidden=fields["ffn_hidden"])
        if moe["top_k"] == 1:
            raise config_error(d, "num_experts_per_tok", "Mixtral renormalises the top-1 weight to 1.0, which "
                                                         "lmforge cannot express; must be >= 2")
        return {**fields, "qkv_bias": False}, moe

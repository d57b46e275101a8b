"""Hugging Face Qwen2-MoE (`Qwen2MoeForCausalLM`): q/k/v biases, one shared SwiGLU expert scaled
by sigmoid(shared_expert_gate(x)), top-k weights renormalised only with `norm_topk_prob`, and
dense layers chosen by `decoder_sparse_step` / `mlp_only_layers` (their width
`intermediate_size`, the experts' `moe_intermediate_size`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.interop.hf.llama import decoder_fields
from lmforge.interop.hf.moe import MoEAdapter, config_error, positive_int


class Qwen2MoeAdapter(MoEAdapter):
    """Qwen2-MoE: experts named gate_proj / up_proj / down_proj under `mlp`."""

    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    display_name = "Qwen2-MoE"
    moe_hf_prefix = "mlp"
    expert_hf_names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

    def family_refusal(self, cfg: ModelConfig) -> str | None:
        m = cfg.moe
        if not m.n_shared_experts or not m.shared_expert_gate:
            return (f"n_shared_experts = {m.n_shared_experts}, shared_expert_gate = {m.shared_expert_gate} "
                    "(Qwen2-MoE: one gated shared expert)")
        return None

    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        m = cfg.moe
        step, dense = _sparse_pattern(cfg)
        return dict(
            intermediate_size=cfg.ffn_hidden_size,
            moe_intermediate_size=cfg.expert_hidden_size,
            shared_expert_intermediate_size=m.n_shared_experts * cfg.expert_hidden_size,
            num_experts=m.n_experts,
            # Our top-1 weight is the softmax score (renormalising one weight would make it 1.0).
            norm_topk_prob=m.norm_topk and m.top_k > 1,
            decoder_sparse_step=step,
            mlp_only_layers=dense,
            # Always true: a model without q/k/v bias is exported with zero biases, so 4.x (which
            # always builds them) and 5.x load the same thing.
            qkv_bias=True,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=cfg.n_layers,
        )

    def family_fields(self, d: Mapping[str, Any], max_positions: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Refuses sliding-window attention, top-1 renormalisation, a shared expert whose width is
        not a multiple of the routed experts', and a layer pattern with no MoE layer."""
        fields = decoder_fields(d)
        n_experts = positive_int(d, "num_experts")
        expert_hidden = positive_int(d, "moe_intermediate_size")
        shared = d.get("shared_expert_intermediate_size")
        if not isinstance(shared, int) or shared <= 0 or shared % expert_hidden:
            raise config_error(d, "shared_expert_intermediate_size",
                               f"must be a positive multiple of moe_intermediate_size ({expert_hidden})")
        types = d.get("layer_types") or []
        if d.get("use_sliding_window", False) or any(t != "full_attention" for t in types):
            raise config_error(d, "use_sliding_window", "sliding-window attention is not supported; must be false")
        top_k, norm = positive_int(d, "num_experts_per_tok"), bool(d.get("norm_topk_prob", False))
        if top_k == 1 and norm:
            raise config_error(d, "norm_topk_prob", "renormalising the top-1 weight to 1.0 is not expressible; "
                                                    "must be false with num_experts_per_tok = 1")
        step = d.get("decoder_sparse_step", 1)
        if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
            raise config_error(d, "decoder_sparse_step", "must be a positive integer")
        only = d.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) and i >= 0 for i in only):
            raise config_error(d, "mlp_only_layers", "must be a list of layer indices")
        n_layers = fields["n_layers"]
        moe = dict(n_experts=n_experts, top_k=top_k, norm_topk=norm, n_shared_experts=shared // expert_hidden,
                   shared_expert_gate=True, first_k_dense=step - 1, layer_interval=step,
                   dense_layers=sorted({i for i in only if i < n_layers}), expert_hidden=expert_hidden)
        if not any((i + 1) % step == 0 and i not in only for i in range(n_layers)):
            raise config_error(d, "mlp_only_layers", "leaves no MoE layer (a dense model; not supported as qwen2_moe)")
        return {**fields, "qkv_bias": bool(d.get("qkv_bias", True))}, moe

    def shared_expert_hf_name(self, rest: str) -> str | None:
        if rest.startswith("feed_forward.shared_experts."):
            return f"mlp.shared_expert.{self.expert_hf_names[rest.split('.')[2]]}.weight"
        if rest == "feed_forward.shared_expert_gate.weight":
            return "mlp.shared_expert_gate.weight"
        return None

    def to_hf_state_dict(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Adds zero q/k/v biases to a model without them (see qkv_bias in `family_config`)."""
        out = super().to_hf_state_dict(sd, cfg)
        if not cfg.qkv_bias:
            ref = out["model.embed_tokens.weight"]
            sizes = {"q_proj": cfg.n_heads * cfg.head_dim, "k_proj": cfg.kv_heads * cfg.head_dim,
                     "v_proj": cfg.kv_heads * cfg.head_dim}
            for i in range(cfg.n_layers):
                for proj, n in sizes.items():
                    out[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(n, dtype=ref.dtype,
                                                                                  device=ref.device)
        return out


def _sparse_pattern(cfg: ModelConfig) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) naming our MoE layers: Qwen2-MoE layer i is sparse
    when i not in mlp_only_layers and (i + 1) % step == 0."""
    m = cfg.moe
    if m.first_k_dense == m.layer_interval - 1:
        step = m.layer_interval
        dense = [i for i in range(cfg.n_layers) if (i + 1) % step == 0 and not cfg.is_moe_layer(i)]
        return step, dense
    return 1, [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]

"""Hugging Face interop for the Mixture-of-Experts families: Mixtral (`MixtralForCausalLM`) and
Qwen2-MoE (`Qwen2MoeForCausalLM`), config and state dict both ways.

Both route like our `TokenChoiceRouter` with softmax scores: softmax over all experts, top-k,
Mixtral always renormalises the k weights, Qwen2-MoE when `norm_topk_prob`; dropless. Qwen2-MoE
adds q/k/v biases, a shared SwiGLU expert scaled by sigmoid(shared_expert_gate(x)), and dense
layers chosen by `decoder_sparse_step` / `mlp_only_layers` (their width `intermediate_size`,
the experts' `moe_intermediate_size`).

Weights are written in the per-expert layout of the published checkpoints, which transformers
4.x loads as is and 5.x fuses on load (its conversion mapping):

    Mixtral    model.layers.L.block_sparse_moe.gate.weight, ...experts.J.{w1,w3,w2}.weight
    Qwen2-MoE  model.layers.L.mlp.gate.weight, ...mlp.experts.J.{gate,up,down}_proj.weight,
               mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight

Import also reads the fused 5.x in-memory names (`mlp.experts.gate_up_proj` (E, 2H, D) = w1 ++ w3,
`mlp.experts.down_proj` (E, D, H)), so a `model.state_dict()` of transformers 5 converts too.
What the families cannot express is refused in one line (HFFormatError), both ways.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from lmforge.config import ModelConfig, MoEConfig
from lmforge.models.llama.hf import (
    _HF_IGNORED,
    _HF_LAYER,
    _LAYER_RENAMES,
    _OUR_LAYER,
    _TOP_RENAMES,
    _TOP_RENAMES_BACK,
    HFFormatError,
    _names,
    _plain_tensor,
    _strip_wrappers,
    checked_config,
    decoder_fields,
    decoder_hf_config,
)

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
_MOE_PREFIX = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp"}
# Per-expert weight names of each family for our w1 (gate), w3 (up), w2 (down).
_EXPERT_NAMES = {"mixtral": {"w1": "w1", "w3": "w3", "w2": "w2"},
                 "qwen2_moe": {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}}
_PROJ_OURS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "w1": "w1", "w3": "w3", "w2": "w2"}
_ATTN_BIAS = {"attention.wq.bias": "self_attn.q_proj.bias", "attention.wk.bias": "self_attn.k_proj.bias",
              "attention.wv.bias": "self_attn.v_proj.bias"}
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_HF_SHARED = re.compile(r"^mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight$")
_HF_DENSE = re.compile(r"^mlp\.(gate_proj|up_proj|down_proj)\.weight$")


# -- which family -------------------------------------------------------------------------------


def _router_refusals(m: MoEConfig) -> list[str]:
    """Router settings neither family has (the same list for both)."""
    out = []
    if m.router != "token_choice":
        out.append(f"model.moe.router = {m.router!r} (only 'token_choice')")
    if m.score_func != "softmax":
        out.append(f"model.moe.score_func = {m.score_func!r} (only 'softmax')")
    if m.capacity_factor:
        out.append(f"model.moe.capacity_factor = {m.capacity_factor} (only 0, dropless)")
    if m.bias_update_rate:
        out.append(f"model.moe.bias_update_rate = {m.bias_update_rate} (no selection bias; only 0)")
    if m.route_scale != 1.0:
        out.append(f"model.moe.route_scale = {m.route_scale} (only 1.0)")
    return out


def _mixtral_refusals(cfg: ModelConfig) -> list[str]:
    m, out = cfg.moe, []
    if m.n_shared_experts:
        out.append(f"model.moe.n_shared_experts = {m.n_shared_experts} (Mixtral has none)")
    if not all(cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
        out.append("dense layers (Mixtral: every layer MoE)")
    if cfg.qkv_bias:
        out.append("model.qkv_bias = true (Mixtral: no bias)")
    if not m.norm_topk or m.top_k == 1:
        out.append(f"top_k = {m.top_k}, norm_topk = {m.norm_topk} (Mixtral renormalises top_k >= 2 weights)")
    return out


def _qwen2_moe_refusals(cfg: ModelConfig) -> list[str]:
    m = cfg.moe
    if not m.n_shared_experts or not m.shared_expert_gate:
        return [f"n_shared_experts = {m.n_shared_experts}, shared_expert_gate = {m.shared_expert_gate} "
                "(Qwen2-MoE: one gated shared expert)"]
    return []


def hf_family(cfg: ModelConfig) -> str:
    """'mixtral' when Mixtral expresses `cfg` exactly, else 'qwen2_moe' when Qwen2-MoE does; else
    HFFormatError naming what stands in the way (one line)."""
    common = _router_refusals(cfg.moe)
    if common:
        raise HFFormatError("cannot export this Mixture-of-Experts model to Hugging Face (Mixtral / Qwen2-MoE): "
                            + "; ".join(common))
    mixtral, qwen = _mixtral_refusals(cfg), _qwen2_moe_refusals(cfg)
    if not mixtral:
        return "mixtral"
    if not qwen:
        return "qwen2_moe"
    raise HFFormatError("cannot export this Mixture-of-Experts model to Hugging Face: Mixtral needs no "
                        + "; ".join(mixtral)
                        + " | Qwen2-MoE needs " + "; ".join(qwen))


# -- config ---------------------------------------------------------------------------------------


def to_hf_moe_config(cfg: ModelConfig, eos_token_id: int | None = None, bos_token_id: int | None = None,
                     dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json for the family `hf_family(cfg)` picks (it raises when neither fits)."""
    family, m = hf_family(cfg), cfg.moe
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        **decoder_hf_config(cfg, eos_token_id, bos_token_id, dtype),
        "num_experts_per_tok": m.top_k,
        "router_aux_loss_coef": m.aux_loss_coef,
        "output_router_logits": m.aux_loss_coef > 0,
    }
    if family == "mixtral":
        d.update(intermediate_size=cfg.expert_hidden_size, num_local_experts=m.n_experts,
                 sliding_window=None, router_jitter_noise=0.0)
        return d
    step, dense = _sparse_pattern(cfg)
    d.update(
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
    return d


def _sparse_pattern(cfg: ModelConfig) -> tuple[int, list[int]]:
    """(decoder_sparse_step, mlp_only_layers) naming our MoE layers: Qwen2-MoE layer i is sparse
    when i not in mlp_only_layers and (i + 1) % step == 0."""
    m = cfg.moe
    if m.first_k_dense == m.layer_interval - 1:
        step = m.layer_interval
        dense = [i for i in range(cfg.n_layers) if (i + 1) % step == 0 and not cfg.is_moe_layer(i)]
        return step, dense
    return 1, [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i)]


def from_hf_moe_config(d: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a Mixtral or Qwen2-MoE config.json (by `model_type`); refuses in one line
    sliding-window attention, router jitter, top-1 renormalisation, a shared expert whose width
    is not a multiple of the routed experts' and the rest `decoder_fields` refuses."""
    family = d.get("model_type")

    def bad(key: str, allowed: str) -> HFFormatError:
        return HFFormatError(f"config.json ({family}): {key} = {d.get(key)!r}: {allowed}")

    def positive(key: str) -> int:
        v = d.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise bad(key, "must be a positive integer")
        return v

    max_pos = int(d.get("max_position_embeddings", 2048))
    if family == "mixtral":
        fields = decoder_fields(d)
        n_experts = positive("num_local_experts")
        expert_hidden = fields["ffn_hidden"]
        window = d.get("sliding_window")
        if window is not None and window < max_pos:
            raise bad("sliding_window", f"sliding-window attention is not supported; must be null "
                                        f"or >= max_position_embeddings ({max_pos})")
        if d.get("router_jitter_noise", 0.0):
            raise bad("router_jitter_noise", "router jitter is not supported; must be 0")
        moe = dict(n_experts=n_experts, top_k=positive("num_experts_per_tok"), norm_topk=True)
        if moe["top_k"] == 1:
            raise bad("num_experts_per_tok", "Mixtral renormalises the top-1 weight to 1.0, which lmforge "
                                             "cannot express; must be >= 2")
        qkv_bias = False
    elif family == "qwen2_moe":
        fields = decoder_fields(d)
        n_experts = positive("num_experts")
        expert_hidden = positive("moe_intermediate_size")
        shared = d.get("shared_expert_intermediate_size")
        if not isinstance(shared, int) or shared <= 0 or shared % expert_hidden:
            raise bad("shared_expert_intermediate_size", f"must be a positive multiple of moe_intermediate_size "
                                                         f"({expert_hidden})")
        types = d.get("layer_types") or []
        if d.get("use_sliding_window", False) or any(t != "full_attention" for t in types):
            raise bad("use_sliding_window", "sliding-window attention is not supported; must be false")
        top_k, norm = positive("num_experts_per_tok"), bool(d.get("norm_topk_prob", False))
        if top_k == 1 and norm:
            raise bad("norm_topk_prob", "renormalising the top-1 weight to 1.0 is not expressible; "
                                        "must be false with num_experts_per_tok = 1")
        step = d.get("decoder_sparse_step", 1)
        if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
            raise bad("decoder_sparse_step", "must be a positive integer")
        only = d.get("mlp_only_layers") or []
        if not isinstance(only, list) or not all(isinstance(i, int) and i >= 0 for i in only):
            raise bad("mlp_only_layers", "must be a list of layer indices")
        n_layers = fields["n_layers"]
        moe = dict(n_experts=n_experts, top_k=top_k, norm_topk=norm, n_shared_experts=shared // expert_hidden,
                   shared_expert_gate=True, first_k_dense=step - 1, layer_interval=step,
                   dense_layers=sorted({i for i in only if i < n_layers}))
        if not any((i + 1) % step == 0 and i not in only for i in range(n_layers)):
            raise bad("mlp_only_layers", "leaves no MoE layer (a dense model; not supported as qwen2_moe)")
        qkv_bias = bool(d.get("qkv_bias", True))
    else:
        raise HFFormatError(f"config.json: model_type = {family!r}: not a Mixtral or Qwen2-MoE model")
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise bad("hidden_act", "only 'silu' (SwiGLU) is supported")
    aux = float(d.get("router_aux_loss_coef", 0.0) or 0.0) if d.get("output_router_logits", False) else 0.0
    cfg = ModelConfig(**fields, qkv_bias=qkv_bias,
                      moe=MoEConfig(**moe, expert_hidden=expert_hidden, aux_loss_coef=aux))
    return checked_config(cfg)


# -- state dict -----------------------------------------------------------------------------------


def to_hf_moe_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names -> the per-expert layout of the family `hf_family(cfg)` picks. Refuses a nonzero
    selection bias (trained with bias balancing: HF would route differently)."""
    family = hf_family(cfg)
    names, prefix = _EXPERT_NAMES[family], _MOE_PREFIX[family]
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        name = _strip_wrappers(name)
        if cfg.tie_embeddings and name == "output.weight":
            continue
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = t
            continue
        m = _OUR_LAYER.match(name)
        if m is None:
            raise HFFormatError(f"parameter {name!r} has no Hugging Face {ARCHITECTURES[family]} equivalent")
        layer, rest = f"model.layers.{m.group(1)}", m.group(2)
        if rest in _LAYER_RENAMES:  # attention, norms, dense SwiGLU (Qwen2-MoE dense layers)
            out[f"{layer}.{_LAYER_RENAMES[rest]}"] = t
        elif rest in _ATTN_BIAS:
            out[f"{layer}.{_ATTN_BIAS[rest]}"] = t
        elif rest == "feed_forward.router.gate.weight":
            out[f"{layer}.{prefix}.gate.weight"] = t
        elif rest == "feed_forward.router.expert_bias":
            if bool((_plain_tensor(t) != 0).any()):
                raise HFFormatError(f"{name} is nonzero (aux-loss-free bias balancing): Hugging Face "
                                    f"{family} routes without a selection bias; cannot export exactly")
        elif rest in ("feed_forward.experts.w1", "feed_forward.experts.w3", "feed_forward.experts.w2"):
            w = _plain_tensor(t)
            ours = rest.rsplit(".", 1)[1]
            for j in range(w.shape[0]):
                out[f"{layer}.{prefix}.experts.{j}.{names[ours]}.weight"] = w[j]
        elif rest.startswith("feed_forward.shared_experts.") and family == "qwen2_moe":
            ours = rest.split(".")[2]
            hf = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[ours]
            out[f"{layer}.mlp.shared_expert.{hf}.weight"] = t
        elif rest == "feed_forward.shared_expert_gate.weight" and family == "qwen2_moe":
            out[f"{layer}.mlp.shared_expert_gate.weight"] = t
        else:
            raise HFFormatError(f"parameter {name!r} has no Hugging Face {ARCHITECTURES[family]} equivalent")
    if family == "qwen2_moe" and not cfg.qkv_bias:  # see qkv_bias in to_hf_moe_config
        ref = out["model.embed_tokens.weight"]
        sizes = {"q_proj": cfg.n_heads * cfg.head_dim, "k_proj": cfg.kv_heads * cfg.head_dim,
                 "v_proj": cfg.kv_heads * cfg.head_dim}
        for i in range(cfg.n_layers):
            for proj, n in sizes.items():
                out[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(n, dtype=ref.dtype, device=ref.device)
    return out


def from_hf_moe_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names (per-expert on-disk layout of either family, or the fused 5.x names) -> ours.
    Adds the zero selection bias of each MoE layer; unknown names and missing experts are errors
    naming them."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    unknown = []
    for name, t in sd.items():
        if _HF_IGNORED.search(name) or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        if name in _TOP_RENAMES_BACK:
            out[_TOP_RENAMES_BACK[name]] = t
            continue
        m = _HF_LAYER.match(name)
        if m is None:
            unknown.append(name)
            continue
        i, rest = int(m.group(1)), m.group(2)
        rest = "mlp." + rest[len("block_sparse_moe."):] if rest.startswith("block_sparse_moe.") else rest
        ours = f"layers.{i}."
        moe = cfg.is_moe_layer(i)
        if (k := _rename_back(rest, cfg.qkv_bias)) is not None:
            out[ours + k] = t
        elif moe and rest == "mlp.gate.weight":
            out[ours + "feed_forward.router.gate.weight"] = t
        elif moe and (e := _HF_EXPERT.match(rest)):
            experts.setdefault((i, _PROJ_OURS[e.group(2)]), {})[int(e.group(1))] = t
        elif moe and rest == "mlp.experts.gate_up_proj":
            h = t.shape[1] // 2
            out[ours + "feed_forward.experts.w1"], out[ours + "feed_forward.experts.w3"] = t[:, :h], t[:, h:]
        elif moe and rest == "mlp.experts.down_proj":
            out[ours + "feed_forward.experts.w2"] = t
        elif moe and cfg.moe.n_shared_experts and (s := _HF_SHARED.match(rest)):
            out[ours + f"feed_forward.shared_experts.{_PROJ_OURS[s.group(1)]}.weight"] = t
        elif moe and cfg.moe.shared_expert_gate and rest == "mlp.shared_expert_gate.weight":
            out[ours + "feed_forward.shared_expert_gate.weight"] = t
        elif not moe and (dn := _HF_DENSE.match(rest)):
            out[ours + f"feed_forward.{_PROJ_OURS[dn.group(1)]}.weight"] = t
        else:
            unknown.append(name)
    if unknown:
        raise HFFormatError(f"unexpected weights for this {cfg.moe.n_experts}-expert model: {_names(unknown)}")
    for (i, w), per in experts.items():
        missing = [j for j in range(cfg.moe.n_experts) if j not in per]
        if missing or len(per) != cfg.moe.n_experts:
            raise HFFormatError(f"model.layers.{i}: expert weights {w} missing for experts {missing[:6]} "
                                f"or beyond n_experts = {cfg.moe.n_experts}")
        out[f"layers.{i}.feed_forward.experts.{w}"] = torch.stack([per[j] for j in range(cfg.moe.n_experts)])
    ref = next(iter(out.values())) if out else torch.empty(0)
    for i in range(cfg.n_layers):
        if cfg.is_moe_layer(i):
            out[f"layers.{i}.feed_forward.router.expert_bias"] = torch.zeros(
                cfg.moe.n_experts, dtype=torch.float32, device=ref.device)
    return out


def _rename_back(rest: str, qkv_bias: bool) -> str | None:
    """Our in-layer name of an HF attention / norm name (biases only when the model has them)."""
    for ours, hf in _LAYER_RENAMES.items():
        if hf == rest and not ours.startswith("feed_forward."):
            return ours
    if qkv_bias:
        for ours, hf in _ATTN_BIAS.items():
            if hf == rest:
                return ours
    return None

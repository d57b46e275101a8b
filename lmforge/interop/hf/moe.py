"""What the Hugging Face Mixture-of-Experts families (Mixtral, Qwen2-MoE) share: the router
settings neither expresses, the config.json keys both write, and the state-dict conversion.

Both route like our `TokenChoiceRouter` with softmax scores: softmax over all experts, top-k,
dropless. Weights are written in the per-expert layout of the published checkpoints, which
transformers 4.x loads as is and 5.x fuses on load (its conversion mapping):

    Mixtral    model.layers.L.block_sparse_moe.gate.weight, ...experts.J.{w1,w3,w2}.weight
    Qwen2-MoE  model.layers.L.mlp.gate.weight, ...mlp.experts.J.{gate,up,down}_proj.weight,
               mlp.shared_expert.{gate,up,down}_proj.weight, mlp.shared_expert_gate.weight

Import reads either family's per-expert names and the fused 5.x in-memory names
(`mlp.experts.gate_up_proj` (E, 2H, D) = w1 ++ w3, `mlp.experts.down_proj` (E, D, H)), so a
`model.state_dict()` of transformers 5 converts too. What the families cannot express is refused
in one line (HFFormatError), both ways.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from lmforge.config import ModelConfig, MoEConfig
from lmforge.interop.hf.base import (
    HFAdapter,
    HFFormatError,
    checked_config,
    name_list,
)
from lmforge.interop.hf.llama import (
    ATTN_BIAS_RENAMES,
    HF_IGNORED_NAME,
    HF_LAYER_NAME,
    LAYER_RENAMES,
    TOP_RENAMES_BACK,
    decoder_hf_config,
    our_parameters,
)
from lmforge.tensors.dtensor import gathered

# HF projection name (either family) -> our SwiGLU weight name.
PROJ_OURS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2", "w1": "w1", "w3": "w3", "w2": "w2"}
# In-layer HF names after the Mixtral prefix `block_sparse_moe.` is read as `mlp.`.
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_HF_SHARED = re.compile(r"^mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight$")
_HF_DENSE = re.compile(r"^mlp\.(gate_proj|up_proj|down_proj)\.weight$")


def router_refusals(m: MoEConfig) -> list[str]:
    """Router settings neither Mixtral nor Qwen2-MoE has."""
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


def config_error(d: Mapping[str, Any], key: str, allowed: str) -> HFFormatError:
    """A one-line refusal of config.json key `key` of an MoE family (named by its model_type)."""
    return HFFormatError(f"config.json ({d.get('model_type')}): {key} = {d.get(key)!r}: {allowed}")


def positive_int(d: Mapping[str, Any], key: str) -> int:
    """config.json `key`, which must be a positive integer (a bool is not one)."""
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise config_error(d, key, "must be a positive integer")
    return v


class MoEAdapter(HFAdapter):
    """An HF Mixture-of-Experts family: subclasses name their weight prefix and expert projection
    names, and say which configs they express and how their config.json differs."""

    mixture_of_experts = True
    moe_hf_prefix: ClassVar[str]  # in-layer prefix of router and experts ("block_sparse_moe", "mlp")
    expert_hf_names: ClassVar[dict[str, str]]  # our expert w1 (gate), w3 (up), w2 (down) -> HF

    def export_refusal(self, cfg: ModelConfig) -> str | None:
        """Router settings are refused outright (no MoE family has them); then the family's own."""
        common = router_refusals(cfg.moe)
        if common:
            raise HFFormatError("cannot export this Mixture-of-Experts model to Hugging Face (Mixtral / Qwen2-MoE): "
                                + "; ".join(common))
        return self.family_refusal(cfg)

    @abstractmethod
    def family_refusal(self, cfg: ModelConfig) -> str | None:
        """`export_refusal` for what is particular to this family (router settings already pass)."""

    @abstractmethod
    def family_config(self, cfg: ModelConfig) -> dict[str, Any]:
        """This family's own config.json keys (expert counts and widths, layer pattern, windows)."""

    @abstractmethod
    def family_fields(self, d: Mapping[str, Any], max_positions: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """(ModelConfig fields including qkv_bias, MoEConfig fields including expert_hidden) from
        this family's config.json, checked; `max_positions` is max_position_embeddings."""

    def shared_expert_hf_name(self, rest: str) -> str | None:
        """HF in-layer name of our in-layer shared-expert name `rest`; None: the family has none."""
        return None

    def to_hf_config(self, cfg: ModelConfig, eos_token_id: int | None, bos_token_id: int | None,
                     dtype: torch.dtype) -> dict[str, Any]:
        m = cfg.moe
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            **decoder_hf_config(cfg, eos_token_id, bos_token_id, dtype),
            "num_experts_per_tok": m.top_k,
            "router_aux_loss_coef": m.aux_loss_coef,
            "output_router_logits": m.aux_loss_coef > 0,
        }
        d.update(self.family_config(cfg))
        return d

    def from_hf_config(self, d: Mapping[str, Any]) -> ModelConfig:
        """Refuses in one line what `family_fields` and `decoder_fields` refuse."""
        max_positions = int(d.get("max_position_embeddings", 2048))
        fields, moe = self.family_fields(d, max_positions)
        aux = float(d.get("router_aux_loss_coef", 0.0) or 0.0) if d.get("output_router_logits", False) else 0.0
        return checked_config(ModelConfig(**fields, moe=MoEConfig(**moe, aux_loss_coef=aux)))

    def to_hf_state_dict(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Our names -> this family's per-expert layout. Refuses a nonzero selection bias (trained
        with bias balancing: HF would route differently)."""
        names, prefix = self.expert_hf_names, self.moe_hf_prefix
        out: dict[str, torch.Tensor] = {}
        for name, layer, rest, t in our_parameters(sd, cfg, self.architecture):
            if rest is None:
                out[layer] = t
            elif rest in LAYER_RENAMES:  # attention, norms, dense SwiGLU (Qwen2-MoE dense layers)
                out[f"{layer}.{LAYER_RENAMES[rest]}"] = t
            elif rest in ATTN_BIAS_RENAMES:
                out[f"{layer}.{ATTN_BIAS_RENAMES[rest]}"] = t
            elif rest == "feed_forward.router.gate.weight":
                out[f"{layer}.{prefix}.gate.weight"] = t
            elif rest == "feed_forward.router.expert_bias":
                if bool((gathered(t) != 0).any()):
                    raise HFFormatError(f"{name} is nonzero (aux-loss-free bias balancing): Hugging Face "
                                        f"{self.model_type} routes without a selection bias; cannot export exactly")
            elif rest in ("feed_forward.experts.w1", "feed_forward.experts.w3", "feed_forward.experts.w2"):
                w = gathered(t)
                ours = rest.rsplit(".", 1)[1]
                for j in range(w.shape[0]):
                    out[f"{layer}.{prefix}.experts.{j}.{names[ours]}.weight"] = w[j]
            elif (shared := self.shared_expert_hf_name(rest)) is not None:
                out[f"{layer}.{shared}"] = t
            else:
                raise HFFormatError(f"parameter {name!r} has no Hugging Face {self.architecture} equivalent")
        return out

    def from_hf_state_dict(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """HF names (per-expert on-disk layout of either family, or the fused 5.x names) -> ours.
        Adds the zero selection bias of each MoE layer; unknown names and missing experts are
        errors naming them."""
        out: dict[str, torch.Tensor] = {}
        experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
        unknown = []
        for name, t in sd.items():
            if HF_IGNORED_NAME.search(name) or (cfg.tie_embeddings and name == "lm_head.weight"):
                continue
            if name in TOP_RENAMES_BACK:
                out[TOP_RENAMES_BACK[name]] = t
                continue
            m = HF_LAYER_NAME.match(name)
            if m is None:
                unknown.append(name)
                continue
            i, rest = int(m.group(1)), m.group(2)
            rest = "mlp." + rest[len("block_sparse_moe."):] if rest.startswith("block_sparse_moe.") else rest
            ours = f"layers.{i}."
            moe = cfg.is_moe_layer(i)
            if (k := _attention_name_back(rest, cfg.qkv_bias)) is not None:
                out[ours + k] = t
            elif moe and rest == "mlp.gate.weight":
                out[ours + "feed_forward.router.gate.weight"] = t
            elif moe and (e := _HF_EXPERT.match(rest)):
                experts.setdefault((i, PROJ_OURS[e.group(2)]), {})[int(e.group(1))] = t
            elif moe and rest == "mlp.experts.gate_up_proj":
                h = t.shape[1] // 2
                out[ours + "feed_forward.experts.w1"], out[ours + "feed_forward.experts.w3"] = t[:, :h], t[:, h:]
            elif moe and rest == "mlp.experts.down_proj":
                out[ours + "feed_forward.experts.w2"] = t
            elif moe and cfg.moe.n_shared_experts and (s := _HF_SHARED.match(rest)):
                out[ours + f"feed_forward.shared_experts.{PROJ_OURS[s.group(1)]}.weight"] = t
            elif moe and cfg.moe.shared_expert_gate and rest == "mlp.shared_expert_gate.weight":
                out[ours + "feed_forward.shared_expert_gate.weight"] = t
            elif not moe and (dn := _HF_DENSE.match(rest)):
                out[ours + f"feed_forward.{PROJ_OURS[dn.group(1)]}.weight"] = t
            else:
                unknown.append(name)
        if unknown:
            raise HFFormatError(f"unexpected weights for this {cfg.moe.n_experts}-expert model: {name_list(unknown)}")
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


def _attention_name_back(rest: str, qkv_bias: bool) -> str | None:
    """Our in-layer name of an HF attention / norm name (biases only when the model has them)."""
    for ours, hf in LAYER_RENAMES.items():
        if hf == rest and not ours.startswith("feed_forward."):
            return ours
    if qkv_bias:
        for ours, hf in ATTN_BIAS_RENAMES.items():
            if hf == rest:
                return ours
    return None

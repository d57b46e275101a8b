"""Hugging Face Llama (`LlamaForCausalLM`), and the Llama decoder layout Mixtral and Qwen2-MoE
extend: the shared config.json keys and the attention / norm / embedding weight names.

The state-dict conversion is a pure rename: our RoPE uses the "rotate half" layout that HF Llama
checkpoints use, so q/k rows need no permutation (the logits tests in tests/unit/test_hf.py hold
that to 1e-5).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.interop.hf.base import HFAdapter, HFFormatError, checked_config, name_list, unwrapped_name
from lmforge.interop.hf.rope_scaling import rope_fields, rope_hf_config
from lmforge.interop.hf.sliding_window import model_layer_windows
from lmforge.tensors.dtypes import HF_NAMES

# ours -> HF, for the names inside one transformer block.
LAYER_RENAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
# ours -> HF, for the names outside the blocks.
TOP_RENAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# ours -> HF, for the q/k/v biases (Qwen2, Qwen2-MoE).
ATTN_BIAS_RENAMES = {"attention.wq.bias": "self_attn.q_proj.bias", "attention.wk.bias": "self_attn.k_proj.bias",
                     "attention.wv.bias": "self_attn.v_proj.bias"}
LAYER_RENAMES_BACK = {v: k for k, v in LAYER_RENAMES.items()}
ATTN_BIAS_RENAMES_BACK = {v: k for k, v in ATTN_BIAS_RENAMES.items()}
TOP_RENAMES_BACK = {v: k for k, v in TOP_RENAMES.items()}
OUR_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")
HF_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Buffers some older HF checkpoints store; they are recomputed from the config.
HF_IGNORED_NAME = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def decoder_hf_config(cfg: ModelConfig, eos_token_id: int | None, bos_token_id: int | None,
                      dtype: torch.dtype) -> dict[str, Any]:
    """The config.json keys every exported family shares (sizes, heads, norm, RoPE, tokens, dtype).
    RoPE is written both as `rope_theta` / `rope_scaling` (transformers 4.x) and as
    `rope_parameters` (5.x), so either version reads it (rope_scaling.py)."""
    if dtype not in HF_NAMES:
        raise HFFormatError(f"export dtype {dtype} is not supported; allowed: {', '.join(HF_NAMES.values())}")
    return {
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        **rope_hf_config(cfg),  # rope_theta, rope_parameters, [rope_scaling], max_position_embeddings
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": HF_NAMES[dtype],
    }


def decoder_fields(d: Mapping[str, Any], ffn_key: str = "intermediate_size") -> dict[str, Any]:
    """ModelConfig fields every supported family shares (sizes, heads, norm, RoPE, tying), checked:
    refuses in one line RoPE types we do not compute, other activations, a head_dim that is not hidden / heads.
    The dense SwiGLU width is read from `ffn_key`."""
    def bad(key: str, allowed: str) -> HFFormatError:
        return HFFormatError(f"config.json: {key} = {d.get(key)!r}: {allowed}")

    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", ffn_key, "vocab_size"):
        if not isinstance(d.get(key), int) or isinstance(d.get(key), bool) or d[key] <= 0:
            raise bad(key, "must be a positive integer")
    dim, n_heads = d["hidden_size"], d["num_attention_heads"]
    if dim % n_heads:
        raise bad("num_attention_heads", f"must divide hidden_size ({dim})")
    if d.get("head_dim") is not None and d["head_dim"] != dim // n_heads:
        raise bad("head_dim", f"only hidden_size / num_attention_heads ({dim // n_heads}) is supported")
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise bad("hidden_act", "only 'silu' (SwiGLU) is supported")
    if d.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
        raise bad("partial_rotary_factor", "only 1.0 (full rotary) is supported")
    n_kv = d.get("num_key_value_heads") or n_heads
    return dict(
        dim=dim,
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv,
        vocab_size=d["vocab_size"],
        ffn_hidden=d[ffn_key],
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        **rope_fields(d),  # rope_theta, rope_scaling, max_seq_len (lmforge/interop/hf/rope_scaling.py)
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=float(d.get("initializer_range", 0.02)),
    )


def hf_name(ours: str) -> str:
    """HF name of one of our parameter names (for error messages); unknown names unchanged."""
    if ours in TOP_RENAMES:
        return TOP_RENAMES[ours]
    m = OUR_LAYER_NAME.match(ours)
    if m and m.group(2) in LAYER_RENAMES:
        return f"model.layers.{m.group(1)}.{LAYER_RENAMES[m.group(2)]}"
    return ours


def our_parameters(sd: Mapping[str, torch.Tensor], cfg: ModelConfig, family: str
                   ) -> Iterator[tuple[str, str, str | None, torch.Tensor]]:
    """Our state dict as every family's export walks it: (our name, HF target, rest, tensor) where a
    top-level parameter has its HF name as target and rest None, and a layer parameter has
    "model.layers.N" as target and its name inside the block as rest. Wrapper prefixes are
    dropped; so is the tied output projection (HF stores none); any other name is refused."""
    for name, t in sd.items():
        name = unwrapped_name(name)
        if cfg.tie_embeddings and name == "output.weight":
            continue
        if name in TOP_RENAMES:
            yield name, TOP_RENAMES[name], None, t
            continue
        m = OUR_LAYER_NAME.match(name)
        if m is None:
            raise HFFormatError(f"parameter {name!r} has no Hugging Face {family} equivalent")
        yield name, f"model.layers.{m.group(1)}", m.group(2), t


class LlamaAdapter(HFAdapter):
    """Dense Llama: every parameter is a rename of one of ours. The dense families that extend it
    (mistral.py: a sliding window; qwen2.py: q/k/v biases and windows on the upper layers)
    override the config methods; the one dense state-dict reader takes biases when cfg has them."""

    model_type = "llama"
    architecture = "LlamaForCausalLM"
    display_name = "Llama"
    mixture_of_experts = False
    reads_architecture_alone = True

    def export_refusal(self, cfg: ModelConfig) -> str | None:
        why = [f"{what} ({self.display_name}: {hf})" for what, hf in self.refusals(cfg)]
        return "no " + "; ".join(why) if why else None

    def refusals(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        """(what cfg has, what the family has instead) for each setting the family cannot express."""
        out = []
        if cfg.qkv_bias:
            out.append(("model.qkv_bias = true", "no bias"))
        if any(model_layer_windows(cfg)):
            out.append(("sliding-window layers", "full attention only"))
        return out

    def layer_renames(self, cfg: ModelConfig) -> dict[str, str]:
        """Our in-block names -> this family's."""
        return LAYER_RENAMES

    def to_hf_config(self, cfg: ModelConfig, eos_token_id: int | None, bos_token_id: int | None,
                     dtype: torch.dtype) -> dict[str, Any]:
        """A LlamaConfig-compatible config.json dict."""
        return {"architectures": [self.architecture], "model_type": self.model_type,
                **decoder_hf_config(cfg, eos_token_id, bos_token_id, dtype),
                "intermediate_size": cfg.ffn_hidden_size, "attention_bias": False, "mlp_bias": False,
                "pretraining_tp": 1}

    def from_hf_config(self, d: Mapping[str, Any]) -> ModelConfig:
        """Refuses biases, and what `decoder_fields` refuses."""
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key, False):
                raise HFFormatError(f"config.json: {key} = {d.get(key)!r}: biases are not supported; must be false")
        return checked_config(ModelConfig(**decoder_fields(d)))

    def to_hf_state_dict(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """With tied embeddings HF stores no lm_head.weight, so it is dropped."""
        out: dict[str, torch.Tensor] = {}
        renames = self.layer_renames(cfg)
        for name, target, rest, t in our_parameters(sd, cfg, self.display_name):
            if rest is None:
                out[target] = t
            elif rest in renames:
                out[f"{target}.{renames[rest]}"] = t
            else:
                raise HFFormatError(f"parameter {name!r} has no Hugging Face {self.display_name} equivalent")
        return out

    def from_hf_state_dict(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Drops lm_head.weight when tied (some exports keep it) and stored rotary inv_freq buffers;
        reads q/k/v biases when `cfg.qkv_bias` (Qwen2)."""
        out: dict[str, torch.Tensor] = {}
        unknown = []
        back = {**LAYER_RENAMES_BACK, **(ATTN_BIAS_RENAMES_BACK if cfg.qkv_bias else {})}
        for name, t in sd.items():
            if HF_IGNORED_NAME.search(name) or (cfg.tie_embeddings and name == "lm_head.weight"):
                continue
            if name in TOP_RENAMES_BACK:
                out[TOP_RENAMES_BACK[name]] = t
                continue
            m = HF_LAYER_NAME.match(name)
            if m is None or m.group(2) not in back:
                unknown.append(name)
                continue
            out[f"layers.{m.group(1)}.{back[m.group(2)]}"] = t
        if unknown:
            raise HFFormatError(f"unexpected weights for a dense model: {name_list(unknown)}")
        return out

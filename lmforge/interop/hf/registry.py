"""Family dispatch: the registered adapters keyed by HF `model_type`, and the conversions that pick
one (by config.json when reading, by what a ModelConfig needs when writing)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.interop.hf.base import HFAdapter, HFFormatError
from lmforge.interop.hf.llama import LlamaAdapter
from lmforge.interop.hf.mistral import MistralAdapter
from lmforge.interop.hf.mixtral import MixtralAdapter
from lmforge.interop.hf.qwen2 import Qwen2Adapter
from lmforge.interop.hf.qwen2_moe import Qwen2MoeAdapter

# One line per family. The order is the export preference: a model two families express exactly
# is written as the first (an MoE model Mixtral expresses is never written as Qwen2-MoE; a dense
# one is Llama unless it has sliding windows (Mistral) or q/k/v biases (Qwen2)).
ADAPTERS: dict[str, HFAdapter] = {adapter.model_type: adapter for adapter in (
    LlamaAdapter(),
    MistralAdapter(),
    Qwen2Adapter(),
    MixtralAdapter(),
    Qwen2MoeAdapter(),
)}


def _in_words(items: list[str]) -> str:
    """'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def adapter_for_hf_config(d: Mapping[str, Any]) -> HFAdapter:
    """The adapter that reads config.json dict `d`: by `model_type`, else (for families that allow
    it) by `architectures`; else HFFormatError naming the families that can be imported."""
    model_type = d.get("model_type")
    adapter = ADAPTERS.get(model_type) if isinstance(model_type, str) else None
    if adapter is None:
        archs = d.get("architectures") or []
        adapter = next((a for a in ADAPTERS.values() if a.reads_architecture_alone and a.architecture in archs),
                       None)
    if adapter is None:
        names = _in_words([a.display_name for a in ADAPTERS.values()])
        types = ", ".join(repr(t) for t in ADAPTERS)
        raise HFFormatError(f"config.json: model_type = {model_type!r}: only {names} "
                            f"models (model_type {types}) can be imported")
    return adapter


def adapter_for_model(cfg: ModelConfig) -> HFAdapter:
    """The first family of `cfg`'s kind (dense / Mixture-of-Experts) that expresses it exactly;
    else HFFormatError saying what each would need (one line)."""
    refusals = []
    for adapter in _adapters_of_kind(cfg):
        why = adapter.export_refusal(cfg)
        if why is None:
            return adapter
        refusals.append(f"{adapter.display_name} needs {why}")
    kind = "Mixture-of-Experts" if cfg.moe.n_experts else "dense"
    raise HFFormatError(f"cannot export this {kind} model to Hugging Face: " + " | ".join(refusals))


def _adapters_of_kind(cfg: ModelConfig) -> list[HFAdapter]:
    return [a for a in ADAPTERS.values() if a.mixture_of_experts == bool(cfg.moe.n_experts)]


def to_hf_config(cfg: ModelConfig, eos_token_id: int | None = None, bos_token_id: int | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json dict of the family `adapter_for_model` picks (Llama, Mistral or Qwen2; Mixtral or
    Qwen2-MoE for an MoE model); RoPE is written for transformers 4.x and 5.x alike."""
    return adapter_for_model(cfg).to_hf_config(cfg, eos_token_id, bos_token_id, dtype)


def from_hf_config(d: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict of a registered family. Refuses, in one line, what our
    model cannot represent (RoPE types we do not compute, biases Llama lacks, other activations,
    a head_dim that is not hidden/heads, other families)."""
    return adapter_for_hf_config(d).from_hf_config(d)


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names -> HF names of the family `adapter_for_model` picks; wrapper name parts
    (torch.compile, checkpointing, DDP) are dropped, and lm_head.weight when tied."""
    return adapter_for_model(cfg).to_hf_state_dict(sd, cfg)


def from_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names -> ours, for a model of `cfg`'s kind: the MoE families share one reader, which
    takes either family's layout (and the fused transformers 5.x names)."""
    return _adapters_of_kind(cfg)[0].from_hf_state_dict(sd, cfg)

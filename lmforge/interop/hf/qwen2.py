"""Hugging Face Qwen2 (`Qwen2ForCausalLM`): the Llama layout plus q/k/v biases (always present in
HF Qwen2), and sliding windows on the layers >= `max_window_layers` when `use_sliding_window`
(5.x also writes them as `layer_types`; both are read and written). The window number means
the same on both sides (sliding_window.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.interop.hf.base import checked_config
from lmforge.interop.hf.llama import (
    ATTN_BIAS_RENAMES,
    LAYER_RENAMES,
    LlamaAdapter,
    decoder_fields,
    decoder_hf_config,
)
from lmforge.interop.hf.sliding_window import (
    full_then_window,
    hf_layer_windows,
    model_layer_windows,
    our_window_to_hf,
    with_layer_windows,
)


class Qwen2Adapter(LlamaAdapter):
    """Qwen2: the registry exports a dense model as Qwen2 when it has q/k/v biases or windows only
    on its upper layers (a model without biases gets zero biases: HF Qwen2 always has them)."""

    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    display_name = "Qwen2"
    reads_architecture_alone = False

    def refusals(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        if full_then_window(model_layer_windows(cfg)) is None:
            return [("windows that are not full layers then windowed ones",
                     "sliding windows on the layers >= max_window_layers")]
        return []

    def layer_renames(self, cfg: ModelConfig) -> dict[str, str]:
        return {**LAYER_RENAMES, **ATTN_BIAS_RENAMES}

    def to_hf_config(self, cfg: ModelConfig, eos_token_id: int | None, bos_token_id: int | None,
                     dtype: torch.dtype) -> dict[str, Any]:
        """A Qwen2Config-compatible config.json dict."""
        windows = model_layer_windows(cfg)
        k, window = full_then_window(windows)
        return {"architectures": [self.architecture], "model_type": self.model_type,
                **decoder_hf_config(cfg, eos_token_id, bos_token_id, dtype),
                "intermediate_size": cfg.ffn_hidden_size, "use_sliding_window": window > 0,
                "sliding_window": our_window_to_hf(window), "max_window_layers": k,
                "layer_types": ["sliding_attention" if w else "full_attention" for w in windows]}

    def from_hf_config(self, d: Mapping[str, Any]) -> ModelConfig:
        """Refuses what `decoder_fields` refuses and malformed windows."""
        fields = {**decoder_fields(d), "qkv_bias": True}
        return checked_config(ModelConfig(**with_layer_windows(fields, hf_layer_windows(d, fields["n_layers"]))))

    def to_hf_state_dict(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Zero q/k/v biases for a model without them (HF Qwen2 always builds them)."""
        out = super().to_hf_state_dict(sd, cfg)
        if not cfg.qkv_bias:
            for i in range(cfg.n_layers):
                for proj in ("q_proj", "k_proj", "v_proj"):
                    w = out[f"model.layers.{i}.self_attn.{proj}.weight"]
                    out[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype,
                                                                                 device=w.device)
        return out

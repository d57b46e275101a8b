"""Hugging Face Mistral (`MistralForCausalLM`): the Llama layout (same weight names, no biases)
with one `sliding_window` over every layer (null: full attention). The window number means the
same on both sides (sliding_window.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.interop.hf.base import HFFormatError, checked_config
from lmforge.interop.hf.llama import LlamaAdapter, decoder_fields, decoder_hf_config
from lmforge.interop.hf.sliding_window import (
    hf_layer_windows,
    model_layer_windows,
    our_window_to_hf,
    uniform_window,
    with_layer_windows,
)


class MistralAdapter(LlamaAdapter):
    """Mistral: Llama's weights; the registry exports a dense model as Mistral when it has one
    window on every layer (Llama refuses windows)."""

    model_type = "mistral"
    architecture = "MistralForCausalLM"
    display_name = "Mistral"
    reads_architecture_alone = False

    def refusals(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        out = [r for r in super().refusals(cfg) if r[0] != "sliding-window layers"]
        if uniform_window(model_layer_windows(cfg)) is None:
            out.append(("different windows per layer", "one sliding_window for every layer"))
        return out

    def to_hf_config(self, cfg: ModelConfig, eos_token_id: int | None, bos_token_id: int | None,
                     dtype: torch.dtype) -> dict[str, Any]:
        """A MistralConfig-compatible config.json dict."""
        window = uniform_window(model_layer_windows(cfg))
        return {"architectures": [self.architecture], "model_type": self.model_type,
                **decoder_hf_config(cfg, eos_token_id, bos_token_id, dtype),
                "intermediate_size": cfg.ffn_hidden_size, "sliding_window": our_window_to_hf(window or 0)}

    def from_hf_config(self, d: Mapping[str, Any]) -> ModelConfig:
        """Refuses what `decoder_fields` refuses and a non-integer window."""
        if d.get("attention_bias", False) or d.get("mlp_bias", False):
            raise HFFormatError("config.json: attention_bias / mlp_bias: Mistral has no biases; must be false")
        fields = decoder_fields(d)
        return checked_config(ModelConfig(**with_layer_windows(fields, hf_layer_windows(d, fields["n_layers"]))))

"""Named model sizes. `debug`/`tiny` run on a laptop CPU; the rest follow published Llama shapes."""

from __future__ import annotations

from dataclasses import replace

from lmforge.config import ModelConfig

SIZES: dict[str, ModelConfig] = {
    "debug": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                         max_seq_len=256),
    "tiny": ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=8192, multiple_of=64, max_seq_len=1024),
    # GPT-3 "small" width and depth with Llama blocks (12 x 768, tied 32k vocabulary).
    "125M": ModelConfig(dim=768, n_layers=12, n_heads=12, vocab_size=32000, ffn_hidden=2560,
                        tie_embeddings=True, max_seq_len=2048),
    # Llama 3.2 1B.
    "1B": ModelConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_hidden=8192,
                      rope_theta=500000.0, tie_embeddings=True, max_seq_len=8192),
    # Llama 3.1 8B.
    "8B": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_hidden=14336,
                      rope_theta=500000.0, max_seq_len=8192),
    # Llama 3.1 70B.
    "70B": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, ffn_hidden=28672,
                       rope_theta=500000.0, max_seq_len=8192),
    # Llama 3.1 405B.
    "405B": ModelConfig(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=128256, ffn_hidden=53248,
                        rope_theta=500000.0, max_seq_len=8192),
}


def get_size(name: str) -> ModelConfig:
    if name not in SIZES:
        raise KeyError(f"unknown model size {name!r}; known: {', '.join(SIZES)}")
    return replace(SIZES[name])

"""Named model sizes. `debug`/`tiny` run on a laptop CPU; the rest follow published Llama shapes."""

from __future__ import annotations

from dataclasses import replace

from lmforge.config import ModelConfig, MoEConfig
from lmforge.config.model import AttentionConfig

SIZES: dict[str, ModelConfig] = {
    "debug": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                         max_seq_len=256),
    "tiny": ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=8192, multiple_of=64, max_seq_len=1024),
    # tiny at context 4096 with a sliding window of 256 in every layer (recipes/tiny-long.toml).
    "tiny-long": ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=8192, multiple_of=64, max_seq_len=4096,
                             attention=AttentionConfig(layers=["window"], window=256)),
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
    # Mixture-of-Experts. tiny-moe: the CPU recipe (8 experts of half the dense width, top-2: the
    # active feed-forward equals the tiny dense one's; first layer dense; bias balancing at rate 0.01:
    # DeepSeek-V3's 0.001 is too slow to balance within a few hundred steps, see docs/benchmarks.md).
    "tiny-moe": ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=8192, multiple_of=64, max_seq_len=256,
                            moe=MoEConfig(n_experts=8, top_k=2, expert_hidden=352, first_k_dense=1,
                                          bias_update_rate=0.01)),
    # Mixtral 8x7B: Mistral-7B blocks, every feed-forward 8 experts top-2 (softmax, renormalised).
    "mixtral-8x7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000, ffn_hidden=14336,
                                rope_theta=1e6, max_seq_len=32768,
                                moe=MoEConfig(n_experts=8, top_k=2, aux_loss_coef=0.02)),
    # DeepSeek-V3's MoE on Llama attention (GQA, not MLA): 61 layers, first 3 dense (width 18432),
    # then 256 routed experts of width 2048, top-8, one shared expert, sigmoid scores, routed weights
    # x 2.5, aux-loss-free bias balancing (update rate 0.001).
    "deepseek-v3-like": ModelConfig(dim=7168, n_layers=61, n_heads=128, n_kv_heads=8, vocab_size=129280,
                                    ffn_hidden=18432, max_seq_len=4096, norm_eps=1e-6,
                                    moe=MoEConfig(n_experts=256, top_k=8, n_shared_experts=1, expert_hidden=2048,
                                                  first_k_dense=3, score_func="sigmoid", norm_topk=True,
                                                  route_scale=2.5, bias_update_rate=0.001)),
}


def get_size(name: str) -> ModelConfig:
    if name not in SIZES:
        raise KeyError(f"unknown model size {name!r}; known: {', '.join(SIZES)}")
    return replace(SIZES[name])

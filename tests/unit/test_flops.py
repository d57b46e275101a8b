"""FLOPs per token: a hand count, the real model under torch's FlopCounterMode, and the formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmforge.config import ModelConfig
from lmforge.models.llama import build_model
from lmforge.models.llama.model import Transformer
from lmforge.observability.flops import (
    flops_breakdown,
    forward_flops_per_token,
    matmul_params,
    training_flops_per_token,
)

# dim 64, 2 layers, 4 query heads and 2 KV heads of width 16, SwiGLU hidden 96, vocab 512.
SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden=96, max_seq_len=32)
SEQ = 16


def test_hand_count() -> None:
    # Matmul weights of one layer:
    wq = 64 * 64  # dim x (4 heads * 16)          = 4096
    wk = 64 * 32  # dim x (2 kv heads * 16)       = 2048
    wv = 64 * 32  #                               = 2048
    wo = 64 * 64  #                               = 4096
    w1 = 64 * 96  # gate                          = 6144
    w3 = 64 * 96  # up                            = 6144
    w2 = 96 * 64  # down                          = 6144
    per_layer = wq + wk + wv + wo + w1 + w3 + w2
    assert per_layer == 30720
    output = 64 * 512  # = 32768; the embedding gather is not counted
    n_matmul = 2 * per_layer + output
    assert n_matmul == 94208 == matmul_params(SMALL)
    # Attention per layer and token: (QK^T + AV) = 2 matmuls x 2 FLOPs x (4 heads x 16) per pair,
    # and a causal query sees (16 + 1) / 2 = 8.5 keys on average: 256 * 8.5 = 2176.
    attn_per_layer = 2 * 2 * (4 * 16) * 8.5
    assert attn_per_layer == 2176
    forward = 2 * n_matmul + 2 * attn_per_layer  # 188416 + 4352
    assert forward == 192768
    assert forward_flops_per_token(SMALL, SEQ) == forward
    assert training_flops_per_token(SMALL, SEQ) == 3 * 192768 == 578304
    b = flops_breakdown(SMALL, SEQ)
    assert b["attention_projections"] == 2 * 2 * (wq + wk + wv + wo)
    assert b["ffn"] == 2 * 2 * (w1 + w2 + w3)
    assert b["output"] == 2 * output
    assert b["attention_scores_and_values"] == 4352
    assert sum(v for k, v in b.items() if k != "forward") == b["forward"]


def test_closed_form_and_popular_formula() -> None:
    cfg = ModelConfig(dim=768, n_layers=12, n_heads=12, vocab_size=32000, ffn_hidden=2560, tie_embeddings=True)
    s = 2048
    n = matmul_params(cfg)
    n_layers, h, hd, d = cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.dim
    assert training_flops_per_token(cfg, s) == 6 * n + 6 * n_layers * h * hd * (s + 1)
    # The non-causal "6N + 12 L d s" replaces the causal mean (s + 1) / 2 by s.
    non_causal = 6 * n + 12 * n_layers * d * s
    attention_ours = training_flops_per_token(cfg, s) - 6 * n
    assert (non_causal - 6 * n) / attention_ours == pytest.approx(2 * s / (s + 1))


def test_causal_mean_keys_is_exact() -> None:
    s = SEQ
    mask = torch.ones(s, s).tril()  # query i sees keys 0..i
    mean_keys = mask.sum().item() / s
    attn = flops_breakdown(SMALL, s)["attention_scores_and_values"]
    assert attn == SMALL.n_layers * 4 * SMALL.n_heads * SMALL.head_dim * mean_keys


def test_matmul_params_match_the_real_model_linears() -> None:
    for tie in (False, True):
        cfg = ModelConfig(**{**SMALL.__dict__, "tie_embeddings": tie})
        with torch.device("meta"):
            model = Transformer(cfg)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        assert linear == matmul_params(cfg)  # the tied output still counts as a vocab x dim matmul


@pytest.mark.parametrize("tie", [False, True])
def test_against_flop_counter_on_the_real_model(tie: bool) -> None:
    """Brute force: count the aten matmuls of one forward + backward of the real model.

    FlopCounterMode counts attention as full (non-causal) s x s score and value products: the
    fused CPU SDPA kernel is not in its registry at all, so the math backend is forced, which
    runs two bmm's over all s keys (the causal mask is applied to the scores, not skipped). The
    counter therefore sees per token 3 x L x 4 x H x hd x s for attention, where we count
    3 x L x 4 x H x hd x (s + 1) / 2; the test swaps that one term and expects equality.
    """
    cfg = ModelConfig(**{**SMALL.__dict__, "tie_embeddings": tie})
    model = build_model(cfg)
    batch = 2
    tokens = torch.randint(0, cfg.vocab_size, (batch, SEQ))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
    counted_per_token = counter.get_total_flops() / (batch * SEQ)
    n_layers, h, hd = cfg.n_layers, cfg.n_heads, cfg.head_dim
    full_attention = 3 * n_layers * 4 * h * hd * SEQ
    causal_attention = 3 * n_layers * 4 * h * hd * (SEQ + 1) / 2
    expected = training_flops_per_token(cfg, SEQ) - causal_attention + full_attention
    assert counted_per_token == expected
    # And the matmul part alone is exactly 6 N.
    counts = counter.get_flop_counts()["Global"]
    mm = sum(v for k, v in counts.items() if "bmm" not in str(k))
    assert mm / (batch * SEQ) == 6 * matmul_params(cfg)


def test_bad_seq_len() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        forward_flops_per_token(SMALL, 0)

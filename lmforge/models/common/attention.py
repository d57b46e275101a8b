"""Grouped-query causal self-attention on PyTorch SDPA (Ainslie et al., 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.common.kv_cache import KVCache
from lmforge.models.common.linear import Linear, MatmulKernels, fused_linear
from lmforge.models.common.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, qkv_bias: bool = False,
                 kernels: MatmulKernels | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.kernels = kernels  # fp32 CPU: q/k/v as one matmul, kernels chosen per shape (linear.py)
        # qkv_bias: Qwen2-style bias on q/k/v (never on the output projection).
        self.wq = Linear(dim, n_heads * self.head_dim, bias=qkv_bias, kernels=kernels)
        self.wk = Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias, kernels=kernels)
        self.wv = Linear(dim, n_kv_heads * self.head_dim, bias=qkv_bias, kernels=kernels)
        self.wo = Linear(n_heads * self.head_dim, dim, bias=False, kernels=kernels)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 instead of n_heads: under tensor parallelism each rank holds only its local heads.
        q, k, v = fused_linear(x, (self.wq, self.wk, self.wv), self.kernels)
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
        cos, sin = cos[:s], sin[:s]  # tables from this chunk's first position; may be longer
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(layer, k, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # Query head h reads KV head h // (heads / kv_heads) (also per rank under TP: both counts
        # are local there). SDPA's GQA mode does that inside the kernel (CPU flash attention and
        # CUDA flash read the shared K/V), instead of materialising K and V `groups` times.
        gqa = q.shape[1] != k.shape[1]
        if start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif s == 1:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # a chunk appended after cached positions: query i sees keys up to start + i
            kpos = torch.arange(k.shape[2], device=x.device)
            qpos = torch.arange(start, start + s, device=x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=kpos[None, :] <= qpos[:, None],
                                                 enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))

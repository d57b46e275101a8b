"""Grouped-query causal self-attention (Ainslie et al., 2023): full causal on PyTorch SDPA, or a
sliding-window / top-k sparse / document-masked variant (models/common/sparse_attention.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.common.kv_cache import KVCache, SlotKVCache
from lmforge.models.common.linear import Linear, MatmulKernels, fused_linear
from lmforge.models.common.rope import apply_rope
from lmforge.models.common.sparse_attention import AttnSpec, attend, pair_mask, select_blocks


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, qkv_bias: bool = False,
                 kernels: MatmulKernels | None = None, spec: AttnSpec | None = None, backend: str = "auto"):
        super().__init__()
        self.spec = spec or AttnSpec()  # this layer's variant (full, window, topk)
        self.backend = backend
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
                cache: KVCache | SlotKVCache | None = None, layer: int = 0, doc_start: torch.Tensor | None = None
                ) -> torch.Tensor:
        """doc_start (batch, seq): each token's document start (document masking) or None."""
        if isinstance(cache, SlotKVCache):
            return self._slots(x, cos, sin, cache, layer)
        b, s, _ = x.shape
        # -1 instead of n_heads: under tensor parallelism each rank holds only its local heads.
        q, k, v = fused_linear(x, (self.wq, self.wk, self.wv), self.kernels)
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
        # From the fused projection q, k, v are views of one output; v is saved for backward as it
        # is, and as a view it would keep q's and k's bytes alive too (RoPE copies q and k): its
        # own copy (a no-op when v is already a tensor of its own) keeps activation memory that of
        # three separate projections (the planner's memory model, plan/memory.py).
        v = v.contiguous()
        cos, sin = cos[:s], sin[:s]  # tables from this chunk's first position; may be longer
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = cache.pos if cache is not None else 0
        if start == 0:  # training, or a prompt: the whole-sequence kernels
            if cache is not None:
                cache.update(layer, k, v)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if cache is not None and self.spec.kind == "topk":
                self._keep_block_query(cache, layer, q, k.shape[1], 0)
            if self.spec.kind == "full" and doc_start is None and self.backend != "dense":
                # Query head h reads KV head h // (heads / kv_heads) (also per rank under TP: both
                # counts are local there). SDPA's GQA mode does that inside the kernel (CPU flash
                # attention and CUDA flash read the shared K/V) instead of materialising K and V.
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
            else:
                out = attend(q, k, v, self.spec, doc_start, self.backend)
        else:
            out = self._cached(q, k, v, cache, layer, start)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))

    def _slots(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: SlotKVCache,
               layer: int) -> torch.Tensor:
        """Continuous batching: each row is its own sequence at its own position. cos, sin are
        (rows * seq, head_dim // 2), one angle per row and position (Transformer.forward)."""
        if self.spec.kind == "topk":
            raise ValueError("continuous batching supports full and sliding-window attention, not top-k")
        b, s, _ = x.shape
        q, k, v = fused_linear(x, (self.wq, self.wk, self.wv), self.kernels)
        q, k, v = (t.reshape(b, s, -1, self.head_dim) for t in (q, k, v))
        # apply_rope takes one angle table per position: rows and positions flattened into one axis
        q = apply_rope(q.reshape(1, b * s, -1, self.head_dim), cos, sin).view(b, s, -1, self.head_dim)
        k = apply_rope(k.reshape(1, b * s, -1, self.head_dim), cos, sin).view(b, s, -1, self.head_dim)
        keys, values, mask = cache.update(layer, k, v)
        if self.spec.local is not None:  # sliding window: also keys less than `local` positions back
            mask = mask & (cache.positions[:, None, :, None] - cache.kpos[None, None, None, :] < self.spec.local)
        q, keys, values = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=q.shape[1] != keys.shape[1])
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))

    def _keep_block_query(self, cache: KVCache, layer: int, q: torch.Tensor, kvh: int, start: int) -> None:
        """Top-k: remember the first query (summed per KV group) of the block the chunk ends in."""
        B, s = self.spec.block, q.shape[2]
        first = (start + s - 1) // B * B
        if first >= start:
            b, h, _, d = q.shape
            cache.block_q[layer] = (first // B, q[:, :, first - start].reshape(b, kvh, h // kvh, d).sum(2))

    def _cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, layer: int,
                start: int) -> torch.Tensor:
        """Tokens appended after `start` cached positions: each query reads the cached keys its
        variant allows (the same rules as training: sparse_attention.pair_mask)."""
        b, s = q.shape[:2]
        k, v, kpos = cache.update(layer, k, v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        h, kvh = q.shape[1], k.shape[1]
        gqa = h != kvh
        if self.spec.kind == "full" and s == 1:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        qpos = torch.arange(start, start + s, device=q.device)
        kpos = kpos if kpos is not None else torch.arange(k.shape[2], device=q.device)
        sel = None
        if self.spec.kind == "topk":
            B, d = self.spec.block, q.shape[-1]
            qsum = q.reshape(b, kvh, h // kvh, s, d).sum(2)
            blocks = torch.arange(start // B, (start + s - 1) // B + 1, device=q.device)
            firsts = []
            for i in blocks.tolist():
                if i * B >= start:
                    firsts.append(qsum[:, :, i * B - start])
                else:
                    kept_block, kept = cache.block_q[layer]
                    assert kept_block == i, "top-k cache: the block's first query was not kept"
                    firsts.append(kept)
            sel = select_blocks(torch.stack(firsts, dim=2), k, self.spec, blocks)
            self._keep_block_query(cache, layer, q, kvh, start)
        mask = pair_mask(self.spec, qpos, kpos, None, sel)
        if mask.shape[1] > 1:
            mask = mask.repeat_interleave(h // kvh, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

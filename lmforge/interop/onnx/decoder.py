"""The lmforge decoder as a function of explicit tensors, the form ONNX needs: the KV cache goes in
and comes out as tensors instead of living in a `KVCache` object the model mutates.

Why a separate forward: `Transformer.forward` keeps its cache in Python objects (preallocated
buffers, a position counter, rolling windows) and picks kernels per call (fused CPU matmuls,
blocked SDPA), none of which an exported graph can hold. `KVDecoder` reads the model's own
parameters and RoPE tables and computes the same function in plain ops, with the one mask
definition of models/common/sparse_attention.py (`pair_mask`); the tests and bench/onnx_export.py
hold its greedy tokens to `serve.generate.generate`'s.

Per layer the cache is the keys and values of every earlier position, (batch, kv_heads, past,
head_dim), as Hugging Face / Optimum decoders lay it out: `present` = `past` with this call's
positions appended. Sliding-window layers keep every position too (the window is applied by the
mask, not by a rolling buffer: same result, O(n) memory). Positions continue from the past length;
`doc_start` (batch, seq) is each new token's document start (zeros: one document, as `generate`
treats a prompt; `document_starts` of packed text: the trainer's and `lmforge eval`'s masking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.common.sparse_attention import AttnSpec, pair_mask, spec_for
from lmforge.models.llama.model import Transformer


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as models/common/norms.py computes it (fp32: the exported model is fp32)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, seq, head_dim) rotated as models/common/rope.py does ("rotate half");
    cos, sin (seq, head_dim // 2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVDecoder(nn.Module):
    """(input_ids, doc_start, past keys/values per layer) -> (logits, present keys/values per layer),
    over the parameters of a dense lmforge `Transformer` with full or sliding-window attention
    (export.py refuses the rest before it builds one)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        cfg = model.cfg
        self.n_layers = cfg.n_layers
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.specs: list[AttnSpec] = [spec_for(cfg, i) for i in range(cfg.n_layers)]

    def forward(self, input_ids: torch.Tensor, doc_start: torch.Tensor, *past: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        """`past`: key 0, value 0, key 1, value 1, ... Returns logits (batch, seq, vocab) then the
        present keys and values in the same order."""
        m = self.model
        b, s = input_ids.shape
        start = past[0].shape[2]
        qpos = torch.arange(s, device=input_ids.device) + start
        kpos = torch.arange(start + s, device=input_ids.device)
        cos = m.rope_cos[start:start + s].to(torch.float32)
        sin = m.rope_sin[start:start + s].to(torch.float32)
        h = m.tok_embeddings(input_ids)
        present: list[torch.Tensor] = []
        for i, layer in enumerate(m.layers.values()):
            a = layer.attention
            x = _rms_norm(h, layer.attention_norm.weight, layer.attention_norm.eps)
            q = F.linear(x, a.wq.weight, a.wq.bias).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
            k = F.linear(x, a.wk.weight, a.wk.bias).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            v = F.linear(x, a.wv.weight, a.wv.bias).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            mask = pair_mask(self.specs[i], qpos, kpos, doc_start)  # (b|1, 1, s, past + s)
            group = self.n_heads // self.kv_heads
            kk = k.repeat_interleave(group, dim=1) if group > 1 else k
            vv = v.repeat_interleave(group, dim=1) if group > 1 else v
            out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
            h = h + F.linear(out.transpose(1, 2).reshape(b, s, -1), a.wo.weight)
            x = _rms_norm(h, layer.ffn_norm.weight, layer.ffn_norm.eps)
            f = layer.feed_forward
            h = h + F.linear(F.silu(F.linear(x, f.w1.weight)) * F.linear(x, f.w3.weight), f.w2.weight)
        h = _rms_norm(h, m.norm.weight, m.norm.eps)
        return (F.linear(h, m.output.weight), *present)

    def empty_past(self, batch: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """The cache of no positions: 2 * n_layers tensors (batch, kv_heads, 0, head_dim)."""
        return [torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=dtype)
                for _ in range(2 * self.n_layers)]

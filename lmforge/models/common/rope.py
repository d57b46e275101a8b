"""Rotary position embedding (Su et al., 2021) in the "rotate half" layout.

The first and second halves of each head dimension form the rotated pairs (the layout Hugging
Face Llama checkpoints use), so weights move to and from HF without permuting q/k rows.
"""

from __future__ import annotations

import torch


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim // 2), fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float64, device=device)
    angles = torch.outer(t, inv_freq)
    return angles.cos().float(), angles.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written into one output: 4 kernels, no cat."""
    x1, x2 = x.chunk(2, dim=-1)
    if torch.compiler.is_compiling():
        # Dynamo cannot trace `out=` into a non-contiguous view: each call would break the graph
        # (and a break inside a tensor-parallel block left DTensor gradients as plain tensors).
        # Inductor fuses this form into one kernel anyway.
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = torch.empty_like(x)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _Rope(torch.autograd.Function):
    """A rotation's gradient is the inverse rotation (angle -theta: sin -> -sin), so backward
    needs only the tables, not x, and costs the same four kernels as forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (batch, seq, heads, head_dim) by per-position angles (seq, head_dim // 2)."""
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    return _Rope.apply(x, cos, sin)

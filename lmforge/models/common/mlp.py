"""SwiGLU feed-forward (Shazeer, 2020): w2(silu(w1 x) * w3 x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.common.linear import Linear, MatmulKernels, fused_linear


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, kernels: MatmulKernels | None = None):
        super().__init__()
        self.kernels = kernels  # fp32 CPU: gate and up as one matmul, kernels chosen per shape (linear.py)
        self.w1 = Linear(dim, hidden, bias=False, kernels=kernels)  # gate
        self.w3 = Linear(dim, hidden, bias=False, kernels=kernels)  # up
        self.w2 = Linear(hidden, dim, bias=False, kernels=kernels)  # down

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.w3.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std, a=-3 * out_std, b=3 * out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, (self.w1, self.w3), self.kernels)
        return self.w2(F.silu(gate) * up)

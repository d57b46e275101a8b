"""SwiGLU feed-forward (Shazeer, 2020): w2(silu(w1 x) * w3 x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.common.linear import Linear, MatmulKernels, fused_linear


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only; backward recomputes silu(gate) (one elementwise
    pass more). Autograd's own graph saves silu(gate) as well (a third hidden-size tensor per
    token) and allocates five fresh outputs per step where this allocates four (the product and
    the gradient of up are written in place); results are identical bit for bit."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        activated = F.silu(gate)
        return activated.mul_(up) if gate.dtype == up.dtype else activated * up  # mixed: promotes

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward((grad * up).to(gate.dtype), gate)
        activated = F.silu(gate)  # d(out)/d(up); a fresh tensor, ours to overwrite
        return grad_gate, activated.mul_(grad) if gate.dtype == grad.dtype else activated * grad


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating, silu(gate) * up, keeping a third less for backward (see _SiluMul). The
    Function must trace as one graph under torch.compile: a first version that broke it (a
    torch.result_type call) made compiled tensor-parallel blocks read losses 0.7% off from a warm
    inductor cache (torch 2.13; tests/cli/test_ddp_parity.py runs compiled layouts cold and warm)."""
    return _SiluMul.apply(gate, up)


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
        return self.w2(silu_mul(gate, up))

"""RMSNorm (Zhang & Sennrich, 2019): scale by the root mean square, no mean subtraction, no bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNormFn(torch.autograd.Function):
    """y = x_hat * w, x_hat = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps), in fp32 (at least).

    On CPU, autograd through the composite F.rms_norm costs 4 full-size passes forward and 11
    backward; this costs 3 and 7, with the closed-form backward from x_hat and rstd (x_hat is
    saved instead of x: same memory). See docs/benchmarks.md for what it gave::

        dw = sum over rows of dy * x_hat
        dx = rstd * (dy*w - x_hat * mean(dy*w * x_hat))
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 for bf16/fp16 (fp64 stays)
        # mean(x^2) as |x|^2 / dim: one reading pass, no x^2 temporary.
        rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        x_hat = xf * rstd
        ctx.save_for_backward(x_hat, weight, rstd)
        ctx.x_dtype = x.dtype
        # The scale and the cast to out_dtype in one pass.
        return torch.mul(x_hat, weight.to(xf.dtype), out=torch.empty_like(x_hat, dtype=out_dtype))

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        x_hat, weight, rstd = ctx.saved_tensors
        # dy may be bf16: the products below promote to x_hat's dtype without a separate cast.
        dw = (dy * x_hat).sum(tuple(range(dy.dim() - 1)))
        dyw = dy * weight.to(x_hat.dtype)
        dx = torch.addcmul(dyw, x_hat, (dyw * x_hat).mean(-1, keepdim=True), value=-1).mul_(rstd)
        return dx.to(ctx.x_dtype), dw.to(weight.dtype), None, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise in fp32 (as Llama and HF do) and hand back the input's dtype, or under
        autocast the autocast dtype: every consumer of a norm is a matmul that would cast to it
        anyway, so casting once here saves a cast per consumer, forward and backward."""
        dev = x.device.type
        autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)  # not on meta
        out_dtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
        if dev != "cpu":  # CUDA has fused rms_norm kernels (forward and backward): use them
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(out_dtype)
        return _RMSNormFn.apply(x, self.weight, self.eps, out_dtype)

"""Token cross-entropy on (tokens, vocab) logits, computed in fp32 without an fp32 copy of the logits.

`F.cross_entropy(logits.float(), targets)` on bf16 logits writes a full fp32 copy (2048 x 8192
tokens x vocab = 64 MiB), its log-softmax (64 MiB more), and in backward a zero-filled gradient, the
softmax gradient and a cast back: ~0.5 GB of memory traffic per step, ~80 ms on a 2-core CPU. This
Function walks the logits in row chunks that stay in cache, upcasting each chunk to fp32 only while
it is used::

    m_i = max_j z_ij,   e_ij = exp(z_ij - m_i),   s_i = sum_j e_ij           (fp32, per chunk)
    loss = mean_i(m_i + log s_i - z_i,t_i)
    dz_ij = g / N * (e_ij / s_i - [j == t_i])                             (stored in z's dtype)

Each exponential is computed once and serves both the sum and the softmax (`torch.logsumexp`
followed by `exp(z - lse)` computed them twice: the loss of a 2048 x 8192 step took 1.6-2.1x as
long, bench/cross_entropy.py).

The gradient (for g = 1) is computed in forward, while each chunk is still in cache, and saved
instead of the logits; backward only scales it when g != 1. With `overwrite_logits` it is written
into the logits' own memory, so a training step allocates no gradient buffer at all. It has the
logits' dtype, as the plain path's `.float()` backward gives. On CUDA the fused kernels of
`F.cross_entropy` are used instead (chunking is a CPU cache matter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK_BYTES = 2**21  # one fp32 chunk of rows: fits a core's L2 (2 MiB here)


def chunk_rows(vocab: int) -> int:
    """Rows of (rows, vocab) logits whose fp32 copy stays in a core's L2 (at least 16)."""
    return max(16, _CHUNK_BYTES // (4 * vocab))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the gradient too, chunk by chunk while the chunk is in cache: the backward
    pass over all logits (a read of the logits and a write of a fresh gradient buffer, the
    largest allocation of a CPU step and ~16k page faults) is gone. Backward returns the saved
    gradient, scaled when the incoming gradient is not 1 (gradient accumulation)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, overwrite: bool) -> torch.Tensor:
        n, vocab = logits.shape
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
        step = chunk_rows(vocab)
        losses = torch.empty(n, dtype=acc, device=logits.device)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits if overwrite else torch.empty_like(logits)
        same_dtype = logits.dtype == acc  # fp32 logits: work in the gradient's own rows, no copies
        minus_inv_n = torch.full((min(step, n), 1), -1.0 / n, dtype=acc, device=logits.device)  # at each target
        for r in range(0, n, step):
            rows = slice(r, r + step)
            z, t = logits[rows].to(acc), targets[rows, None]
            if grad is None:
                torch.sub(torch.logsumexp(z, -1), z.gather(1, t).squeeze(1), out=losses[rows])
                continue
            # exp(z - max) once: it is both the softmax's numerator and the sum lse needs.
            zt = z.gather(1, t).squeeze(1)  # read before z is overwritten
            m = z.amax(-1, keepdim=True)
            p = grad[rows] if same_dtype else z  # z: this chunk's own fp32 copy, free to overwrite
            torch.sub(z, m, out=p).exp_()
            total = p.sum(-1, keepdim=True)
            torch.sub(total.log().add_(m).squeeze(1), zt, out=losses[rows])
            p.mul_(total.reciprocal_().mul_(1.0 / n))
            p.scatter_add_(1, t, minus_inv_n[:p.shape[0]])
            if not same_dtype:
                grad[rows].copy_(p)
        if grad is not None:
            ctx.save_for_backward(grad)
            ctx.in_place = overwrite
        return losses.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        scale = float(grad_out)
        if scale == 1.0:
            return grad, None, None
        # In the logits' memory (this step's only copy) the scaling is in place; a second backward
        # through the same loss then fails autograd's saved-tensor version check, loudly.
        return (grad.mul_(scale) if ctx.in_place else grad * scale), None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, overwrite_logits: bool = False) -> torch.Tensor:
    """Mean cross-entropy in (at least) fp32 of logits (..., vocab) against integer targets (...).

    Every target must be a valid class index (packed LM data has no padding to ignore).
    `overwrite_logits=True` lets the loss write its gradient into the logits' own memory when
    they need one (no 64 MiB buffer for a 2048 x 8192 step): for a caller that reads the logits no
    more after the loss, as the trainer. Without a gradient (evaluation), or when the logits are a
    view of another tensor, they stay as they are."""
    # Not into a view: autograd forbids in-place writes to views that other autograd Functions
    # made (DDP's output sink, DTensor's to_local), and a view may share memory a caller reads.
    overwrite = overwrite_logits and not logits._is_view()
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if logits.device.type != "cpu":
        return F.cross_entropy(logits.float(), targets)
    with torch.autocast("cpu", enabled=False):  # fp32 math is chosen inside; no autocast casts
        return _ChunkedCrossEntropy.apply(logits, targets, overwrite)

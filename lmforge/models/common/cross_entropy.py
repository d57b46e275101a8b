"""Token cross-entropy on (tokens, vocab) logits, computed in fp32 without an fp32 copy of the logits.

`F.cross_entropy(logits.float(), targets)` on bf16 logits writes a full fp32 copy (2048 x 8192
tokens x vocab = 64 MiB), its log-softmax (64 MiB more), and in backward a zero-filled gradient, the
softmax gradient and a cast back: ~0.5 GB of memory traffic per step, ~80 ms on a 2-core CPU. This
Function walks the logits in row chunks that stay in cache, upcasting each chunk to fp32 only while
it is used::

    forward:  lse_i = logsumexp_j(z_ij) (fp32, per chunk);  loss = mean_i(lse_i - z_i,t_i)
    backward: dz_ij = g / N * (exp(z_ij - lse_i) - [j == t_i])   (fp32 per chunk, stored in z's dtype)

It saves the logits (already alive for autograd in the plain path) and one fp32 per token. The
gradient has the logits' dtype, as the plain path's `.float()` backward gives. On CUDA the fused
kernels of `F.cross_entropy` are used instead (chunking is a CPU cache matter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK_BYTES = 2**21  # one fp32 chunk of rows: fits a core's L2 (2 MiB here)


def _chunk_rows(vocab: int) -> int:
    return max(16, _CHUNK_BYTES // (4 * vocab))


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, vocab = logits.shape
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
        step = _chunk_rows(vocab)
        lse = torch.empty(n, dtype=acc, device=logits.device)
        for r in range(0, n, step):
            torch.logsumexp(logits[r:r + step].to(acc), -1, out=lse[r:r + step])
        target_logit = logits.gather(1, targets[:, None]).squeeze(1).to(acc)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        n, vocab = logits.shape
        step = _chunk_rows(vocab)
        scale = grad_out.to(lse.dtype) / n
        grad = torch.empty_like(logits)
        same_dtype = logits.dtype == lse.dtype  # fp32 logits: work in the gradient's own rows, no copies
        for r in range(0, n, step):
            rows = slice(r, r + step)
            p = grad[rows] if same_dtype else torch.empty(grad[rows].shape, dtype=lse.dtype)
            torch.sub(logits[rows], lse[rows, None], out=p).exp_().mul_(scale)
            p.scatter_add_(1, targets[rows, None], (-scale).expand(p.shape[0], 1))
            if not same_dtype:
                grad[rows].copy_(p)
        return grad, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in (at least) fp32 of logits (..., vocab) against integer targets (...).

    Every target must be a valid class index (packed LM data has no padding to ignore)."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if logits.device.type != "cpu":
        return F.cross_entropy(logits.float(), targets)
    with torch.autocast("cpu", enabled=False):  # fp32 math is chosen inside; no autocast casts
        return _ChunkedCrossEntropy.apply(logits, targets)

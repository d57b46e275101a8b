"""Cross-entropy on vocabulary-sharded logits (tensor parallelism's loss parallel) on CPU, in
fp32 chunks that stay in cache, with two small all-reduces and no communication in backward
(Megatron-LM's vocab-parallel cross-entropy, computed as lmforge/models/common/cross_entropy.py
computes the unsharded one).

torch's `loss_parallel()` runs the sharded loss through DTensor's op handlers: an fp32 copy of the
logits, a log-softmax over them and, in backward, the softmax again. On a 2-core CPU in bf16 (tp 2,
4,096 tokens x 4,096 vocab; bench/parallel_overhead.py's tp layout) its exp and sub alone took
~80 ms a step, against ~26 ms for the one-process run's whole chunked loss (bench/vocab_parallel_loss.py
times torch's against this one on 2 ranks). Here each rank works on its own shard, row chunk by row chunk:

    m_i   = this shard's max of z_ij;  M_i = the max of m_i over the tp group (all-reduce MAX)
    s_i   = exp(m_i - M_i) x the sum over this shard's exp(z_ij - m_i)
    t_i   = z_i,target where the target is in this shard, else 0
    S, T  = the sums of s_i and t_i over the group (one all-reduce SUM of both)
    loss  = mean_i(lse_i - T_i),  lse_i = M_i + log S_i
    dz_ij = g / N * (exp(z_ij - lse_i) - [j == target_i])   (this shard's columns only)

The gradient is computed in forward, as in the unsharded loss, and saved instead of the logits.
When the logits are fp32 (the gradient's dtype is the math's), the first pass writes exp(z_ij - m_i)
into the gradient's rows and the second only scales them by exp(m_i - lse_i) / N, so each logit is
exponentiated once. bf16 logits keep two passes: holding their fp32 exponentials across the
all-reduces would take twice the logits' memory, and rounding them to bf16 there would round the
gradient twice."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lmforge.models.common.cross_entropy import chunk_rows


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """(N, V/tp) local logits and (N,) global target ids -> the mean loss over the N rows, equal on
    every rank of `group`; backward returns this shard's gradient (scaled when the incoming one is
    not 1)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                group: dist.ProcessGroup) -> torch.Tensor:
        n, vocab = logits.shape
        acc = torch.promote_types(logits.dtype, torch.float32)
        step = chunk_rows(vocab)
        local = targets - vocab_start
        inside = (local >= 0) & (local < vocab)
        safe = torch.where(inside, local, torch.zeros_like(local))[:, None]
        row_max = torch.empty(n, dtype=acc, device=logits.device)
        sums = torch.zeros(2, n, dtype=acc, device=logits.device)  # [sum of exp(z - row_max), target logit]
        needs_grad = ctx.needs_input_grad[0]
        exps_kept = needs_grad and logits.dtype == acc  # exp(z - row_max) stays in the gradient's rows
        grad = torch.empty_like(logits) if exps_kept else None
        for r in range(0, n, step):
            z = logits[r:r + step].to(acc)
            m = z.amax(-1)
            row_max[r:r + step] = m
            if exps_kept:
                sums[0, r:r + step] = torch.sub(z, m[:, None], out=grad[r:r + step]).exp_().sum(-1)
            else:
                sums[0, r:r + step] = torch.sub(z, m[:, None]).exp_().sum(-1)
            sums[1, r:r + step] = z.gather(1, safe[r:r + step]).squeeze(1)
        sums[1] *= inside
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        sums[0] *= torch.exp(row_max - global_max)
        dist.all_reduce(sums, group=group)
        lse = global_max + sums[0].log()
        loss = (lse - sums[1]).mean()
        if needs_grad:
            at_target = torch.where(inside, -1.0 / n, 0.0).to(acc)[:, None]
            if exps_kept:
                grad.mul_(torch.exp(row_max - lse).mul_(1.0 / n)[:, None])  # exp(z - lse) / N
                grad.scatter_add_(1, safe, at_target)
            else:
                grad = torch.empty_like(logits)
                for r in range(0, n, step):
                    p = torch.sub(logits[r:r + step].to(acc), lse[r:r + step, None]).exp_().mul_(1.0 / n)
                    p.scatter_add_(1, safe[r:r + step], at_target[r:r + step])
                    grad[r:r + step].copy_(p)
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        scale = float(grad_out)
        return (grad if scale == 1.0 else grad * scale), None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                                 group: dist.ProcessGroup) -> torch.Tensor:
    """Mean cross-entropy (fp32) of logits sharded along the vocabulary over `group`: this rank's
    (..., V/tp) columns starting at id `vocab_start`, and the full (...) target ids. Every rank of
    the group gets the same value; the gradient flows to this rank's columns only."""
    logits = local_logits.reshape(-1, local_logits.shape[-1])
    with torch.autocast(logits.device.type, enabled=False):  # fp32 math is chosen inside
        return _VocabParallelCrossEntropy.apply(logits, targets.reshape(-1), vocab_start, group)

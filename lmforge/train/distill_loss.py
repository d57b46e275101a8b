"""The distillation loss: alpha * T^2 * KL(teacher || student) at temperature T + (1 - alpha) * CE,
in row chunks so its memory stays that of the logits' gradient.

Computed plainly, the loss keeps for backward the student's log-softmax at T, the log-softmax at 1
(cross-entropy), the teacher's probabilities and their product: four (tokens, vocab) fp32 tensors
beside the logits (at 8 x 256 tokens x 8192 ids, 64 MiB each). This Function walks the rows in
chunks of `chunk_tokens`, computes each chunk's loss and its gradient at once (autograd over the
chunk only), and keeps one tensor: the gradient of the logits, which backward needs anyway.

The teacher is given as `TeacherTargets`: its whole logits (online, or a full-vocabulary cache),
or its top-k log-probabilities at T with their token ids (a top-k cache). With top-k the KL is
taken between the two distributions coarsened to k + 1 outcomes (the teacher's k tokens and "any
other token"): the student matches the teacher's top-k probabilities and its total tail mass, not
the shape of the tail. By the data-processing inequality this KL is <= the full one; the gap is
the teacher's tail mass x the KL between the two tail distributions (renormalised), which
`tests/unit/test_distill_loss.py` checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's distribution at N positions: `logits` (N, vocab), or `topk_logprobs` (N, k),
    log-probabilities at the distillation temperature, with `topk_ids` (N, k)."""

    logits: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.logits is None) == (self.topk_logprobs is None) or \
                (self.topk_logprobs is None) != (self.topk_ids is None):
            raise ValueError("TeacherTargets: give either logits, or topk_logprobs with topk_ids")

    @property
    def rows(self) -> int:
        return len(self.logits if self.logits is not None else self.topk_logprobs)

    def chunk(self, rows: slice) -> TeacherTargets:
        if self.logits is not None:
            return TeacherTargets(logits=self.logits[rows])
        return TeacherTargets(topk_logprobs=self.topk_logprobs[rows], topk_ids=self.topk_ids[rows])


def kl_per_row(student_logits: torch.Tensor, teacher: TeacherTargets, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of each row at `temperature` (fp32): summed over the vocabulary, or over
    the teacher's top-k tokens plus one "other tokens" bucket for a top-k teacher."""
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher.logits is not None:
        log_p = torch.log_softmax(teacher.logits.float() / temperature, dim=-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    log_p, ids = teacher.topk_logprobs.float(), teacher.topk_ids.long()
    p = log_p.exp()
    tail_p = (1.0 - p.sum(-1)).clamp_min(0.0)  # fp16 rounding can push the kept mass past 1
    # log of the student's mass outside the teacher's top-k: finite, since log_q is (V > k)
    log_q_tail = torch.logsumexp(log_q.scatter(-1, ids, float("-inf")), dim=-1)
    head = (p * (log_p - log_q.gather(-1, ids))).sum(-1)
    return head + torch.xlogy(tail_p, tail_p) - tail_p * log_q_tail


class _ChunkedDistillLoss(torch.autograd.Function):
    """(loss, mean KL, mean CE) of (N, V) logits; the gradient is computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, teacher: TeacherTargets, alpha: float,
                temperature: float, chunk_tokens: int):
        n = logits.shape[0]
        grad = torch.empty_like(logits)
        kl_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
        kl_weight, ce_weight = alpha * temperature**2 / n, (1.0 - alpha) / n
        with torch.enable_grad(), torch.autocast(logits.device.type, enabled=False):
            for r in range(0, n, chunk_tokens):
                rows = slice(r, r + chunk_tokens)
                z = logits[rows].detach().float().requires_grad_(True)
                kl = kl_per_row(z, teacher.chunk(rows), temperature).sum()
                ce = -torch.log_softmax(z, dim=-1).gather(-1, targets[rows, None]).sum()
                (g,) = torch.autograd.grad(kl_weight * kl + ce_weight * ce, z)
                grad[rows] = g.to(grad.dtype)
                kl_sum += kl.detach()
                ce_sum += ce.detach()
        ctx.save_for_backward(grad)
        kl_mean, ce_mean = kl_sum / n, ce_sum / n
        ctx.mark_non_differentiable(kl_mean, ce_mean)
        return alpha * temperature**2 * kl_mean + (1.0 - alpha) * ce_mean, kl_mean, ce_mean

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _kl: torch.Tensor, _ce: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def distill_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher: TeacherTargets, alpha: float,
                 temperature: float, chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha * T^2 * mean KL + (1 - alpha) * mean CE, mean KL, mean CE) over the tokens of
    (..., vocab) student logits and (...) targets; the teacher's rows in the same order. Only the
    first is differentiable (with respect to the student's logits)."""
    logits = student_logits.reshape(-1, student_logits.shape[-1])
    targets = targets.reshape(-1)
    if teacher.rows != logits.shape[0]:
        raise ValueError(f"teacher targets have {teacher.rows} rows, the student's logits {logits.shape[0]}")
    return _ChunkedDistillLoss.apply(logits, targets, teacher, float(alpha), float(temperature), int(chunk_tokens))

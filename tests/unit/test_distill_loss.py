"""The distillation loss (lmforge/train/distill_loss.py) against hand computations: alpha 0 is the
trainer's cross-entropy, alpha 1 is T^2 x KL(teacher || student), chunking changes nothing, and a
top-k teacher gives the coarsened KL (<= the full one, by exactly tail mass x tail KL)."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.models.common.cross_entropy import cross_entropy
from lmforge.train.distill_loss import TeacherTargets, distill_loss, kl_per_row

pytestmark = pytest.mark.usefixtures("one_thread")

N, V = 24, 50


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(N, V, generator=g) * 2
    teacher = torch.randn(N, V, generator=g) * 3
    targets = torch.randint(0, V, (N,), generator=g)
    return student, teacher, targets


def _hand_kl(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """Mean over rows of sum_v p_v (log p_v - log q_v), p and q softmaxes at t, in float64 loops."""
    total = 0.0
    for s_row, t_row in zip(student.double().tolist(), teacher.double().tolist()):
        zs = [v / t for v in s_row]
        zt = [v / t for v in t_row]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        total += sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(zs, zt))
    return total / len(student)


def test_alpha_zero_is_the_cross_entropy() -> None:
    student, teacher, y = _data()
    a = student.clone().requires_grad_(True)
    loss, _, ce = distill_loss(a, y, TeacherTargets(logits=teacher), alpha=0.0, temperature=2.0)
    b = student.clone().requires_grad_(True)
    ref = cross_entropy(b, y)
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert ce.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_alpha_one_is_t_squared_times_the_kl(temperature: float) -> None:
    student, teacher, y = _data(1)
    z = student.clone().requires_grad_(True)
    loss, kl, _ = distill_loss(z, y, TeacherTargets(logits=teacher), alpha=1.0, temperature=temperature)
    hand = _hand_kl(student, teacher, temperature)
    assert kl.item() == pytest.approx(hand, rel=1e-5)
    assert loss.item() == pytest.approx(temperature**2 * hand, rel=1e-5)
    loss.backward()  # d/dz of T^2 * KL = T * (softmax(z/T) - softmax(teacher/T)) / N
    want = temperature * (torch.softmax(student / temperature, -1) - torch.softmax(teacher / temperature, -1)) / N
    assert torch.allclose(z.grad, want, atol=1e-7)


def test_mixed_loss_and_chunks() -> None:
    """0.3 of one plus 0.7 of the other; any chunk size gives the same loss and gradient."""
    student, teacher, y = _data(2)
    grads, losses = [], []
    for chunk in (1, 5, 7, N, 1000):
        z = student.clone().requires_grad_(True)
        loss, kl, ce = distill_loss(z.view(2, N // 2, V), y.view(2, N // 2), TeacherTargets(logits=teacher),
                                    alpha=0.3, temperature=2.0, chunk_tokens=chunk)
        (2.5 * loss).backward()  # the incoming gradient scales the stored one
        assert loss.item() == pytest.approx(0.3 * 4 * kl.item() + 0.7 * ce.item(), rel=1e-6)
        losses.append(loss.item())
        grads.append(z.grad)
    assert max(losses) - min(losses) < 1e-6
    assert all(torch.allclose(g, grads[0], atol=1e-8) for g in grads)
    assert grads[0].abs().max() > 1e-3


def test_backward_keeps_one_logits_sized_tensor() -> None:
    """What the loss keeps for backward: the logits' gradient only (not the log-softmaxes at T and 1,
    the teacher's probabilities and their products, as autograd of the plain formula would)."""
    student, teacher, y = _data(6)
    z = student.clone().requires_grad_(True)
    loss, _, _ = distill_loss(z, y, TeacherTargets(logits=teacher), alpha=0.5, temperature=2.0, chunk_tokens=4)
    saved = loss.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == (N, V)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        kept: list[int] = []
        w = student.clone().requires_grad_(True)
        plain = 0.5 * 4 * kl_per_row(w, TeacherTargets(logits=teacher), 2.0).mean() + \
            0.5 * torch.nn.functional.cross_entropy(w, y)
    assert sum(kept) >= 3 * N * V  # the plain formula keeps at least three (N, V) tensors
    plain.backward()


def test_identical_distributions_have_zero_kl() -> None:
    student, _, y = _data(3)
    _, kl, _ = distill_loss(student, y, TeacherTargets(logits=student.clone()), alpha=1.0, temperature=1.5)
    assert abs(kl.item()) < 1e-6


@pytest.mark.parametrize("k", [1, 5, 20])
def test_top_k_teacher_is_the_coarsened_kl(k: int) -> None:
    """KL over the teacher's top-k tokens + one tail bucket = full KL - tail mass x KL(tail || tail),
    so it is never above the full KL and equal to it when the tails are proportional."""
    t = 2.0
    student, teacher, _ = _data(4)
    log_p = torch.log_softmax(teacher / t, -1)
    values, ids = log_p.topk(k, -1)
    coarse = kl_per_row(student, TeacherTargets(topk_logprobs=values, topk_ids=ids), t)
    full = kl_per_row(student, TeacherTargets(logits=teacher), t)
    log_q = torch.log_softmax(student / t, -1)
    tail = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, ids, False)
    p_tail = (log_p.exp() * tail).sum(-1)
    lp_cond = (log_p - p_tail.log()[:, None]).masked_fill(~tail, 0)
    lq_cond = (log_q - torch.logsumexp(log_q.masked_fill(~tail, float("-inf")), -1)[:, None]).masked_fill(~tail, 0)
    tail_kl = (lp_cond.exp() * tail * (lp_cond - lq_cond)).sum(-1)
    assert torch.allclose(coarse, full - p_tail * tail_kl, atol=1e-5)
    assert bool((coarse <= full + 1e-6).all())
    # a student whose tail is the teacher's tail, rescaled: the coarsened KL is the full KL
    same_tail = torch.where(tail, teacher / t, student / t) * t
    assert torch.allclose(kl_per_row(same_tail, TeacherTargets(topk_logprobs=values, topk_ids=ids), t),
                          kl_per_row(same_tail, TeacherTargets(logits=teacher), t), atol=1e-5)


def test_top_k_gradient_matches_autograd_of_the_formula() -> None:
    student, teacher, y = _data(5)
    values, ids = torch.log_softmax(teacher / 2.0, -1).topk(8, -1)
    targets = TeacherTargets(topk_logprobs=values.half(), topk_ids=ids.int())
    z = student.clone().requires_grad_(True)
    loss, _, _ = distill_loss(z, y, targets, alpha=0.6, temperature=2.0, chunk_tokens=5)
    loss.backward()
    w = student.clone().requires_grad_(True)
    ref = 0.6 * 4 * kl_per_row(w, targets, 2.0).mean() + 0.4 * torch.nn.functional.cross_entropy(w, y)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(z.grad, w.grad, atol=1e-7)

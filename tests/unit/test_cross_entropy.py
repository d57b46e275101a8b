"""The chunked CPU cross-entropy equals F.cross_entropy on fp32 logits: value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.models.common import cross_entropy as ce
from tests.helpers.exponentials import ExponentialCounter


def _pair(dtype: torch.dtype, n: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, vocab, generator=g)).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    return logits, targets


@pytest.mark.parametrize("n", [1, 37, 300])  # fewer rows than a chunk, a ragged last chunk, several chunks
def test_fp32_value_and_grad_match_reference(n: int) -> None:
    logits, targets = _pair(torch.float32, n, 4096)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    loss = ce.cross_entropy(a, targets)
    ref = F.cross_entropy(b, targets)
    (2.5 * loss).backward()
    (2.5 * ref).backward()
    assert torch.allclose(loss, ref, rtol=1e-6, atol=1e-6), (float(loss), float(ref))
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8)
    assert torch.equal(a.detach(), logits)  # backward must not edit the saved logits in place


def test_bf16_logits_match_the_upcast_reference() -> None:
    logits, targets = _pair(torch.bfloat16, 200, 1024)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    loss = ce.cross_entropy(a.view(4, 50, 1024), targets.view(4, 50))  # (batch, seq, vocab) accepted
    ref = F.cross_entropy(b.float(), targets)
    loss.backward()
    ref.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-5
    assert a.grad.dtype == torch.bfloat16
    # Both round the same fp32 gradient to bf16: equal up to one bf16 ulp of the largest entries.
    assert torch.allclose(a.grad.float(), b.grad.float(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_exponentiates_each_logit_once(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exponentials serve both the log-sum-exp and the softmax gradient: logsumexp followed by
    exp(z - lse) computed every one twice (a 2048 x 8192 step took ~2x as long)."""
    logits, targets = _pair(dtype, 300, 512)
    monkeypatch.setattr(ce, "chunk_rows", lambda vocab: 64)  # several chunks and a ragged last one
    with ExponentialCounter() as counter:
        loss = ce.cross_entropy(logits.clone().requires_grad_() * 1.0, targets, overwrite_logits=True)
        loss.backward()
    assert counter.elements == logits.numel()


def test_gradcheck_float64() -> None:
    logits, targets = _pair(torch.float64, 40, 24)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: ce._ChunkedCrossEntropy.apply(z, targets, False), (logits,))


def test_under_autocast_same_as_outside() -> None:
    logits, targets = _pair(torch.bfloat16, 64, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ce.cross_entropy(logits, targets)
    assert torch.equal(inside, ce.cross_entropy(logits, targets))


def _through_a_head(dtype: torch.dtype, overwrite: bool, scale: float):
    """logits = h @ W^T (as the model's head makes them), loss * scale backward: (loss, h.grad, W.grad)."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 64, generator=g).requires_grad_()
    w = (0.5 * torch.randn(2048, 64, generator=g)).requires_grad_()
    targets = torch.randint(0, 2048, (300,), generator=g)
    logits = F.linear(h.to(dtype).view(3, 100, 64), w.to(dtype))  # (3, 100, 2048), not a view
    before = logits.detach().clone()
    loss = (ce.cross_entropy(logits, targets.view(3, 100), overwrite_logits=True) if overwrite
            else F.cross_entropy(logits.flatten(0, 1).float(), targets))
    (scale * loss).backward()
    assert torch.equal(logits.detach(), before) != overwrite  # the in-place path did run (or did not)
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("scale", [1.0, 0.25])  # 0.25: a gradient-accumulation step scales the loss
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overwriting_the_logits_gives_the_reference_gradients(dtype: torch.dtype, scale: float) -> None:
    loss, dh, dw = _through_a_head(dtype, True, scale)
    ref_loss, ref_dh, ref_dw = _through_a_head(dtype, False, scale)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dh, ref_dh, **tol)
    torch.testing.assert_close(dw, ref_dw, **tol)


def test_overwrite_leaves_logits_alone_without_a_gradient() -> None:
    logits, targets = _pair(torch.float32, 100, 512)
    before = logits.clone()
    with torch.no_grad():
        ce.cross_entropy(logits, targets, overwrite_logits=True)
    ce.cross_entropy(logits, targets, overwrite_logits=True)  # logits needs no gradient: evaluation
    assert torch.equal(logits, before)


def test_overwrite_refuses_a_second_scaled_backward() -> None:
    """The in-place scaling would apply twice: autograd's version check stops it."""
    logits, targets = _pair(torch.float32, 50, 256)
    z = logits.clone().requires_grad_()
    loss = 0.5 * ce.cross_entropy(z * 1.0, targets, overwrite_logits=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_view_is_never_overwritten() -> None:
    """A view may be another Function's output (DDP's sink, DTensor's to_local: autograd forbids
    writing into those) or memory the caller still reads: its values stay, its gradient is right."""
    logits, targets = _pair(torch.float32, 64, 256)
    base = logits.clone().requires_grad_()
    view = base[:, :]
    before = view.detach().clone()
    (0.5 * ce.cross_entropy(view, targets, overwrite_logits=True)).backward()
    assert torch.equal(view.detach(), before)
    ref = logits.clone().requires_grad_()
    (0.5 * F.cross_entropy(ref, targets)).backward()
    torch.testing.assert_close(base.grad, ref.grad, rtol=1e-5, atol=1e-8)

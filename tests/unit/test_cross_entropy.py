"""The chunked CPU cross-entropy equals F.cross_entropy on fp32 logits: value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.models.common import cross_entropy as ce


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


def test_gradcheck_float64() -> None:
    logits, targets = _pair(torch.float64, 40, 24)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: ce._ChunkedCrossEntropy.apply(z, targets), (logits,))


def test_under_autocast_same_as_outside() -> None:
    logits, targets = _pair(torch.bfloat16, 64, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ce.cross_entropy(logits, targets)
    assert torch.equal(inside, ce.cross_entropy(logits, targets))

"""lmforge.parallel.clip on plain tensors: bit-identical to torch.nn.utils.clip_grad_norm_ (the
DTensor / multi-mesh / pipeline cases are in tests/multi_rank/test_tp.py)."""

from __future__ import annotations

import pytest
import torch

from lmforge.parallel.clip import clip_grad_norm_


def _params(seed: int, scale: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 4, 2), (1,), (6, 6)]
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    for i, p in enumerate(params):
        if i != 3:  # one parameter without a gradient, as after a frozen or unused module
            p.grad = torch.randn(p.shape, generator=g) * scale
    params.append(torch.randn(4, 3, generator=g, dtype=torch.bfloat16).requires_grad_())
    params[-1].grad = (torch.randn(4, 3, generator=g) * scale).to(torch.bfloat16)
    return params


@pytest.mark.parametrize("max_norm, scale", [(1.0, 1.0), (100.0, 1.0), (0.25, 1e-3), (1e-4, 10.0)])
@pytest.mark.parametrize("foreach", [None, False, True])
def test_plain_tensors_identical_to_torch(max_norm: float, scale: float, foreach: bool | None) -> None:
    ours, ref = _params(0, scale), _params(0, scale)
    n_ours = clip_grad_norm_(iter(ours), max_norm, foreach=foreach)  # a generator, like model.parameters()
    n_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=foreach)
    assert torch.equal(n_ours, n_ref) and n_ours.dim() == 0
    for a, b in zip(ours, ref):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    clipped = max_norm < n_ref.item()
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float())
                                                  for p in ours if p.grad is not None]))
    if clipped:
        assert after.item() == pytest.approx(max_norm, rel=1e-2)  # bf16 grads: coarse
    else:
        assert after.item() == pytest.approx(n_ref.item(), rel=1e-2)


def test_single_tensor_and_no_grads() -> None:
    p = torch.ones(4, requires_grad=True)
    p.grad = torch.full((4,), 3.0)
    assert clip_grad_norm_(p, 1.0).item() == pytest.approx(6.0)
    assert torch.allclose(p.grad, torch.full((4,), 3.0 / (6.0 + 1e-6)))
    q = torch.ones(2, requires_grad=True)
    assert clip_grad_norm_([q], 1.0).item() == 0.0 and q.grad is None


def test_clipping_off_measures_the_norm_and_writes_no_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """max_norm = inf (train.max_grad_norm <= 0): the same norm as torch, and no scaling pass at
    all (torch would multiply every gradient by 1.0)."""
    ours, ref = _params(1, 1.0), _params(1, 1.0)
    before = [(p.grad.data_ptr(), p.grad.clone()) for p in ours if p.grad is not None]

    def no_scaling(*args, **kwargs):
        raise AssertionError("gradients were scaled with clipping off")
    monkeypatch.setattr("lmforge.parallel.clip.clip_grads_with_norm_", no_scaling)
    n_ours = clip_grad_norm_(ours, float("inf"))
    assert torch.equal(n_ours, torch.nn.utils.clip_grad_norm_(ref, float("inf")))
    after = [(p.grad.data_ptr(), p.grad) for p in ours if p.grad is not None]
    assert all(pa == pb and torch.equal(ga, gb) for (pa, ga), (pb, gb) in zip(before, after))

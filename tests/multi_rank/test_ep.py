"""Expert parallel at module level on 2 gloo ranks: the all-to-all dispatch/combine around the
experts gives the outputs and gradients one process gives for the same tokens, also with uneven
splits where some experts get no token from some rank (and one rank sends nothing to the other)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.spawn import run_ranks

DIM, HIDDEN, E, TOKENS = 8, 16, 4, 12


def _moe():
    from lmforge.config import MoEConfig
    from lmforge.models.common.moe import MoE

    torch.manual_seed(0)
    moe = MoE(DIM, HIDDEN, MoEConfig(n_experts=E, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001))
    moe.init_weights(0.2, 0.2)
    with torch.no_grad():  # expert e scores from input feature e: inputs decide the routing
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[:, :E] = 4 * torch.eye(E)
    return moe


def _tokens() -> list[torch.Tensor]:
    """Rank 0's tokens only light features 0 and 1 (they all go to experts 0 and 1, on ep rank 0:
    rank 0 sends nothing to rank 1, experts 2 and 3 get nothing from rank 0); rank 1's tokens
    are spread, with fewer of them."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(TOKENS, DIM, generator=g) * 0.1
    x0[:, :2] += torch.rand(TOKENS, 2, generator=g) + 1
    x1 = torch.randn(TOKENS - 5, DIM, generator=g)
    return [x0.reshape(1, TOKENS, DIM), x1.reshape(1, TOKENS - 5, DIM)]


def _grads(moe) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in moe.named_parameters():
        g = p.grad
        out[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def _ep_rank(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.parallel.ep import apply_ep

    torch.use_deterministic_algorithms(True)
    moe = _moe()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    assert apply_ep(moe, mesh["ep"]) == 1
    assert moe.experts.w1.to_local().shape == (E // world, HIDDEN, DIM)
    x = _tokens()[rank].requires_grad_(True)
    out = moe(x)
    counts = moe.last_stats["tokens_per_expert"]
    (out.square().sum() + moe.aux_loss).backward()
    grads = _grads(moe)
    # Routing is data parallel: its gradient is the local one (data parallel sums/averages it). The
    # experts' gradient is already the mean over the ep group (apply_ep scales it by 1/ep).
    dist.all_reduce(grads["router.gate.weight"])
    for name in ("experts.w1", "experts.w3", "experts.w2"):
        grads[name] = grads[name] * world
    return {"out": out.detach(), "x_grad": x.grad, "grads": grads, "counts": counts}


@pytest.mark.slow
def test_ep_dispatch_combine_match_one_process(tmp_path: Path) -> None:
    results = run_ranks(_ep_rank, 2, tmp_path)
    xs = _tokens()
    assert results[0]["counts"].tolist()[2:] == [0, 0] and results[1]["counts"].min() >= 0
    # One process, each rank's tokens through the plain MoE; gradients summed over the two.
    ref = _moe()
    outs, xgrads = [], []
    for x in xs:
        x = x.clone().requires_grad_(True)
        out = ref(x)
        (out.square().sum() + ref.aux_loss).backward()
        outs.append(out.detach())
        xgrads.append(x.grad)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["out"], outs[rank], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res["x_grad"], xgrads[rank], rtol=1e-6, atol=1e-6)
        assert res["grads"].keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            assert g.abs().sum() > 0, name
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)

"""Hierarchical all-reduce (lmforge.parallel.hierarchical) on 4 gloo ranks seen as 2 nodes x 2:
the groups hold the right ranks, sums of awkward lengths equal the flat all-reduce (bit-equal where
the additions are exact, within the fp32 bound of a reordered 4-term sum otherwise), and a DDP
model's gradients with the hook equal plain DDP's."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.spawn import run_ranks

SIZES = (1, 3, 7, 1001, 100_003)  # none (but 1) divisible by node_size = 2 except via padding
EPS32 = torch.finfo(torch.float32).eps


def _data(rank: int, n: int, integers: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + n)
    if integers:
        return torch.randint(-1000, 1000, (n,), generator=g).float()
    return torch.randn(n, generator=g) * 10 ** torch.randint(-3, 4, (n,), generator=g).float()


def _tiny_model() -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)  # same weights on every rank
        return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5),
                                   torch.nn.Linear(5, 3, bias=False))


def _grads(model: torch.nn.Module, rank: int, backwards: int = 3) -> list[torch.Tensor]:
    """Gradients summed over `backwards` backward passes (each a round of every bucket's hook)."""
    g = torch.Generator().manual_seed(rank)
    for _ in range(backwards):
        x, y = torch.randn(6, 7, generator=g), torch.randn(6, 3, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _compare(rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmforge.config.comm import CommConfig
    from lmforge.parallel.ddp import apply_ddp
    from lmforge.parallel.hierarchical import (
        HierarchicalState,
        hierarchical_allreduce,
        register_hierarchical_hook,
    )

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    state = HierarchicalState.from_mesh(mesh, node_size=2)
    out: dict = {"intra": dist.get_process_group_ranks(state.intra),
                 "inter": dist.get_process_group_ranks(state.inter), "sums": {}}
    for integers in (True, False):
        for n in SIZES:
            x = _data(rank, n, integers)
            flat, hier = x.clone(), x.clone()
            dist.all_reduce(flat)
            got = hierarchical_allreduce(hier, state).wait()
            assert got.data_ptr() == hier.data_ptr()  # in place, as DDP expects of its bucket
            out["sums"][(integers, n)] = (flat, hier)
    plain = DDP(_tiny_model(), process_group=mesh.get_group(), bucket_cap_mb=1e-4)  # several buckets
    hooked = DDP(_tiny_model(), process_group=mesh.get_group(), bucket_cap_mb=1e-4)
    register_hierarchical_hook(hooked, mesh, node_size=2)
    out["ddp"] = (_grads(plain, rank), _grads(hooked, rank))
    # the trainer's path: apply_ddp registers the hook when comm.hierarchical is on, and only then
    out["hooks"] = [[h.__name__ for h, _ in apply_ddp(_tiny_model(), mesh, CommConfig(hierarchical=on,
                                                                                     node_size=2))[0]._comm_hooks]
                    for on in (True, False)]
    return out


def _reorder_bound(parts: list[torch.Tensor]) -> torch.Tensor:
    """|a - b| for two summation orders of the same terms: each order's error is at most
    (terms - 1) * eps * sum |x_i| (plus the division by the world size, exact for 4)."""
    return 2 * (len(parts) - 1) * EPS32 * torch.stack([p.abs() for p in parts]).sum(0)


def test_hierarchical_equals_flat_on_2_nodes_x_2(tmp_path: Path) -> None:
    got = run_ranks(_compare, 4, tmp_path)
    for rank, r in enumerate(got):
        assert r["intra"] == [rank // 2 * 2, rank // 2 * 2 + 1]  # consecutive ranks share a node
        assert r["inter"] == [rank % 2, rank % 2 + 2]  # same local rank on the other node
        for (integers, n), (flat, hier) in r["sums"].items():
            exact = sum(_data(q, n, integers).double() for q in range(4))
            assert hier.shape == (n,)
            if integers:  # exact additions: bit-equal to the flat all-reduce and to the true sum
                assert torch.equal(hier, flat) and torch.equal(hier.double(), exact)
            else:
                bound = _reorder_bound([_data(q, n, False) for q in range(4)])
                assert ((hier - flat).abs() <= bound).all(), (n, (hier - flat).abs().max())
                assert ((hier.double() - exact).abs() <= bound).all()
        assert r["hooks"] == [["hierarchical_hook"], []]
        plain, hooked = r["ddp"]
        for g_flat, g_hier in zip(plain, hooked):
            assert torch.allclose(g_hier, g_flat, rtol=1e-6, atol=1e-7), (g_hier - g_flat).abs().max()
    # every rank holds the same averaged gradients, and they are the mean of the ranks' own ones
    local = [_grads(_tiny_model(), q) for q in range(4)]
    for i, g in enumerate(got[0]["ddp"][1]):
        mean = sum(loc[i].double() for loc in local) / 4
        assert torch.allclose(g.double(), mean, rtol=1e-5, atol=1e-7)
        for r in got[1:]:
            assert torch.equal(r["ddp"][1][i], g)

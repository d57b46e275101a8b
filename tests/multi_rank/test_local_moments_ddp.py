"""Each rank's AdamW moments before the compression (`comm.adam_moments = "local"`) under real DDP
on 2 gloo ranks: the hook leaves each rank its own gradient; with an exact payload the weights are
the mean of the two ranks' own AdamW updates, computed here from the gradients each rank saw; with
top-k after an int4 warm-up both replicas hold the same bits at every step, and the bytes sent
are counted against fp32's all-reduce."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.helpers.spawn import run_ranks

STEPS = 4
LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-8, 0.1


def _train(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmforge.config.comm import CommConfig
    from lmforge.models.llama.model import build_model
    from lmforge.models.llama.sizes import SIZES
    from lmforge.parallel.comm.ddp_hooks import register_compression
    from lmforge.train.local_moments_adamw import LocalMomentsAdamW

    cfg = replace(SIZES["debug"], max_seq_len=32)
    out: dict = {}
    for kind, comm in (("exact", CommConfig(compression="topk", topk_fraction=1.0, adam_moments="local")),
                       ("topk", CommConfig(compression="topk", topk_fraction=0.02, topk_payload="compact",
                                           warmup_steps=2, adam_moments="local"))):
        ddp = DDP(build_model(cfg, seed=0), gradient_as_bucket_view=True, bucket_cap_mb=0.05)
        exchange = register_compression(ddp, comm, dist.group.WORLD)
        params = list(ddp.module.parameters())
        opt = LocalMomentsAdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": WD},
                                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                exchange, lr=LR, betas=BETAS, eps=EPS)
        start = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
        grads, weights, ratios = [], [], []
        for step in range(STEPS):
            tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1000 * step + rank))
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
            grads.append({n: p.grad.detach().clone() for n, p in ddp.module.named_parameters()})
            opt.step()
            weights.append({n: p.detach().clone() for n, p in ddp.module.named_parameters()})
            ratios.append(exchange.accounting.window()["comm_compression_ratio"])
        out[kind] = {"start": start, "grads": grads, "weights": weights, "ratios": ratios}
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(_train, 2, tmp_path_factory.mktemp("local-moments"), preload=("torch", "lmforge.models.llama.model"))


@pytest.mark.distributed
def test_exact_payload_applies_the_mean_of_each_ranks_own_adamw_update(ranks: list[dict]) -> None:
    import torch

    r0, r1 = ranks[0]["exact"], ranks[1]["exact"]
    for name, w in r0["start"].items():
        decay = WD if w.ndim >= 2 else 0.0
        moments = [(torch.zeros_like(w), torch.zeros_like(w)) for _ in range(2)]
        for step in range(STEPS):
            t = step + 1
            updates = []
            for (m, v), r in zip(moments, (r0, r1)):
                g = r["grads"][step][name]
                assert g.shape == w.shape
                m.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
                v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
                updates.append(LR * (m / (1 - BETAS[0] ** t)) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS))
            w = w * (1 - LR * decay) - (updates[0] + updates[1]) / 2
            torch.testing.assert_close(r0["weights"][step][name], w, rtol=1e-5, atol=1e-7)
    g0, g1 = r0["grads"][0], r1["grads"][0]
    assert any(not torch.equal(g0[n], g1[n]) for n in g0)  # each rank kept its own gradient


@pytest.mark.distributed
def test_topk_replicas_hold_the_same_bits_and_bytes_are_counted(ranks: list[dict]) -> None:
    import torch

    r0, r1 = ranks[0]["topk"], ranks[1]["topk"]
    for step in range(STEPS):
        for name, w in r0["weights"][step].items():
            assert torch.equal(w, r1["weights"][step][name]), (step, name)
    assert all(1.5 < r < 8.5 for r in r0["ratios"][:2]), r0["ratios"]  # int4: ~7.5x fewer than fp32
    assert all(r > 20 for r in r0["ratios"][2:]), r0["ratios"]  # compact top-k 2%: ~50x less (tiny tensors: less)

"""The gradient compression hooks under real DDP on 2 gloo ranks (lmforge.parallel.comm): each
hook's averaged gradient against the exact all-reduce, within its compressor's bound; every
replica gets the same bits; the bytes counted; and a hook restored from `state_dict` in a fresh
DDP (buckets in their first layout again) continues bit for bit."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.helpers.spawn import run_ranks

KINDS = ("bf16", "fp16", "int8", "int4", "int2", "topk", "topk-compact", "powersgd")
STEPS, SAVE_AT = 6, 2  # PowerSGD compresses from its third step (powersgd_start_step = 2)


def _tokens(rank: int, step: int):
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 512, (2, 17), generator=g)


def _grads(ddp, rank: int, step: int) -> dict:
    import torch.nn.functional as F

    tokens = _tokens(rank, step)
    ddp.zero_grad(set_to_none=True)
    logits = ddp(tokens[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return {n: p.grad.detach().clone() for n, p in ddp.module.named_parameters()}


def _ddp(model):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # small buckets: several, re-laid out after the first step in gradient order
    return DDP(model, gradient_as_bucket_view=True, bucket_cap_mb=0.05)


def _config(kind: str):  # noqa: ANN202 (CommConfig)
    from lmforge.config.comm import CommConfig

    if kind == "topk-compact":
        return CommConfig(compression="topk", topk_payload="compact")
    return CommConfig(compression=kind, powersgd_rank=2)


def _hooks(rank: int, world: int, kinds: tuple[str, ...] = KINDS) -> dict:
    import torch
    import torch.distributed as dist

    from lmforge.models.llama.model import build_model
    from lmforge.models.llama.sizes import SIZES
    from lmforge.parallel.comm.ddp_hooks import register_compression

    cfg = replace(SIZES["debug"], max_seq_len=32)
    exact_ddp = _ddp(build_model(cfg, seed=0))
    local_model = build_model(cfg, seed=0)
    out: dict = {"exact": [], "local": []}
    for step in range(STEPS):
        out["exact"].append(_grads(exact_ddp, rank, step))
        local_model.zero_grad(set_to_none=True)
        tokens = _tokens(rank, step)
        torch.nn.functional.cross_entropy(local_model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        mine = {n: p.grad.detach().clone() for n, p in local_model.named_parameters()}
        both = [None] * world
        dist.all_gather_object(both, mine)
        out["local"].append(both)  # every rank's own gradient, for the bounds
    for kind in kinds:
        ddp = _ddp(build_model(cfg, seed=0))
        hook = register_compression(ddp, _config(kind), dist.group.WORLD)
        grads, sent, saved = [], [], None
        for step in range(STEPS):
            grads.append(_grads(ddp, rank, step))
            sent.append(hook.accounting.window())
            if step == SAVE_AT:
                saved = hook.state_dict()
        resumed = _ddp(build_model(cfg, seed=0))
        hook2 = register_compression(resumed, _config(kind), dist.group.WORLD)
        hook2.load_state_dict(saved)
        again = [_grads(resumed, rank, step) for step in range(SAVE_AT + 1, STEPS)]
        out[kind] = {"grads": grads, "sent": sent, "again": again, "state": hook.state_dict()}
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_ranks(_hooks, 2, tmp_path_factory.mktemp("comm-hooks"), preload=("torch", "lmforge.models.llama.model"))


def _check_all_steps(ranks: list[dict], kind: str, bound) -> None:
    import torch

    r0 = ranks[0]
    for step in range(STEPS):
        for name, exact in r0["exact"][step].items():
            got = r0[kind]["grads"][step][name]
            assert torch.equal(got, ranks[1][kind]["grads"][step][name]), (kind, step, name)  # same bits
            locals_ = [g[name] for g in r0["local"][step]]
            err = (got - exact).abs()
            limit = bound(locals_, exact, step)
            assert (err <= limit).all(), (kind, step, name, float((err - limit).max()))


@pytest.mark.parametrize("kind,eps,tiny", [("bf16", 2.0 ** -8, 0.0), ("fp16", 2.0 ** -11, 2.0 ** -24)])
def test_cast_equals_fp32_within_half_width_rounding(ranks: list[dict], kind: str, eps: float, tiny: float) -> None:
    # step 0 (no residual yet): each rank's half rounded, and their sum rounded once more (fp16:
    # values below its normal range round to multiples of 2^-24, whatever their size)
    def bound(locals_, exact, step):
        return (4 * eps * (sum(g.abs() for g in locals_) / 2 + exact.abs()) + 3 * tiny + 1e-12 if step == 0
                else float("inf"))
    _check_all_steps(ranks, kind, bound)


@pytest.mark.parametrize("kind,qmax", [("int8", 127), ("int4", 7), ("int2", 1)])
def test_quantised_within_half_a_level_per_rank(ranks: list[dict], kind: str, qmax: int) -> None:
    # step 0: each rank's error <= its block absmax / (2 qmax) <= its tensor absmax / (2 qmax)
    def bound(locals_, exact, step):
        return sum((g / 2).abs().max() for g in locals_) / (2 * qmax) * 1.001 + 1e-12 if step == 0 \
            else float("inf")
    _check_all_steps(ranks, kind, bound)


def test_topk_drops_no_more_than_each_ranks_smallest_kept(ranks: list[dict]) -> None:
    import math

    def bound(locals_, exact, step):
        if step:
            return float("inf")
        limit = 0.0
        for g in locals_:
            flat = (g / 2).abs().flatten()
            k = max(1, math.ceil(0.01 * flat.numel()))
            limit += float(flat.topk(k).values.min())
        return limit * 1.001 + 1e-12
    _check_all_steps(ranks, "topk", bound)


def test_powersgd_exact_first_then_low_rank(ranks: list[dict]) -> None:
    import torch

    r0 = ranks[0]
    _check_all_steps(ranks, "powersgd", lambda locals_, exact, step: 1e-6 if step < 2 else float("inf"))
    for step in range(2, STEPS):
        weight = r0["powersgd"]["grads"][step]["layers.0.attention.wq.weight"]
        assert int(torch.linalg.matrix_rank(weight)) <= 2  # powersgd_rank
        assert not torch.equal(weight, r0["exact"][step]["layers.0.attention.wq.weight"])


@pytest.mark.parametrize("kind", ["int8", "int4", "int2", "topk", "topk-compact", "powersgd"])
def test_error_feedback_applied_sum_tracks_the_exact_sum(ranks: list[dict], kind: str) -> None:
    """Over the steps, sum(applied) == sum(exact) - what the ranks still hold back (their
    residuals): error feedback loses nothing, it only delays."""
    import torch

    r0 = ranks[0]
    held = {}
    for rank in ranks:
        state = rank[kind]["state"]
        # ours: residuals of grad / W, summed over ranks; PowerSGD: errors of grad, averaged
        pieces, scale = (state["error"], 1 / len(ranks)) if kind == "powersgd" else (state["residuals"], 1.0)
        for name, r in pieces.items():
            held[name] = held.get(name, 0) + scale * r
    for name in r0["exact"][0]:
        applied = sum(r0[kind]["grads"][t][name] for t in range(STEPS))
        exact = sum(r0["exact"][t][name] for t in range(STEPS))
        back = held[name].view_as(exact) if name in held else torch.zeros_like(exact)
        torch.testing.assert_close(applied + back, exact, rtol=1e-4, atol=1e-6 * float(exact.abs().max()) + 1e-9)
        if kind.startswith("topk") and exact.numel() > 1000:
            assert float(back.abs().max()) > 0  # something was held back


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_hook_continues_bit_for_bit(ranks: list[dict], kind: str) -> None:
    import torch

    for rank in ranks:
        for i, step in enumerate(range(SAVE_AT + 1, STEPS)):
            for name, g in rank[kind]["grads"][step].items():
                assert torch.equal(rank[kind]["again"][i][name], g), (kind, step, name)


def test_bytes_counted(ranks: list[dict]) -> None:
    r0 = ranks[0]
    numel = sum(g.numel() for g in r0["exact"][0].values())
    fp32 = 4 * numel  # a 2-rank ring all-reduce sends what the gradients weigh
    for kind, low, high in [("bf16", 2.0, 2.0), ("fp16", 2.0, 2.0), ("int8", 3.5, 4.0), ("int4", 6.0, 8.0),
                            ("topk", 30.0, 100.0), ("topk-compact", 60.0, 200.0)]:
        for window in r0[kind]["sent"]:
            assert window["comm_bytes"] > 0
            assert low <= window["comm_compression_ratio"] <= high, (kind, window)
            assert window["comm_bytes"] * window["comm_compression_ratio"] == pytest.approx(fp32)
    psgd = [w["comm_compression_ratio"] for w in r0["powersgd"]["sent"]]
    assert psgd[:2] == [1.0, 1.0] and all(r > 2.0 for r in psgd[2:]), psgd  # vanilla, then compressed


LATE_S = 0.8  # rank 1 joins the collective this late


def _hook_call_and_wait_times(rank: int, world: int) -> dict:
    """Seconds rank 0 spends in `reduce` (the autograd thread's cost) and until its future is
    done, while rank 1 joins the collective LATE_S late: a hook that blocked would spend it all
    in the call."""
    import time

    import torch
    import torch.distributed as dist

    from lmforge.config.comm import CommConfig
    from lmforge.parallel.comm.compressors import build_compressor
    from lmforge.parallel.comm.ddp_hooks import CompressionHook

    numels = (4096, 1000)
    out = {}
    for kind in ("bf16", "int8", "topk"):
        hook = CompressionHook(build_compressor(CommConfig(compression=kind)), dist.group.WORLD, names={})
        grad = torch.randn(sum(numels), generator=torch.Generator().manual_seed(rank))
        dist.barrier()
        if rank == 1:
            time.sleep(LATE_S)
        t0 = time.perf_counter()
        fut = hook.reduce(grad, ["a", "b"], numels)
        called = time.perf_counter() - t0
        result = fut.wait()
        out[kind] = {"call": called, "done": time.perf_counter() - t0, "result": result}
    return out


@pytest.mark.timed
def test_hook_returns_before_the_collective_completes(tmp_path) -> None:
    """The compression hook starts its collective and returns: backward goes on while the bytes
    travel (DDP waits for the futures at the end of backward)."""
    import torch

    r0, r1 = run_ranks(_hook_call_and_wait_times, 2, tmp_path)
    for kind, t in r0.items():
        assert t["call"] < LATE_S / 4, (kind, t)
        assert t["done"] >= LATE_S * 0.9, (kind, t)
        assert torch.equal(t["result"], r1[kind]["result"]), kind  # the same bits on both replicas

"""Tensor (+ sequence, + loss) parallelism on gloo ranks against the single-process reference.

Every rank builds the reference model with the same seed and trains it on the global batch (torch's
own clip_grad_norm_); a deep copy is parallelised and trained on the same batches with lmforge's
clip. Compared: per-step loss and gradient norm, every gradient after the first backward (Adam is
blind to a wrongly scaled gradient, so the gradients are checked directly) and the final weights.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lmforge.models.llama.sizes import SIZES
from tests.helpers.spawn import run_ranks

CFG = replace(SIZES["debug"], max_seq_len=64)  # dim 64, 2 layers, 4 heads, 2 kv heads, vocab 512
SEQ, BATCH, STEPS, LR, MAX_NORM = 32, 4, 6, 3e-3, 1.0
PRELOAD = ("torch", "torch.distributed.tensor.parallel", "torch.distributed.fsdp", "lmforge.models.llama.model",
           __name__)


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _parity(tp_mesh, dp_mesh, sp: bool, lp: bool, tied: bool = False) -> dict:
    from torch.distributed.fsdp import fully_shard

    from lmforge.models.llama.model import build_model
    from lmforge.parallel.clip import clip_grad_norm_
    from lmforge.parallel.tp import apply_tp, full_value, loss_parallel_ctx, tp_cross_entropy

    cfg = replace(CFG, tie_embeddings=tied)
    ref = build_model(cfg, seed=0)
    model = copy.deepcopy(ref)
    apply_tp(model, tp_mesh, sequence_parallel=sp, loss_parallel=lp)
    if dp_mesh is not None:
        for block in model.layers.values():
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    dp_rank, dp_size = (dp_mesh.get_local_rank(), dp_mesh.size()) if dp_mesh is not None else (0, 1)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=LR)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(1234)
    res: dict = {"loss": [], "ref_loss": [], "norm": [], "ref_norm": [], "grad_diff": {}}
    for step in range(STEPS):
        batch = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=g)
        x, y = batch[:, :-1], batch[:, 1:]
        ref_loss = torch.nn.functional.cross_entropy(ref(x).flatten(0, 1), y.flatten())
        ref_loss.backward()
        res["ref_loss"].append(ref_loss.item())
        res["ref_norm"].append(torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM).item())

        mine = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)  # this dp rank's rows
        with loss_parallel_ctx(lp):
            loss = tp_cross_entropy(model(x[mine]), y[mine], lp)
            loss.backward()
        value = full_value(loss).detach().clone()
        if dp_mesh is not None:
            dist.all_reduce(value, group=dp_mesh.get_group())
            value /= dp_size
        res["loss"].append(value.item())
        res["norm"].append(clip_grad_norm_(model.parameters(), MAX_NORM).item())
        if step == 0:  # clipped gradients, both sides scaled by their own (equal) norms
            ref_params = dict(ref.named_parameters())
            for name, p in model.named_parameters():
                res["grad_diff"][name] = (_full(p.grad) - ref_params[name].grad).abs().max().item()
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    ref_params = dict(ref.named_parameters())
    res["param_diff"] = {n: (_full(p.detach()) - ref_params[n].detach()).abs().max().item()
                         for n, p in model.named_parameters()}
    res["moved"] = min((p.detach() - q).abs().max().item()
                       for p, q in zip(ref.parameters(), build_model(cfg, seed=0).parameters()))
    res["dtensor_params"] = sum(type(p).__name__ == "DTensor" for p in model.parameters())
    res["tied"] = model.output.weight is model.tok_embeddings.weight
    return res


def _clip_mixed(tp_mesh) -> dict:
    """lmforge clip on plain + Shard(0) + Replicate DTensors, and over a 'pipeline' group where
    each rank owns different tensors, against torch's clip on the whole set in one process."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from lmforge.parallel.clip import clip_grad_norm_

    g = torch.Generator().manual_seed(7)
    full = [torch.randn(8, 6, generator=g) for _ in range(3)]
    grads = [torch.randn(8, 6, generator=g) * 0.3 for _ in range(3)]
    out = {}
    for max_norm in (0.5, 100.0):  # clipping active / inactive
        ref = [t.clone().requires_grad_() for t in full]
        for p, gr in zip(ref, grads):
            p.grad = gr.clone()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        plain = full[0].clone().requires_grad_()
        plain.grad = grads[0].clone()
        params = [plain]
        for t, gr, place in ((full[1], grads[1], Shard(0)), (full[2], grads[2], Replicate())):
            p = torch.nn.Parameter(distribute_tensor(t, tp_mesh, [place]))
            p.grad = distribute_tensor(gr.clone(), tp_mesh, [place])  # clip scales in place
            params.append(p)
        norm = clip_grad_norm_(params, max_norm)
        out[f"mixed_{max_norm}"] = (abs(norm.item() - ref_norm.item()),
                                    max((_full(p.grad) - r.grad).abs().max().item() for p, r in zip(params, ref)))
        # Pipeline: rank r owns tensors r, r + world, ...; the norm is summed over the group.
        rank, world = dist.get_rank(), dist.get_world_size()
        own = [full[i].clone().requires_grad_() for i in range(rank, 3, world)]
        for p, i in zip(own, range(rank, 3, world)):
            p.grad = grads[i].clone()
        norm = clip_grad_norm_(own, max_norm, pp_group=dist.group.WORLD)
        out[f"pp_{max_norm}"] = (abs(norm.item() - ref_norm.item()),
                                 max((p.grad - ref[i].grad).abs().max().item()
                                     for p, i in zip(own, range(rank, 3, world))))
        assert ref_norm.item() > 0.5 * 2  # the active case really clips
    return out


def _tp_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.parallel.gloo import mesh_backend_override

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",),
                            backend_override=mesh_backend_override("cpu", ("tp",)))
    return {"sp+lp": _parity(mesh, None, True, True), "plain": _parity(mesh, None, False, False),
            "tied sp+lp": _parity(mesh, None, True, True, tied=True), "clip": _clip_mixed(mesh)}


def _fsdp_tp_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.parallel.gloo import mesh_backend_override

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"),
                            backend_override=mesh_backend_override("cpu", ("dp_shard", "tp")))
    return {"fsdp+sp+lp": _parity(mesh["tp"], mesh["dp_shard"], True, True),
            "fsdp+plain": _parity(mesh["tp"], mesh["dp_shard"], False, False)}


def _check(case: str, r: dict) -> None:
    assert r["moved"] > 20 * 1e-4, f"{case}: training barely moved the weights ({r['moved']})"
    for step, (a, b) in enumerate(zip(r["ref_loss"], r["loss"]), start=1):
        assert abs(a - b) <= 1e-5 * abs(a), f"{case} step {step}: loss {b} vs reference {a}"
    for step, (a, b) in enumerate(zip(r["ref_norm"], r["norm"]), start=1):
        assert abs(a - b) <= 1e-5 * abs(a), f"{case} step {step}: grad norm {b} vs reference {a}"
    assert r["ref_norm"][0] > MAX_NORM  # clipping was active
    worst = max(r["grad_diff"], key=r["grad_diff"].get)
    assert r["grad_diff"][worst] <= 1e-5, f"{case}: first-step gradient of {worst} off by {r['grad_diff'][worst]}"
    worst = max(r["param_diff"], key=r["param_diff"].get)
    assert r["param_diff"][worst] <= 1e-4, f"{case}: final {worst} off by {r['param_diff'][worst]}"
    assert r["dtensor_params"] > 0


def test_tp_two_ranks_match_single_process(tmp_path: Path) -> None:
    results = run_ranks(_tp_worker, 2, tmp_path, preload=PRELOAD)
    for res in results:
        for case in ("sp+lp", "plain", "tied sp+lp"):
            _check(case, res[case])
        assert res["sp+lp"]["dtensor_params"] == 21  # all: 2 x (7 linears + 2 norms) + embedding, norm, output
        assert res["plain"]["dtensor_params"] == 16  # without SP the 5 norms stay plain, replicated tensors
        assert res["tied sp+lp"]["tied"] and not res["sp+lp"]["tied"]
        for key, (norm_err, grad_err) in res["clip"].items():
            assert norm_err <= 1e-5 and grad_err <= 1e-6, (key, norm_err, grad_err)
    assert results[0]["sp+lp"]["loss"] == results[1]["sp+lp"]["loss"]  # every TP rank sees the same loss


@pytest.mark.slow
def test_fsdp2_x_tp_four_ranks_match_single_process(tmp_path: Path) -> None:
    for res in run_ranks(_fsdp_tp_worker, 4, tmp_path, preload=PRELOAD):
        _check("fsdp+sp+lp", res["fsdp+sp+lp"])
        _check("fsdp+plain", res["fsdp+plain"])

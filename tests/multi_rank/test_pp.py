"""Pipeline parallel parity: pp = 2 gloo ranks, every schedule, against one process.

Same initial weights (the ranks split a model built from the same seed), 5 AdamW steps on the same
batches with gradient clipping over the pp group: per-step losses (broadcast from the last stage)
within 1e-5 relative, final parameters within 1e-4, forward-only eval loss equal. Also:
accumulation over two pipeline steps, and a DCP checkpoint of the parts (original FQNs) that one
process loads into the whole model. All schedules run inside one spawned job. Every model runs on
plain F.linear (`MatmulKernels(enabled=False)`, what multi-process training uses): on AVX512/AMX
CPUs the default path picks its kernels per matmul shape, so full batches and microbatches would
sum in different orders (a grad norm 1.4e-5 off on an Ice Lake Xeon).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.models.llama.sizes import SIZES
from tests.helpers.spawn import run_ranks

CFG = replace(SIZES["debug"], dim=64, n_layers=4, n_heads=4, vocab_size=512, max_seq_len=32)
WORLD = 2
STEPS = 5
BATCH, SEQ, MICRO = 8, 32, 4
LR, MAX_NORM = 1e-2, 0.5
# AdamW divides each gradient element by its own magnitude + eps: at the default eps = 1e-8 the
# float noise (~1e-10) of a near-zero gradient element, which differs between any two programs
# that sum in another order, becomes a step of up to ~lr (measured: 2e-3 on one embedding value,
# pipeline or not). 1e-6 keeps the comparison about the pipeline, not about that conditioning.
EPS = 1e-6
SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv", "dualpipev"]
CKPT_SCHEDULE = "zbv"  # V layout: rank 0 holds the first and the last stage


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def clip_(params: list[torch.Tensor], max_norm: float, group: dist.ProcessGroup | None) -> float:
    """Global L2 norm over all pipeline stages: local sum of squares, summed over the pp group."""
    sq = torch.zeros(())
    for p in params:
        if p.grad is not None:
            sq += p.grad.detach().float().square().sum()
    if group is not None:
        dist.all_reduce(sq, group=group)
    total = sq.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def reference(chunks: int = 1, reverse: bool = False) -> dict:
    """One process, each batch in `chunks` equal pieces with gradient accumulation (chunks = 1:
    the plain full batch), backward in reverse piece order if `reverse` (as LoopedBFS does)."""
    from lmforge.models.common.linear import MatmulKernels
    from lmforge.models.llama.model import build_model

    model = build_model(CFG, seed=0, kernels=MatmulKernels(enabled=False))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    data = batches(STEPS + 1)
    losses, norms = [], []
    for x, y in data[:STEPS]:
        total = 0.0
        pieces = list(zip(x.chunk(chunks), y.chunk(chunks)))
        for xs, ys in reversed(pieces) if reverse else pieces:
            loss = loss_fn(model(xs), ys) / chunks
            loss.backward()
            total += float(loss.detach())
        losses.append(total)
        norms.append(clip_(list(model.parameters()), MAX_NORM, None))
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        ev = float(loss_fn(model(data[STEPS][0]), data[STEPS][1]))
    return {"losses": losses, "norms": norms, "eval": ev, "params": {k: v.clone() for k, v in model.state_dict().items()}}


def _train(schedule: str, mesh, accum: int = 1) -> tuple[dict, object, object]:
    from lmforge.config import ParallelConfig
    from lmforge.models.common.linear import MatmulKernels
    from lmforge.models.llama.model import build_model
    from lmforge.parallel.pp import (
        PipelineError,
        broadcast_loss,
        build_schedule,
        parts_module,
        pipeline_eval,
        pipeline_step,
        plan_pipeline,
        split_model,
    )

    model = build_model(CFG, seed=0, kernels=MatmulKernels(enabled=False))
    plan = plan_pipeline(ParallelConfig(pp=WORLD, pp_schedule=schedule), CFG)
    parts = split_model(model, plan, mesh.get_local_rank())
    del model
    pipe = build_schedule(parts, plan, mesh, loss_fn, MICRO, "cpu", accum_steps=accum)
    opt = torch.optim.AdamW(pipe.parameters(), lr=LR, eps=EPS)
    data = batches(STEPS + 1)
    losses, norms, raw = [], [], []
    for x, y in data[:STEPS]:
        total = torch.zeros(())
        for xs, ys in zip(x.chunk(accum), y.chunk(accum)):
            loss = pipeline_step(pipe, xs if pipe.has_first_stage else None, ys if pipe.has_last_stage else None)
            raw.append(loss is not None)
            total += broadcast_loss(pipe, loss) / accum
        losses.append(float(total))
        norms.append(clip_(pipe.parameters(), MAX_NORM, pipe.group))
        opt.step()
        opt.zero_grad()
    ev = broadcast_loss(pipe, pipeline_eval(pipe, data[STEPS][0], data[STEPS][1]))
    # Eval between accumulation steps leaves the gradients alone; a batch that does not split
    # into equal microbatches is refused on every rank.
    pipeline_step(pipe, *data[0])
    grads = [p.grad.clone() for p in pipe.parameters()]
    ev_again = broadcast_loss(pipe, pipeline_eval(pipe, data[STEPS][0], data[STEPS][1]))
    kept = all(torch.equal(g, p.grad) for g, p in zip(grads, pipe.parameters(), strict=True))
    opt.zero_grad()
    try:
        pipeline_step(pipe, data[0][0][:6], data[0][1][:6])
        refused = ""
    except PipelineError as e:
        refused = str(e)
    view = parts_module(pipe.parts)
    result = {"losses": losses, "norms": norms, "eval": float(ev), "eval_again": float(ev_again),
              "grads_kept": kept, "refused": refused, "has_loss": raw,
              "last": pipe.has_last_stage, "first": pipe.has_first_stage, "stages": pipe.stage_indices,
              "params": {k: v.detach().clone() for k, v in view.state_dict().items()}}
    return result, view, opt


def _compiled_zero_bubble_refused(mesh) -> str:
    """torch cannot split the backward of compiled modules (measured: stage_backward_input fails)."""
    from lmforge.config import ParallelConfig
    from lmforge.models.common.linear import MatmulKernels
    from lmforge.models.llama.model import build_model
    from lmforge.parallel.pp import PipelineError, build_schedule, plan_pipeline, split_model

    plan = plan_pipeline(ParallelConfig(pp=WORLD, pp_schedule="zbv"), CFG)
    parts = split_model(build_model(CFG, seed=0, kernels=MatmulKernels(enabled=False)), plan, mesh.get_local_rank())
    for part in parts:
        for block in part.layers.values():
            block.compile()  # lazy: nothing is compiled before a call
    try:
        build_schedule(parts, plan, mesh, loss_fn, MICRO, "cpu")
    except PipelineError as e:
        return str(e)
    return ""


def _worker(rank: int, world: int, out: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.checkpoint import ModelOptimizerState

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    results = {}
    for schedule in SCHEDULES:
        res, view, opt = _train(schedule, mesh)
        results[schedule] = res
        if schedule == CKPT_SCHEDULE:
            dcp.save({"app": ModelOptimizerState(view, opt)}, checkpoint_id=str(Path(out) / "ckpt"))
    results["1f1b-accum2"], _, _ = _train("1f1b", mesh, accum=2)
    results["compile-refused"] = _compiled_zero_bubble_refused(mesh)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("pp")
    results = run_ranks(_worker, WORLD, out, args=(str(out),),
                        preload=("torch", "torch.distributed.checkpoint", __name__))
    for r in results:
        r["_dir"] = out
    return results


@pytest.fixture(scope="module")
def ref() -> dict:
    """The plain full-batch run: what the per-step losses and grad norms must equal."""
    torch.set_num_threads(1)
    return reference()


@pytest.fixture(scope="module")
def ref_micro() -> dict[bool, dict]:
    """The same in the pipeline's microbatches (accumulated in one process, in the schedule's
    backward order): what the final parameters must equal. AdamW normalises each gradient element, so a near-zero element whose
    float noise differs between batch shapes (full batch vs microbatch kernels) moves by up to
    ~lr; with the same microbatches the noise is the same."""
    torch.set_num_threads(1)
    return {reverse: reference(chunks=MICRO, reverse=reverse) for reverse in (False, True)}


def _assert_parity(ref: dict, ref_micro: dict, ranks: list[dict], name: str) -> None:
    for rank, res in enumerate(ranks):
        for step, (a, b) in enumerate(zip(ref["losses"], res["losses"], strict=True), start=1):
            assert abs(a - b) <= 1e-5 * abs(a), f"{name} rank {rank} step {step}: loss {b} vs {a}"
        for step, (a, b) in enumerate(zip(ref["norms"], res["norms"], strict=True), start=1):
            assert abs(a - b) <= 1e-5 * abs(a), f"{name} rank {rank} step {step}: grad norm {b} vs {a}"
    # Every parameter lives on exactly one rank and matches the reference.
    names = [k for res in ranks for k in res["params"]]
    assert sorted(names) == sorted(ref_micro["params"]), name
    for res in ranks:
        for k, v in res["params"].items():
            diff = (v - ref_micro["params"][k]).abs().max()
            assert diff <= 1e-4, f"{name}: {k} differs from the reference by up to {diff:.2e}"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_matches_single_process(schedule: str, ranks: list[dict], ref: dict, ref_micro: dict) -> None:
    assert ref["losses"][-1] < ref["losses"][0]
    assert max(ref["norms"]) > MAX_NORM  # clipping really acts
    results = [r[schedule] for r in ranks]
    _assert_parity(ref, ref_micro[schedule == "looped_bfs"], results, schedule)
    for res in results:
        assert math.isclose(res["eval"], ref["eval"], rel_tol=1e-5), (schedule, res["eval"], ref["eval"])
        assert res["eval_again"] == res["eval"] and res["grads_kept"]
        assert "batch = 6: must be a multiple of the 4 microbatches" in res["refused"]
        assert all(h == res["last"] for h in res["has_loss"])  # a loss only where the last stage is
    assert sum(r["first"] for r in results) == sum(r["last"] for r in results) == 1
    if schedule in ("zbv", "dualpipev"):
        assert results[0]["stages"] == [0, 3] and results[0]["first"] and results[0]["last"]
    elif schedule in ("interleaved_1f1b", "looped_bfs", "interleaved_zb"):
        assert results[0]["stages"] == [0, 2] and results[1]["stages"] == [1, 3]
    else:
        assert results[1]["stages"] == [1] and results[1]["last"]


def test_zero_bubble_schedules_refuse_compiled_parts(ranks: list[dict]) -> None:
    for r in ranks:
        assert "'zbv' splits the backward" in r["compile-refused"] and "train.compile" in r["compile-refused"]


def test_accumulation_over_pipeline_steps(ranks: list[dict], ref: dict) -> None:
    # Two pipeline steps of 4 rows per optimizer step, 4 microbatches each: 8 microbatches of 1 row.
    _assert_parity(ref, reference(chunks=2 * MICRO), [r["1f1b-accum2"] for r in ranks], "1f1b accum=2")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_of_parts_loads_into_the_whole_model(ranks: list[dict]) -> None:
    import torch.distributed.checkpoint as dcp

    from lmforge.checkpoint import ModelOptimizerState
    from lmforge.models.common.linear import MatmulKernels
    from lmforge.models.llama.model import build_model

    model = build_model(CFG, seed=7, kernels=MatmulKernels(enabled=False))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=EPS)
    state = {"app": ModelOptimizerState(model, opt)}
    dcp.load(state, checkpoint_id=str(ranks[0]["_dir"] / "ckpt"))
    saved = {k: v for r in ranks for k, v in r[CKPT_SCHEDULE]["params"].items()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert len(opt.state) == len(list(model.parameters()))
    assert all(int(s["step"]) == STEPS for s in opt.state.values())

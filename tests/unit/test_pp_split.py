"""Pipeline splitting without a process group: layer balancing, stage -> rank maps, and pruned
model parts that keep the model's names and chain back into the same forward."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest
import torch

from lmforge.config import ModelConfig, ParallelConfig
from lmforge.models.llama.model import Transformer, build_model, count_params
from lmforge.models.llama.sizes import SIZES
from lmforge.observability.flops import flops_breakdown
from lmforge.parallel.pp import (
    PipelineError,
    balanced_partition,
    materialise_part,
    plan_pipeline,
    split_layers,
    split_model,
    stage_costs,
    stage_ranks,
)

DEBUG = replace(SIZES["debug"], n_layers=4, max_seq_len=32)
BIG_VOCAB = ModelConfig(dim=256, n_layers=12, n_heads=4, vocab_size=32000, multiple_of=64, max_seq_len=512)


def sizes(split: list[list[int]]) -> list[int]:
    return [len(s) for s in split]


def test_even_split_gives_extras_to_first_stages() -> None:
    assert split_layers(4, 2, "even", DEBUG) == [[0, 1], [2, 3]]
    assert split_layers(5, 2, "even", DEBUG) == [[0, 1, 2], [3, 4]]
    assert sizes(split_layers(10, 4, "even", DEBUG)) == [3, 3, 2, 2]
    assert sizes(split_layers(7, 7, "even", DEBUG)) == [1] * 7


def test_explicit_split_wins_and_is_checked() -> None:
    assert split_layers(4, 2, "params", DEBUG, explicit=[3, 1]) == [[0, 1, 2], [3]]
    for bad in ([2, 1], [4, 0], [1, 1, 2]):
        with pytest.raises(PipelineError, match="pp_layers_per_stage"):
            split_layers(4, 2, "even", DEBUG, explicit=bad)
    with pytest.raises(PipelineError, match="stages"):
        split_layers(4, 5, "even", DEBUG)
    with pytest.raises(PipelineError, match="pp_split"):
        split_layers(4, 2, "bogus", DEBUG)


def _brute_force(costs: list[int], n_stages: int, head: int, tail: int) -> int:
    n, best = len(costs), None
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        bounds = [0, *cuts, n]
        stage = [sum(costs[bounds[s]:bounds[s + 1]]) for s in range(n_stages)]
        stage[0] += head
        stage[-1] += tail
        best = max(stage) if best is None else min(best, max(stage))
    return best


def test_balanced_partition_is_optimal_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(2, 9)
        k = rng.randint(1, n)
        costs = [rng.randint(1, 20) for _ in range(n)]
        head, tail = rng.randint(0, 30), rng.randint(0, 30)
        split = balanced_partition(costs, k, head, tail)
        assert [i for s in split for i in s] == list(range(n)) and all(split)
        got = [sum(costs[i] for i in s) for s in split]
        got[0] += head
        got[-1] += tail
        assert max(got) == _brute_force(costs, k, head, tail), (costs, k, head, tail, split)


def test_balanced_partition_without_extras_matches_even() -> None:
    for n, k in [(4, 2), (5, 2), (10, 4), (9, 3)]:
        assert balanced_partition([7] * n, k) == split_layers(n, k, "even", DEBUG)


def test_param_and_flop_costs_add_up_to_the_model() -> None:
    per, head, tail = stage_costs("params", BIG_VOCAB)
    assert sum(per) + head + tail == count_params(BIG_VOCAB)["total"]
    assert head == BIG_VOCAB.vocab_size * BIG_VOCAB.dim
    per, head, tail = stage_costs("flops", BIG_VOCAB, seq_len=256)
    assert head == 0
    assert abs(sum(per) + tail - flops_breakdown(BIG_VOCAB, 256)["forward"]) <= BIG_VOCAB.n_layers


def test_params_and_flops_splits_lighten_the_heavy_ends() -> None:
    # 32000 x 256 embedding ~ 10 layers' worth of parameters; the output matmul costs as much in FLOPs.
    params = sizes(split_layers(12, 3, "params", BIG_VOCAB))
    flops = sizes(split_layers(12, 3, "flops", BIG_VOCAB, seq_len=256))
    assert sum(params) == sum(flops) == 12
    assert params[0] < params[1] and params[2] < params[1]  # embedding first, output last
    assert flops[2] < flops[0]  # the embedding is a gather: only the last stage is lightened
    per, head, tail = stage_costs("params", BIG_VOCAB)
    split = split_layers(12, 3, "params", BIG_VOCAB)
    worst = max(len(s) * per[0] + (head if i == 0 else 0) + (tail if i == 2 else 0) for i, s in enumerate(split))
    assert worst == _brute_force(per, 3, head, tail)


def test_stage_ranks_loop_and_v() -> None:
    assert stage_ranks(2, 1, "1f1b") == {0: 0, 1: 1}
    assert stage_ranks(2, 2, "interleaved_1f1b") == {0: 0, 1: 1, 2: 0, 3: 1}
    assert stage_ranks(3, 2, "looped_bfs") == {0: 0, 1: 1, 2: 2, 3: 0, 4: 1, 5: 2}
    for pp in (2, 3, 4):
        for schedule in ("zbv", "dualpipev"):
            m = stage_ranks(pp, 2, schedule)
            for r in range(pp):
                assert sorted(s for s, rank in m.items() if rank == r) == [r, 2 * pp - 1 - r]
    with pytest.raises(PipelineError, match="pp_schedule"):
        stage_ranks(2, 1, "nope")


def test_plan_refuses_tied_embeddings() -> None:
    with pytest.raises(PipelineError, match="tie_embeddings"):
        plan_pipeline(ParallelConfig(pp=2), replace(DEBUG, tie_embeddings=True))


def _chain(parts_by_stage: dict[int, torch.nn.Module], tokens: torch.Tensor) -> torch.Tensor:
    h = tokens
    for s in sorted(parts_by_stage):
        h = parts_by_stage[s](h)
    return h


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b", "zbv"])
def test_split_model_keeps_names_and_forward(schedule: str) -> None:
    torch.manual_seed(0)
    model = build_model(DEBUG, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_pipeline(ParallelConfig(pp=2, pp_schedule=schedule), DEBUG)
    by_stage, names = {}, []
    for rank in range(2):
        parts = split_model(model, plan, rank)
        assert len(parts) == len(plan.local_stages(rank))
        for stage, part in zip(plan.local_stages(rank), parts):
            by_stage[stage] = part
            assert [int(k) for k in part.layers] == plan.layers[stage]
            assert (part.tok_embeddings is not None) == (stage == 0)
            assert (part.output is not None) == (part.norm is not None) == (stage == plan.n_stages - 1)
            names += list(part.state_dict())
    full = model.state_dict()
    assert sorted(names) == sorted(full)  # disjoint, complete, same FQNs
    for part in by_stage.values():
        for k, v in part.state_dict().items():
            assert torch.equal(v, full[k]) and v.data_ptr() != full[k].data_ptr()  # copies
    tokens = torch.randint(0, DEBUG.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(_chain(by_stage, tokens), model(tokens), rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # original untouched
    assert len(model.layers) == DEBUG.n_layers


def test_split_meta_model_then_materialise() -> None:
    with torch.device("meta"):
        model = Transformer(DEBUG)
    plan = plan_pipeline(ParallelConfig(pp=2, pp_schedule="interleaved_1f1b"), DEBUG)
    parts = split_model(model, plan, 0)
    assert all(p.is_meta for part in parts for p in part.parameters())
    for part, stage in zip(parts, plan.local_stages(0)):
        materialise_part(part, "cpu", seed=3, stage_index=stage)
    again = split_model(model, plan, 0)
    for part, stage in zip(again, plan.local_stages(0)):
        materialise_part(part, "cpu", seed=3, stage_index=stage)
    for a, b in zip(parts, again):  # deterministic
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    w0 = parts[0].layers["0"].attention.wq.weight  # stage 0 layer 0 vs stage 2 layer 2: different draws
    w2 = parts[1].layers["2"].attention.wq.weight
    assert not torch.equal(w0, w2) and 0.01 < w0.std().item() < 0.03

"""Load balancing pieces (lmforge/train/load_balance.py, the loader's uneven split): the split
minimises the slowest rank's time, an uneven split serves exactly the samples of the equal one, the
split survives a resume, and layouts it cannot serve are refused before launch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmforge.config import ConfigError, load_job_config, parse_override_args
from lmforge.data.errors import DataError
from lmforge.data.loader import DistributedTokenLoader, TokenDataset
from lmforge.train.load_balance import balanced_split, predicted_step

SEQ = 16


def test_split_minimises_the_slowest_rank() -> None:
    assert balanced_split([1.0, 1.0], 8) == [4, 4]
    assert balanced_split([1.0, 3.0], 8) == [6, 2]  # speeds 1 : 1/3
    assert balanced_split([0.01, 10.0], 8) == [7, 1]  # every rank keeps one sample
    assert balanced_split([1.0, 1.0, 2.0], 5) == [2, 2, 1]  # ties to the lower rank
    assert balanced_split([0.001, 5.0, 5.0, 5.0], 4) == [1, 1, 1, 1]
    for times in ([0.3, 0.1, 0.7], [0.02, 0.021, 0.5, 0.05]):
        counts = balanced_split(times, 24)
        assert sum(counts) == 24 and min(counts) >= 1
        # no single move of one sample from the slowest rank to another makes the step faster
        slow = max(range(len(times)), key=lambda r: counts[r] * times[r])
        for r in range(len(times)):
            if r != slow and counts[slow] > 1:
                moved = list(counts)
                moved[slow] -= 1
                moved[r] += 1
                assert predicted_step(moved, times) >= predicted_step(counts, times) - 1e-12
    with pytest.raises(ValueError, match="3 ranks"):
        balanced_split([1.0, 1.0, 1.0], 2)


def _loaders(ds: TokenDataset, world: int = 2, micro: int = 4) -> list[DistributedTokenLoader]:
    return [DistributedTokenLoader(ds, SEQ, micro, r, world, seed=3, prefetch=True, balanced=True)
            for r in range(world)]


def _global_step(loaders: list[DistributedTokenLoader]) -> tuple[list[int], list[int]]:
    """(window ids in rank order, samples per rank) of one call on every rank."""
    ids, sizes = [], []
    for ld in loaders:
        x, _ = ld.next_batch()
        ids += ld.last_windows.tolist()
        sizes.append(len(x))
    return ids, sizes


def test_uneven_split_serves_the_equal_splits_samples(tiny_data_dir: Path) -> None:
    ds = TokenDataset(tiny_data_dir, "train")
    equal, uneven = _loaders(ds), _loaders(ds)
    for step in range(6):
        if step == 2:  # re-split mid-run: the batches read ahead for the old split are dropped
            for ld in uneven:
                ld.set_split([7, 1])
        a, sizes_a = _global_step(equal)
        b, sizes_b = _global_step(uneven)
        assert a == b  # the same samples, in the same global order
        assert sizes_a == [4, 4] and sizes_b == ([4, 4] if step < 2 else [7, 1])
    assert uneven[1].last_positions.tolist() == [uneven[1].position - 1]
    with pytest.raises(DataError, match="summing to 8"):
        uneven[0].set_split([5, 5])
    with pytest.raises(DataError, match=">= 1"):
        uneven[0].set_split([8, 0])


def test_split_is_in_the_resumable_state(tiny_data_dir: Path) -> None:
    ds = TokenDataset(tiny_data_dir, "train")
    first = _loaders(ds)
    for ld in first:
        ld.set_split([6, 2])
    _global_step(first)
    state = first[0].state_dict()
    assert state == first[1].state_dict() and state["split"] == "6,2"
    resumed = _loaders(ds)
    for ld in resumed:
        ld.load_state_dict(state)
    assert [ld.local_batch_size for ld in resumed] == [6, 2]
    assert _global_step(resumed) == _global_step(first)
    # on another number of ranks the saved split does not fit: equal shares, same position
    four = _loaders(ds, world=4, micro=2)
    for ld in four:
        ld.load_state_dict(state)
    assert [ld.local_batch_size for ld in four] == [2, 2, 2, 2] and four[0].position == state["position"]
    # a run without load balancing keeps its state keys (checkpoints of older runs load as before)
    plain = DistributedTokenLoader(ds, SEQ, 4, 0, 2, seed=3, prefetch=False)
    assert "split" not in plain.state_dict()
    for ld in first + resumed + four:
        ld.close()
    assert np.array_equal(first[0].window_indices(0, 3), resumed[0].window_indices(0, 3))


@pytest.mark.parametrize("layout", [["--parallel.tp", "2", "--parallel.dp_shard", "1"],
                                    ["--parallel.pp", "2", "--parallel.dp_shard", "1", "--model.tie_embeddings",
                                     "false"]])
def test_layouts_without_whole_samples_per_rank_are_refused(layout: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"comm.load_balance.*works with data parallelism only"):
        load_job_config(None, parse_override_args(["--comm.load_balance", "true", "--train.global_batch_size", "8",
                                                   "--train.micro_batch_size", "4", *layout]), world_size=2)
    ok = ["--comm.load_balance", "true", "--train.global_batch_size", "8", "--train.micro_batch_size", "4",
          "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"]
    assert load_job_config(None, parse_override_args(ok), world_size=2).comm.load_balance

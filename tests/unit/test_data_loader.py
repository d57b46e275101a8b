"""Training loader: windows, determinism, the data-parallel union invariant, exact resume, wrap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.errors import DataError
from lmforge.data.files import fingerprint
from lmforge.data.loader import DistributedTokenLoader, TokenDataset
from lmforge.data.verify import pack_files

SEQ = 4


def make_packed(d: Path, n_train: int = 4 * 50 + 1, n_val: int = 4 * 6 + 3, dtype: str = "uint16") -> Path:
    """A packed dir whose tokens are 0, 1, 2, ...: window w starts with token w * SEQ."""
    d.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        np.arange(n, dtype=dtype).tofile(d / f"{split}.bin")
        np.save(d / f"{split}.idx.npy", np.array([0, n], dtype=np.int64))
        np.save(d / f"{split}.docs.npy", np.array([0], dtype=np.int64))
        splits[split] = {"file": f"{split}.bin", "tokens": n, "documents": 1}
    files = {name: fingerprint(d / name) for name in pack_files()}
    (d / "manifest.json").write_text(json.dumps({"dtype": dtype, "vocab_size": 70000, "eos_id": 0,
                                                 "splits": splits, "files": files}))
    return d


@pytest.fixture
def ds(tmp_path: Path) -> TokenDataset:
    return TokenDataset(make_packed(tmp_path / "packed"), "train")


def loader(ds: TokenDataset, micro: int = 4, rank: int = 0, world: int = 1, seed: int = 7,
           shuffle: bool = True) -> DistributedTokenLoader:
    return DistributedTokenLoader(ds, SEQ, micro, rank, world, seed=seed, shuffle=shuffle)


def window_ids(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // SEQ).tolist()


def global_batches(ds: TokenDataset, steps: int, world: int, micro: int, accum: int = 1,
                   state: dict | None = None) -> list[list[int]]:
    """Window ids per optimizer step, concatenated over ranks and accumulation micro-batches."""
    ranks = [loader(ds, micro, r, world) for r in range(world)]
    if state is not None:
        for r in ranks:
            r.load_state_dict(state)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(accum):
            for r in ranks:
                step += window_ids(r.next_batch()[0])
        out.append(step)
    return out


def test_batches_are_shifted_windows(ds: TokenDataset) -> None:
    x, y = loader(ds).next_batch()
    assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = row_x[0]
        assert start % SEQ == 0
        assert row_x == list(range(start, start + SEQ)) and row_y == list(range(start + 1, start + SEQ + 1))


def test_n_windows_and_epoch_is_a_permutation(ds: TokenDataset) -> None:
    ld = loader(ds, micro=5)
    assert ld.n_windows == (ds.n_tokens - 1) // SEQ == 50
    epoch0 = sum((window_ids(ld.next_batch()[0]) for _ in range(10)), [])
    epoch1 = sum((window_ids(ld.next_batch()[0]) for _ in range(10)), [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1 and epoch0 != list(range(50))
    assert ld.epoch == 2


def test_epoch_wrap_inside_a_batch(ds: TokenDataset) -> None:
    ld = loader(ds, micro=8)  # 50 windows: the 7th batch spans epochs 0 and 1
    seen = sum((window_ids(ld.next_batch()[0]) for _ in range(7)), [])
    assert sorted(seen[:50]) == list(range(50))
    assert seen[50:] == ld.window_indices(50, 6).tolist()
    assert seen[50:] == np.random.default_rng([7, 1]).permutation(50)[:6].tolist()


def test_deterministic_and_seeded(ds: TokenDataset) -> None:
    a, b, c = loader(ds), loader(ds), loader(ds, seed=8)
    runs = [[window_ids(ld.next_batch()[0]) for _ in range(15)] for ld in (a, b, c)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_dp_union_is_independent_of_the_split(ds: TokenDataset) -> None:
    one_rank = global_batches(ds, 9, world=1, micro=8)
    two_ranks = global_batches(ds, 9, world=2, micro=4)
    accumulate = global_batches(ds, 9, world=1, micro=4, accum=2)
    four_ranks = global_batches(ds, 9, world=4, micro=1, accum=2)
    # not just the same set: the same sequence, so losses and gradients match exactly
    assert one_rank == accumulate
    assert [sorted(s) for s in one_rank] == [sorted(s) for s in two_ranks] == [sorted(s) for s in four_ranks]
    assert len({w for s in one_rank[:6] for w in s}) == 48  # no window repeats within an epoch


def test_ranks_get_disjoint_slices(ds: TokenDataset) -> None:
    r0, r1 = loader(ds, micro=4, rank=0, world=2), loader(ds, micro=4, rank=1, world=2)
    a, b = window_ids(r0.next_batch()[0]), window_ids(r1.next_batch()[0])
    assert not set(a) & set(b)
    assert a + b == loader(ds, micro=8).window_indices(0, 8).tolist()


def test_exact_resume(ds: TokenDataset) -> None:
    ref = loader(ds)
    for _ in range(5):
        ref.next_batch()
    sd = ref.state_dict()
    assert all(type(v) is int for k, v in sd.items() if k != "skip") and sd["skip"] == ""
    assert sd["position"] == 20
    resumed = loader(ds)
    resumed.load_state_dict(sd)
    for _ in range(20):  # into the next epochs too
        x_ref, y_ref = ref.next_batch()
        x, y = resumed.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_resume_after_changing_dp_world(ds: TokenDataset) -> None:
    # Saved by one rank with micro 8; resumed on two ranks with micro 4 (same global batch 8).
    saver = loader(ds, micro=8)
    for _ in range(3):
        saver.next_batch()
    sd = saver.state_dict()
    straight = global_batches(ds, 10, world=1, micro=8)[3:]
    resumed = global_batches(ds, 7, world=2, micro=4, state=sd)
    assert [sorted(s) for s in resumed] == [sorted(s) for s in straight]
    resumed_accum = global_batches(ds, 7, world=1, micro=2, accum=4, state=sd)
    assert resumed_accum == straight


@pytest.mark.parametrize("key,value,phrase", [("seq_len", 8, "train.seq_len"), ("seed", 1, "data.seed"),
                                              ("n_windows", 99, "data in")])
def test_mismatched_state_is_a_clear_error(ds: TokenDataset, key: str, value: int, phrase: str) -> None:
    sd = {**loader(ds).state_dict(), key: value}
    with pytest.raises(DataError, match=phrase) as e:
        loader(ds).load_state_dict(sd)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="malformed"):
        loader(ds).load_state_dict({"position": 3})


def test_validation_mode_is_ordered_and_restartable(tmp_path: Path) -> None:
    val = TokenDataset(make_packed(tmp_path / "p"), "val")
    assert val.n_tokens == 27
    ld = loader(val, micro=2, seed=0, shuffle=False)
    assert ld.n_windows == 6
    first = [window_ids(x) for x, _ in ld.batches(4)]  # 8 positions over 6 windows: wraps in order
    assert first == [[0, 1], [2, 3], [4, 5], [0, 1]]
    ld.next_batch()
    ld.reset()
    assert window_ids(ld.next_batch()[0]) == [0, 1]
    assert [window_ids(x) for x, _ in ld.batches(4)] == first
    r1 = loader(val, micro=2, rank=1, world=2, shuffle=False)
    assert window_ids(next(iter(r1))[0]) == [2, 3]


def test_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a packed data dir"):
        TokenDataset(tmp_path, "train")
    d = make_packed(tmp_path / "p")
    with pytest.raises(DataError, match="must be 'train' or 'val'"):
        TokenDataset(d, "test")
    with open(d / "train.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match="rerun `lmforge data prepare`"):
        TokenDataset(d, "train")
    tiny = TokenDataset(make_packed(tmp_path / "q", n_train=4), "train")
    with pytest.raises(DataError, match="too few"):
        loader(tiny)


def test_uint32_shards(tmp_path: Path) -> None:
    ds32 = TokenDataset(make_packed(tmp_path / "p", dtype="uint32"), "train")
    assert ds32.dtype == np.uint32
    x, _ = loader(ds32, shuffle=False).next_batch()
    assert x[1].tolist() == [4, 5, 6, 7]


def test_real_packed_data(tiny_data_dir: Path) -> None:
    manifest = json.loads((tiny_data_dir / "manifest.json").read_text())
    train = TokenDataset(tiny_data_dir, "train")
    assert train.n_tokens == manifest["splits"]["train"]["tokens"] and train.dtype == np.uint16
    x, y = DistributedTokenLoader(train, 32, 4, seed=1).next_batch()
    assert x.shape == (4, 32) and int(x.max()) < manifest["vocab_size"]
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_skip_ranges_are_never_served_and_survive_resume(ds: TokenDataset) -> None:
    ref = loader(ds, micro=4)
    served = []
    ref.skip_range(8, 16)
    for _ in range(3):
        ref.next_batch()
        served += ref.last_positions.tolist()
    assert served == [0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19]  # positions 8..15 skipped
    ref.skip_range(24, 28)
    sd = ref.state_dict()
    assert sd["skip"] == "8:16,24:28"
    resumed = loader(ds, micro=2, rank=1, world=2)  # another dp layout continues the same stream
    resumed.load_state_dict(sd)
    resumed.next_batch()
    assert resumed.last_positions.tolist() == [22, 23]  # global batch 20..23
    resumed.next_batch()
    assert resumed.last_positions.tolist() == [30, 31]  # global batch 28..31; 24..27 skipped
    v1 = {k: v for k, v in sd.items() if k != "skip"}  # a version-1 state has no skip ranges
    old = loader(ds, micro=4)
    old.load_state_dict(v1)
    assert old.skips == []
    with pytest.raises(DataError, match="malformed skip"):
        old.load_state_dict({**sd, "skip": "5:3"})


def test_prefetch_serves_the_same_stream_and_checkpoints_the_consumed_position(ds: TokenDataset) -> None:
    """The background read of the next batch changes nothing a user can see: the same batches as a
    loader without it (also across a new skip range, a reset and a resume), and `state_dict` is
    the position of the batches consumed, never of the one already read ahead."""
    fast = DistributedTokenLoader(ds, SEQ, 4, seed=7, prefetch=True)
    plain = DistributedTokenLoader(ds, SEQ, 4, seed=7, prefetch=False)

    def same_next() -> None:
        (xf, yf), (xp, yp) = fast.next_batch(), plain.next_batch()
        assert torch.equal(xf, xp) and torch.equal(yf, yp)
        assert np.array_equal(fast.last_positions, plain.last_positions)
        assert np.array_equal(fast.last_windows, plain.last_windows)
        assert fast.state_dict() == plain.state_dict()

    for _ in range(3):
        same_next()
    assert fast._pending is not None  # a batch is read ahead ...
    assert fast.state_dict()["position"] == 12  # ... but the state counts the 3 consumed batches
    for lo in (fast, plain):  # skip the batch that `fast` already read ahead
        lo.skip_range(12, 20)
    for _ in range(2):
        same_next()
    sd = fast.state_dict()
    resumed = DistributedTokenLoader(ds, SEQ, 4, seed=7, prefetch=True)
    resumed.next_batch()  # reads ahead from position 0; the resume below must discard that
    resumed.load_state_dict(sd)
    for _ in range(60):  # across epochs
        x_ref, _ = plain.next_batch()
        x, _ = resumed.next_batch()
        assert torch.equal(x, x_ref)
    fast.reset()
    plain.reset()
    same_next()
    fast.close()
    same_next()  # after close: synchronous reads, same stream

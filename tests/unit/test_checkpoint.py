"""Checkpoint manager (single process): exact round trip of model + AdamW + RNG + caller state, the
DCP key layout (weights-only load), keep_last pruning, and that every kind of damage makes a
checkpoint invalid with a clear reason and makes resume fall back to the previous one."""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.manager import CheckpointManager
from lmforge.checkpoint.manifest import saved_metadata, verify_checkpoint
from lmforge.checkpoint.state import ModelOptimizerState, PerRank, RNGState, choose_rank_key
from lmforge.checkpoint.weights import load_model_weights
from lmforge.models.llama.model import build_model
from lmforge.storage.layout import MANIFEST
from tests.helpers.checkpoint import CFG, assert_same_optimizer, trained

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_round_trip_model_optimizer_scheduler_rng_and_plain_dict(tmp_path: Path):
    model, opt, sched = trained(seed=0)
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    torch.manual_seed(123)
    random.seed(7)
    np.random.seed(9)
    train = {"step": 2, "tokens_seen": 64}
    path = mgr.save(2, {"app": ModelOptimizerState(model, opt), "scheduler": sched, "rng": RNGState(),
                        "train": train})
    assert path == tmp_path / "ckpt" / "step-00000002" and (path / MANIFEST).is_file()
    expected_draws = draws()

    model2, opt2, sched2 = trained(seed=5, steps=1)  # different weights, optimizer step and lr
    assert not torch.equal(model2.output.weight, model.output.weight)
    train2 = {"step": 0, "tokens_seen": 0}
    step = mgr.load(path, {"app": ModelOptimizerState(model2, opt2), "scheduler": sched2, "rng": RNGState(),
                           "train": train2})
    assert step == 2
    assert draws() == expected_draws  # RNG streams continue exactly
    assert train2 == {"step": 2, "tokens_seen": 64}
    assert sched2.state_dict() == sched.state_dict() and sched2.get_last_lr() == sched.get_last_lr()
    for (n, p), (n2, p2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    assert_same_optimizer(opt, opt2)
    # Training on from both gives identical weights: the resume is exact.
    tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for m, o in ((model, opt), (model2, opt2)):
        loss = torch.nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        o.zero_grad()
        loss.backward()
        o.step()
    assert torch.equal(model.layers["0"].attention.wq.weight, model2.layers["0"].attention.wq.weight)


def test_key_layout_allows_weights_only_load(tmp_path: Path):
    model, opt, _ = trained(seed=0)
    path = CheckpointManager(tmp_path, keep_last=1).save(7, {"app": ModelOptimizerState(model, opt),
                                                             "rng": RNGState(), "train": {"step": 7}})
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    assert {k.split(".")[0] for k in keys} == {"model", "optim", "rng", "train"}
    assert "model.tok_embeddings.weight" in keys and "rng.rank0" in keys
    assert json.loads((path / MANIFEST).read_text())["keys"] == ["model", "optim", "rng", "train"]

    plain = build_model(CFG, seed=3)  # exactly what the generate command does, no optimizer
    sd = plain.state_dict()
    with pytest.warns(UserWarning):  # torch's "no process group, loading in a single process" note
        dcp.load({"model": sd}, checkpoint_id=str(path))
    assert torch.equal(plain.layers["1"].feed_forward.w2.weight, model.layers["1"].feed_forward.w2.weight)

    other = build_model(CFG, seed=4)
    assert load_model_weights(path, other) == 7
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    wrong = build_model(replace(CFG, dim=32), seed=0)
    with pytest.raises(CheckpointError, match="step-00000007.*shape") as e:
        load_model_weights(path, wrong)
    assert "\n" not in str(e.value)


def test_keep_last_prunes_oldest_and_replaces_same_step(tmp_path: Path):
    model, opt, _ = trained(steps=1)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    state = {"app": ModelOptimizerState(model, opt)}
    for step in (10, 20, 30):
        mgr.save(step, state)
    assert [p.name for p in mgr.list_checkpoints()] == ["step-00000020", "step-00000030"]
    # A corrupt step-30 (say a resume skipped it) is replaced by a new save of step 30.
    (tmp_path / "step-00000030" / MANIFEST).unlink()
    mgr.save(30, state)
    assert mgr.verify(tmp_path / "step-00000030") == (True, "ok")
    assert [p.name for p in mgr.list_checkpoints()] == ["step-00000020", "step-00000030"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000020", "step-00000030"]  # no leftovers
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def _largest_data_file(path: Path) -> Path:
    return max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _truncate(p: Path) -> None:
    f = _largest_data_file(p)
    f.write_bytes(f.read_bytes()[:-100])


def _delete(p: Path) -> None:
    _largest_data_file(p).unlink()


def _flip_byte(p: Path) -> None:
    f = _largest_data_file(p)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _no_manifest(p: Path) -> None:
    (p / MANIFEST).unlink()


def _leftover_tmp(p: Path) -> None:  # crashed after writing, before the rename
    p.rename(p.with_name(p.name + ".tmp"))


@pytest.mark.parametrize("damage, reason", [
    (_truncate, r"__0_0\.distcp has \d+ bytes, the manifest says \d+ \(truncated"),
    (_delete, r"__0_0\.distcp is missing"),
    (_flip_byte, r"__0_0\.distcp does not match its sha256"),
    (_no_manifest, r"no lmforge-checkpoint\.json"),
    (_leftover_tmp, r"unfinished save \(\.tmp"),
], ids=["truncated", "deleted", "modified-byte", "no-manifest", "leftover-tmp"])
def test_damaged_checkpoint_is_invalid_and_resume_falls_back(tmp_path: Path, damage, reason: str,
                                                             caplog: pytest.LogCaptureFixture):
    model, opt, _ = trained(steps=1)
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, {"app": ModelOptimizerState(model, opt)})
    newest = mgr.save(2, {"app": ModelOptimizerState(model, opt)})
    assert mgr.latest_valid() == newest
    damage(newest)
    bad = newest if newest.exists() else newest.with_name(newest.name + ".tmp")
    ok, why = mgr.verify(bad)
    assert not ok and "\n" not in why
    assert re.search(reason, why), why
    with caplog.at_level(logging.WARNING, logger="lmforge.checkpoint.manager"):
        assert mgr.latest_valid() == tmp_path / "step-00000001"
        assert mgr.resolve_resume("auto") == tmp_path / "step-00000001"
    assert any(bad.name in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointError, match=bad.name) as e:
        mgr.load(bad, {"app": ModelOptimizerState(model, opt)})
    assert "\n" not in str(e.value)


def test_resolve_resume(tmp_path: Path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert mgr.resolve_resume("none") is None
    assert mgr.resolve_resume("auto") is None  # nothing saved yet: a fresh start
    bogus = tmp_path / "no" / "such" / "step-00000009"
    with pytest.raises(CheckpointError, match=r"step-00000009: does not exist") as e:
        mgr.resolve_resume(str(bogus))
    assert "\n" not in str(e.value) and "'auto'" in str(e.value)
    with pytest.raises(CheckpointError, match="no lmforge-checkpoint.json"):
        mgr.resolve_resume(str(tmp_path))  # a directory that is not a checkpoint
    path = mgr.save(3, {"train": {"step": 3}})
    assert mgr.resolve_resume(str(path)) == path
    assert mgr.resolve_resume("auto") == path


def test_load_errors_are_one_line(tmp_path: Path):
    model, opt, _ = trained(steps=1)
    mgr = CheckpointManager(tmp_path, keep_last=1)
    path = mgr.save(1, {"app": ModelOptimizerState(model, opt), "train": {"step": 1}})
    with pytest.raises(CheckpointError, match="has no state 'scheduler'") as e:
        mgr.load(path, {"app": ModelOptimizerState(model, opt), "scheduler": {"last_epoch": 0}})
    assert "\n" not in str(e.value)
    small = build_model(replace(CFG, n_layers=1), seed=0)
    with pytest.raises(CheckpointError, match="has weights the model lacks: layers.1") as e:
        mgr.load(path, {"app": ModelOptimizerState(small, torch.optim.AdamW(small.parameters()))})
    with pytest.raises(ValueError, match="reserved"):
        mgr.save(2, {"app": ModelOptimizerState(model, opt), "model": {"x": 1}})


def test_rng_state_round_trip_and_world_size_fallback(tmp_path: Path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    loader = {"pos": 17}
    path = mgr.save(0, {"rng": RNGState(), "loader": PerRank(_Box(loader))})
    first = draws()
    second = draws()
    assert first != second
    box = _Box({})
    mgr.load(path, {"rng": RNGState(), "loader": PerRank(box)})
    assert draws() == first and box.value == {"pos": 17}

    # This rank's key when the world size is unchanged; rank 0's when it changed.
    assert choose_rank_key({"rank0", "rank1"}, 1, 2) == "rank1"
    assert choose_rank_key({"rank0", "rank1"}, 1, 4) == "rank0"
    assert choose_rank_key({"rank0", "rank1", "rank2", "rank3"}, 1, 2) == "rank0"


class _Box:
    def __init__(self, value: dict) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return dict(self.value)

    def load_state_dict(self, sd: dict) -> None:
        self.value = dict(sd)


def test_verify_checkpoint_cache_does_not_hide_later_damage(tmp_path: Path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    path = mgr.save(5, {"train": {"step": 5, "blob": list(range(1000))}})
    assert mgr.verify(path) == (True, "ok")
    f = _largest_data_file(path)
    stat = f.stat()
    _flip_byte(path)
    assert f.stat().st_size == stat.st_size
    ok, why = mgr.verify(path)
    assert not ok and "sha256" in why
    assert verify_checkpoint(path).ok is False
    shutil.rmtree(path)
    assert mgr.latest_valid() is None


def test_save_model_weights_makes_a_valid_weights_only_checkpoint(tmp_path: Path):
    from lmforge.checkpoint import save_model_weights

    model = build_model(CFG, seed=1)
    path = save_model_weights(tmp_path / "checkpoints" / "step-00000000", model)
    assert verify_checkpoint(path).ok and not path.with_name(path.name + ".tmp").exists()
    assert {k.split(".")[0] for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata} == {"model"}
    assert CheckpointManager(tmp_path / "checkpoints", keep_last=1).latest_valid() == path
    other = build_model(CFG, seed=2)
    assert load_model_weights(path, other) == 0
    assert torch.equal(other.tok_embeddings.weight, model.tok_embeddings.weight)
    with pytest.raises(ValueError, match="step="):
        save_model_weights(tmp_path / "weights", model)


def test_resume_auto_refuses_when_checkpoints_exist_but_none_is_valid(tmp_path: Path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    path = mgr.save(4, {"train": {"step": 4}})
    _no_manifest(path)
    assert mgr.latest_valid() is None
    with pytest.raises(CheckpointError, match=r"1 checkpoint\(s\) under .*none valid \(newest step-00000004: no lmforge") as e:
        mgr.resolve_resume("auto")
    assert "\n" not in str(e.value)


def _two_groups(seed: int, decay: float, lr: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Matrices decayed, gains not (as build_optimizer): two groups with different options."""
    model, _, _ = trained(seed=seed, steps=0)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    opt.step()
    return model, opt


def test_param_groups_are_keyed_by_parameter(tmp_path: Path):
    """Group options are saved per parameter FQN (pipeline stages hold different parameters in
    "the same" group i: list-indexed groups would be one stage's); moments keep their keys."""
    from lmforge.checkpoint.tools import read_checkpoint

    model, opt = _two_groups(seed=0, decay=0.1, lr=1e-2)
    path = CheckpointManager(tmp_path, keep_last=1).save(1, {"app": ModelOptimizerState(model, opt)})
    keys = set(saved_metadata(path))
    fqns = list(model.state_dict())
    assert {f"optim.param_groups.{f}" for f in fqns} <= keys
    assert {f"optim.state.{f}.exp_avg" for f in fqns} <= keys
    assert not [k for k in keys if k.startswith("optim.param_groups.0")]
    groups = read_checkpoint(path)
    assert groups["optim.param_groups.output.weight"]["weight_decay"] == 0.1
    assert groups["optim.param_groups.norm.weight"]["weight_decay"] == 0.0
    model2, opt2 = _two_groups(seed=3, decay=0.5, lr=3e-1)
    CheckpointManager(tmp_path, keep_last=1).load(path, {"app": ModelOptimizerState(model2, opt2)})
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.1, 0.0]
    assert_same_optimizer(opt, opt2)


def test_checkpoint_with_list_indexed_param_groups_still_loads(tmp_path: Path, monkeypatch):
    """A checkpoint written before groups were keyed by FQN ("optim.param_groups.<i>.lr") resumes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    import lmforge.checkpoint.state as state_mod

    model, opt = _two_groups(seed=0, decay=0.1, lr=1e-2)
    with monkeypatch.context() as m:
        m.setattr(state_mod, "OPTIM_OPTIONS", StateDictOptions())  # the old layout
        path = CheckpointManager(tmp_path, keep_last=1).save(1, {"app": ModelOptimizerState(model, opt)})
    keys = set(saved_metadata(path))
    assert "optim.param_groups.1.weight_decay" in keys and "optim.param_groups.output.weight" not in keys
    model2, opt2 = _two_groups(seed=3, decay=0.5, lr=3e-1)
    CheckpointManager(tmp_path, keep_last=1).load(path, {"app": ModelOptimizerState(model2, opt2)})
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.1, 0.0]
    assert_same_optimizer(opt, opt2)


class _Picky:
    """A Stateful that refuses a state of another mode (as comm.adam_moments' states do)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def state_dict(self) -> dict:
        return {"mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"its state was saved in mode {state['mode']!r}\nsecond line")


def test_a_state_that_refuses_what_was_saved_is_one_checkpoint_error_line(tmp_path: Path):
    model, opt, _ = trained(steps=1)
    mgr = CheckpointManager(tmp_path, keep_last=1)
    path = mgr.save(1, {"app": ModelOptimizerState(model, opt), "comm": PerRank(_Picky("global"))})
    mgr.load(path, {"app": ModelOptimizerState(model, opt), "comm": PerRank(_Picky("global"))})
    with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(str(path))}: its state was saved in mode "
                                              r"'global'$"):
        mgr.load(path, {"app": ModelOptimizerState(model, opt), "comm": PerRank(_Picky("local"))})

"""Checkpoints with 2 gloo ranks and a DDP model: save in one pair of processes, load into a fresh
pair; weights, AdamW state and each rank's own RNG streams and per-rank state come back exactly.
Then one process with no process group loads the same checkpoint (world size 2 -> 1)."""

from __future__ import annotations

import os
import random
import traceback
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lmforge.models.llama.sizes import SIZES
from tests.helpers.spawn import fork_ranks, free_port, run_ranks

CFG = replace(SIZES["debug"], max_seq_len=32)
WORLD = 2


def _draws() -> list:
    return [random.random(), float(np.random.rand()), *torch.rand(2).tolist()]


class _Box:
    def __init__(self, value: dict) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return dict(self.value)

    def load_state_dict(self, sd: dict) -> None:
        self.value = dict(sd)


def _model_and_optimizer(seed: int):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmforge.models.llama.model import build_model

    model = DDP(build_model(CFG, seed=seed))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _snapshot(model, opt, step: int, box: _Box, train: dict) -> dict:
    return {"params": {k: v.clone() for k, v in model.module.state_dict().items()},
            "optim": opt.state_dict(), "draws": _draws(), "box": box.value, "train": dict(train), "step": step}


def _worker(rank: int, phase: str, port: int, root: str, out: str) -> None:
    torch.set_num_threads(1)
    try:
        from lmforge.checkpoint import (
            CheckpointError,
            CheckpointManager,
            ModelOptimizerState,
            PerRank,
            RNGState,
        )

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        if phase == "save":
            model, opt = _model_and_optimizer(seed=0)
            g = torch.Generator().manual_seed(rank)  # each rank its own batch
            for _ in range(2):
                tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=g)
                logits = model(tokens[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
            random.seed(100 + rank)
            np.random.seed(200 + rank)
            torch.manual_seed(300 + rank)
            box, train = _Box({"position": 1000 + rank}), {"step": 2, "tokens_seen": 128}
            mgr = CheckpointManager(Path(root), keep_last=2, process_group=dist.group.WORLD)
            step = 2
            mgr.save(step, {"app": ModelOptimizerState(model, opt), "rng": RNGState(), "loader": PerRank(box),
                            "train": train})
        else:
            model, opt = _model_and_optimizer(seed=7)  # different weights and no optimizer state
            random.seed(9)
            np.random.seed(9)
            torch.manual_seed(9)
            box, train = _Box({}), {"step": 0, "tokens_seen": 0}
            mgr = CheckpointManager(Path(root), keep_last=2)  # default group
            path = mgr.resolve_resume("auto")
            step = mgr.load(path, {"app": ModelOptimizerState(model, opt), "rng": RNGState(),
                                   "loader": PerRank(box), "train": train})
            try:  # rank 0 decides, every rank raises the same one-line error (and nobody hangs)
                mgr.resolve_resume(str(Path(root) / "step-99999999"))
                train["error"] = ""
            except CheckpointError as e:
                train["error"] = str(e)
        torch.save(_snapshot(model, opt, step, box, train), Path(out) / f"{phase}{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (Path(out) / f"error-{phase}{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def _run(phase: str, root: Path, out: Path) -> list[dict]:
    # Each phase's ranks are forked from the preloaded server (tests/helpers/spawn.py).
    failure = fork_ranks(_worker, WORLD, (phase, free_port(), str(root), str(out)),
                         ("torch", "torch.distributed.checkpoint", "numpy", __name__), timeout=600)
    if failure:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error-*.txt")))
        raise AssertionError(f"{phase} workers failed: {failure}\n{errors}")
    return [torch.load(out / f"{phase}{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() and a["state"]
    for i in a["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][name], b["state"][i][name]), (i, name)


def test_ddp_save_and_load_in_fresh_ranks(tmp_path: Path):
    root, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    saved = _run("save", root, out)
    assert [p.name for p in root.iterdir()] == ["step-00000002"]
    loaded = _run("load", root, out)

    for rank, (s, lo) in enumerate(zip(saved, loaded)):
        error = lo["train"].pop("error")
        assert lo["step"] == 2 and lo["train"] == {"step": 2, "tokens_seen": 128}
        assert "step-99999999: does not exist" in error and error == loaded[0]["train"].get("error", error)
        assert lo["box"] == {"position": 1000 + rank}  # this rank's own per-rank state
        assert lo["draws"] == s["draws"], f"rank {rank}: RNG streams differ after load"
        for k, v in s["params"].items():
            assert torch.equal(v, lo["params"][k]), (rank, k)
        _assert_same_optimizer(s["optim"], lo["optim"])
    assert saved[0]["draws"] != saved[1]["draws"]  # the ranks' streams really were different

    # World size 2 -> 1, no process group: weights load, per-rank state falls back to rank 0's.
    from lmforge.checkpoint import CheckpointManager, ModelOptimizerState, PerRank, RNGState
    from lmforge.models.llama.model import build_model

    model = build_model(CFG, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    box = _Box({})
    mgr = CheckpointManager(root, keep_last=2)
    assert mgr.load(root / "step-00000002", {"app": ModelOptimizerState(model, opt), "rng": RNGState(),
                                             "loader": PerRank(box), "train": {"step": 0}}) == 2
    assert box.value == {"position": 1000} and _draws() == saved[0]["draws"]
    for k, v in saved[0]["params"].items():
        assert torch.equal(v, model.state_dict()[k]), k
    _assert_same_optimizer(saved[0]["optim"], opt.state_dict())


def _async_storage_ranks(rank: int, world: int, root: str) -> dict:
    """2 DDP ranks, a frozen embedding: async + zstd + int8 moments + incremental saves on a group of
    their own while DDP keeps all-reducing on the default group; then a load in the same ranks."""
    import json

    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmforge.checkpoint import CheckpointManager, ModelOptimizerState
    from lmforge.models.llama.model import build_model

    group = dist.new_group(backend="gloo")
    inner = build_model(CFG, seed=0)
    inner.tok_embeddings.weight.requires_grad_(False)
    model = DDP(inner)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(rank)

    def step() -> None:
        tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=g)
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()

    mgr = CheckpointManager(Path(root), keep_last=1, process_group=group, async_save=True, compression="zstd",
                            optimizer_states="int8", full_every=3)
    state = {"app": ModelOptimizerState(model, opt)}
    step()
    mgr.save(1, state)
    step()  # DDP all-reduces while the writer thread runs its collectives
    mgr.save(2, state)
    expected = {k: v.clone() for k, v in inner.state_dict().items()}
    step()  # after the call: must not show up in checkpoint 2
    mgr.close()
    manifests = {p.name: json.loads((p / "lmforge-checkpoint.json").read_text()) for p in sorted(Path(root).iterdir())}
    inner2 = build_model(CFG, seed=7)
    inner2.tok_embeddings.weight.requires_grad_(False)
    fresh = DDP(inner2)
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    loader = CheckpointManager(Path(root), keep_last=1, process_group=group)
    step_loaded = loader.load(loader.resolve_resume("auto"), {"app": ModelOptimizerState(fresh, opt2)})
    same = all(torch.equal(fresh.module.state_dict()[k], v) for k, v in expected.items())
    return {"manifests": manifests, "step": step_loaded, "same": same, "stats": mgr.stats()}


@pytest.mark.slow
def test_async_compressed_incremental_save_on_two_ranks(tmp_path: Path):
    root = tmp_path / "ckpt"
    results = run_ranks(_async_storage_ranks, WORLD, tmp_path / "out", args=(str(root),),
                        preload=("torch", "torch.distributed.checkpoint"))
    m = results[0]["manifests"]
    # keep_last=1 keeps step 1 only because incremental step 2 is based on it.
    assert sorted(m) == ["step-00000001", "step-00000002"]
    assert m["step-00000001"]["kind"] == "full" and m["step-00000001"]["world_size"] == 2
    inc = m["step-00000002"]
    assert inc["kind"] == "incremental" and inc["base"] == "step-00000001"
    assert inc["compression"] == "zstd" and inc["optimizer_states"] == "int8"
    assert "model.tok_embeddings.weight" in inc["refs"]
    assert not any(k.startswith("model.layers") for k in inc["refs"])
    for r in results:
        assert r["step"] == 2 and r["same"], r
    assert results[0]["stats"] == [] or all(s["stall_s"] <= s["total_s"] for s in results[0]["stats"])

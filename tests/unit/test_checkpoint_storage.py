"""Checkpoint storage modes (single process): async save (publish only after the write, state
snapshotted at the call), zstd (lossless, smaller), lossy optimizer moments (bounded error,
weights exact), incremental checkpoints (unchanged tensors referenced, bit-exact restore, bases
kept by retention), and the int8 block quantizer itself."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import dcp_io as manager_mod  # async staging copy and DCP writes live in dcp_io
from lmforge.checkpoint.formats import dequantize_int8, quantize_int8
from lmforge.checkpoint.manager import CheckpointManager
from lmforge.checkpoint.manifest import verify_checkpoint
from lmforge.checkpoint.state import ModelOptimizerState
from lmforge.checkpoint.weights import load_model_weights
from lmforge.models.llama.model import build_model
from lmforge.storage.layout import MANIFEST
from tests.helpers.checkpoint import CFG, assert_same_optimizer, trained

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _size(path: Path) -> int:
    return json.loads((path / MANIFEST).read_text())["bytes"]


def _fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, opt, _ = trained(seed=5, steps=1)  # different weights, optimizer state exists
    return model, opt


@pytest.mark.timed
def test_async_save_publishes_after_the_write_and_snapshots_at_the_call(tmp_path: Path, monkeypatch):
    model, opt, _ = trained(seed=0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    real_save = manager_mod.dcp.save

    def slow_save(*a, **k):
        time.sleep(0.5)
        return real_save(*a, **k)

    real_copy = manager_mod._copy_state_dict

    def slow_copy(*a, **k):  # the background copy is still running when the optimizer step comes
        time.sleep(0.3)
        return real_copy(*a, **k)

    monkeypatch.setattr(manager_mod.dcp, "save", slow_save)
    monkeypatch.setattr(manager_mod, "_copy_state_dict", slow_copy)
    mgr = CheckpointManager(tmp_path, keep_last=2, async_save=True)
    t0 = time.perf_counter()
    path = mgr.save(3, {"app": ModelOptimizerState(model, opt)})
    assert time.perf_counter() - t0 < 0.25  # returned before the (slowed) copy and write
    # Training goes on: the optimizer step changes the weights in place (its pre-hook first waits
    # until the background copy is done).
    loss = model(torch.zeros(1, 8, dtype=torch.long)).square().mean()
    loss.backward()
    opt.step()
    assert not any(torch.equal(model.state_dict()[k], v) for k, v in expected.items() if "norm" not in k)
    assert not path.exists() and mgr.latest_valid() is None  # not published yet
    mgr.wait()
    assert verify_checkpoint(path).ok
    [rec] = mgr.stats()
    # stall = the save call + the optimizer hook's wait for the copy; total also has the write
    assert rec["step"] == 3 and 0.25 < rec["stall_s"] < 0.8 <= rec["total_s"] and rec["bytes"] > 0
    other, _ = _fresh()
    load_model_weights(path, other)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in expected.items())
    mgr.close()


def test_zstd_is_lossless_and_smaller(tmp_path: Path):
    model, opt, _ = trained(seed=0)
    with torch.no_grad():  # a sparse, frozen-at-zero part, as real checkpoints have
        model.layers["0"].feed_forward.w1.weight.zero_()
    state = {"app": ModelOptimizerState(model, opt), "train": {"step": 2}}
    plain = CheckpointManager(tmp_path / "plain", keep_last=1).save(2, state)
    packed = CheckpointManager(tmp_path / "zstd", keep_last=1, compression="zstd").save(2, state)
    ratio = _size(packed) / _size(plain)
    print(f"zstd size ratio {ratio:.3f}")
    assert ratio < 0.95
    assert json.loads((packed / MANIFEST).read_text())["compression"] == "zstd"
    model2, opt2 = _fresh()
    train = {"step": 0}
    CheckpointManager(tmp_path / "zstd", keep_last=1).load(packed, {"app": ModelOptimizerState(model2, opt2),
                                                                    "train": train})
    assert train == {"step": 2}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert_same_optimizer(opt, opt2)


@pytest.mark.parametrize("mode, max_ratio", [("bf16", 0.70), ("int8", 0.62)])
def test_lossy_optimizer_states_bounded_and_weights_exact(tmp_path: Path, mode: str, max_ratio: float):
    model, opt, _ = trained(seed=0)
    state = {"app": ModelOptimizerState(model, opt)}
    full = CheckpointManager(tmp_path / "fp32", keep_last=1).save(2, state)
    lossy = CheckpointManager(tmp_path / mode, keep_last=1, optimizer_states=mode, quant_block=64).save(2, state)
    ratio = _size(lossy) / _size(full)
    print(f"optimizer_states={mode}: size ratio {ratio:.3f}")
    assert ratio < max_ratio
    model2, opt2 = _fresh()
    CheckpointManager(tmp_path / mode, keep_last=1).load(lossy, {"app": ModelOptimizerState(model2, opt2)})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i in a:
        assert torch.equal(a[i]["step"], b[i]["step"])
        m, m2 = a[i]["exp_avg"], b[i]["exp_avg"]
        v, v2 = a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]
        if mode == "bf16":
            assert torch.allclose(m2, m, rtol=2**-8, atol=0) and torch.allclose(v2, v, rtol=2**-8, atol=0)
        else:  # int8 per block of 64: |error| <= half a step of the block's absmax/127 for m; sqrt(v) only rounds up
            bm = m.abs().reshape(-1, m.shape[-1]).amax(dim=-1, keepdim=True).max().item() / 127
            assert (m2 - m).abs().max().item() <= bm / 2 * 1.001 + 1e-12
            bs = v.sqrt().max().item() / 127
            d = v2.sqrt() - v.sqrt()
            assert d.min().item() >= -1e-4 * bs and d.max().item() <= bs * 1.001 + 1e-12


def test_int8_quantizer_blocks_and_round_up():
    x = torch.randn(3, 300) * torch.logspace(-3, 2, 300)
    q, s = quantize_int8(x, 128)
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (3, 3)
    err = (dequantize_int8(q, s, 128) - x).abs()
    for b in range(3):  # within each block: at most half a step
        sl = slice(b * 128, min((b + 1) * 128, 300))
        assert (err[:, sl] <= s[:, b : b + 1] / 2 + 1e-7).all()
    q, s = quantize_int8(x.abs(), 128, round_up=True)
    assert (dequantize_int8(q, s, 128) >= x.abs() - 1e-6).all()


def _frozen_model_run(steps: int):
    """A model whose embedding, first block and final norm are frozen: those tensors never change."""
    model = build_model(CFG, seed=0)
    model.tok_embeddings.weight.requires_grad_(False)
    model.norm.weight.requires_grad_(False)
    model.layers["0"].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=g)
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(steps):
        step()
    return model, opt, step


def test_incremental_references_unchanged_tensors_and_restores_exactly(tmp_path: Path):
    model, opt, step = _frozen_model_run(1)
    mgr = CheckpointManager(tmp_path, keep_last=1, full_every=3)
    kinds = []
    for s in (1, 2, 3, 4):
        p = mgr.save(s, {"app": ModelOptimizerState(model, opt)})
        kinds.append(json.loads((p / MANIFEST).read_text())["kind"])
        assert (tmp_path / "step-00000001").is_dir() == (s < 4)
        step()
    assert kinds == ["full", "incremental", "incremental", "full"]
    # keep_last=1: the full step-1 stayed while incremental step-2/3 needed it, then went with them.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]

    # A second run to look at the incremental checkpoints themselves (keep all).
    model, opt, step = _frozen_model_run(1)
    mgr = CheckpointManager(tmp_path / "all", keep_last=5, full_every=3)
    saved = []
    for s in (1, 2, 3):
        p = mgr.save(s, {"app": ModelOptimizerState(model, opt)})
        saved.append((p, {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict())))
        step()
    m2 = json.loads((saved[1][0] / MANIFEST).read_text())
    assert m2["kind"] == "incremental" and m2["base"] == "step-00000001"
    assert "model.tok_embeddings.weight" in m2["refs"] and "model.norm.weight" in m2["refs"]
    assert "model.layers.0.attention.wq.weight" in m2["refs"]
    assert not any(k.startswith("model.layers.1") for k in m2["refs"])  # trained weights are rewritten
    ratio = _size(saved[1][0]) / _size(saved[0][0])
    print(f"incremental/full size ratio {ratio:.3f}")
    assert ratio < 0.8  # the frozen quarter of the bytes is not rewritten
    for p, weights, optim in saved[1:]:
        model2, opt2, _ = _frozen_model_run(0)
        with torch.no_grad():
            model2.tok_embeddings.weight.add_(1.0)  # so the referenced tensors must really be loaded
        CheckpointManager(tmp_path / "all", keep_last=5).load(p, {"app": ModelOptimizerState(model2, opt2)})
        assert all(torch.equal(model2.state_dict()[k], v) for k, v in weights.items())
        got = opt2.state_dict()["state"]
        for i, st in optim["state"].items():
            assert all(torch.equal(got[i][n], st[n]) for n in ("step", "exp_avg", "exp_avg_sq"))
    # An incremental checkpoint whose base is damaged is invalid, and says so.
    victim = next((tmp_path / "all" / "step-00000001").glob("*.distcp"))
    victim.write_bytes(victim.read_bytes()[:-10])
    v = verify_checkpoint(saved[1][0])
    assert not v.ok and "base checkpoint step-00000001" in v.reason


@pytest.mark.parametrize("key, value, allowed", [
    ("checkpoint.optimizer_states", "fp8", "fp32"), ("checkpoint.compression", "lz4", "zstd"),
    ("checkpoint.memory_interval", "-1", ">= 0"), ("checkpoint.full_every", "-2", ">= 0"),
    ("checkpoint.async_mode", "process", "async")])
def test_bad_checkpoint_config_is_one_clear_line(key: str, value: str, allowed: str):
    from lmforge.config import ConfigError, load_job_config

    with pytest.raises(ConfigError) as e:
        load_job_config(None, [(key, value)])
    msg = str(e.value)
    assert key in msg and value in msg and allowed in msg and "\n" not in msg

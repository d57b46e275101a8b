"""bench/train_throughput.py compares like with like: the compiled lmforge contestant differs from
the eager one only in compilation (same weights, same loss function), so its ratio to HF measures
what compiling gives and nothing else. (Before, with each library's own loss, the compiled model was
scored with the bench's plain cross-entropy, slower than lmforge's own, which hid what compiling gave.)
Its MFU column names a wrong peak when it reads over 100%."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.usefixtures("one_thread")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_throughput", BENCH / "train_throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_compiled_contestant_computes_what_the_eager_one_does(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    bench = _load_bench()
    # Compilation itself is beside the point here (and takes ~10 s): leave the blocks eager, so
    # any difference between the two contestants is in what the bench wires around them.
    monkeypatch.setattr("lmforge.parallel.compile.apply_compile", lambda model: None)
    contestants = {c.name: c for c in bench.build_contestants(True, "library", "fp32")}
    x, y = bench.batches(1, seed=1)[0]
    eager, compiled = contestants["lmforge"], contestants["lmforge+compile"]
    losses = [eager.loss(x, y), compiled.loss(x, y)]
    assert torch.equal(losses[0], losses[1]), losses
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def test_an_mfu_over_100_percent_is_called_a_wrong_peak() -> None:
    bench = _load_bench()
    assert bench.stale_peak_warning(119e9 / 120e9, 120e9) is None
    line = bench.stale_peak_warning(121.7e9 / 120e9, 120e9)  # the trainer's line (observability/metrics.py)
    assert line is not None and line.startswith("warning: MFU reads 101%: the peak it divides by (120.0 GFLOP/s")
    assert "lmforge bench peak --force" in line and "\n" not in line

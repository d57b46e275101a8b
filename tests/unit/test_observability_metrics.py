"""Throughput/MFU, memory stats and the JSONL + TensorBoard metrics log."""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import pytest
import torch

from lmforge.observability import metrics as M
from lmforge.observability.metrics import MetricsLogger, StepTimer, memory_stats, read_metrics, throughput


def test_throughput_and_mfu() -> None:
    # 2 devices process 1000 tokens in 2 s: 500 tok/s, 250 per device; at 6e6 FLOPs per token
    # each device does 1.5e9 model FLOP/s of its 1e10 peak: MFU 0.15.
    t = throughput(tokens=1000, seconds=2.0, flops_per_token=6e6, peak_flops=1e10, world_size=2)
    assert t.tokens_per_s == 500.0 and t.tokens_per_s_per_device == 250.0
    assert t.model_flops_per_s_per_device == 1.5e9
    assert t.mfu == pytest.approx(0.15)
    assert throughput(1000, 2.0, 6e6, None).mfu == 0.0  # unknown peak reads 0, never divides by 0
    with pytest.raises(ValueError, match="seconds > 0"):
        throughput(1, 0.0, 1.0, 1.0)


def test_step_timer_excludes_paused_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(M.time, "perf_counter", lambda: clock[0])
    timer = StepTimer(flops_per_token=10.0, peak_flops=1000.0, world_size=1)
    timer.add(64)
    clock[0] += 1.0
    with timer.paused():  # e.g. a checkpoint save: 5 s not charged to throughput
        clock[0] += 5.0
    timer.add(64)
    clock[0] += 1.0
    t = timer.measure()
    assert t.tokens_per_s == 64.0  # 128 tokens over 2 s
    assert t.mfu == pytest.approx(64.0 * 10.0 / 1000.0)
    assert timer.tokens == 0 and timer.steps == 0  # a new window


def test_cpu_memory_stats() -> None:
    stats = memory_stats(torch.device("cpu"))
    assert set(stats) == {"mem_rss_gib", "mem_max_rss_gib"}
    assert 0.01 < stats["mem_rss_gib"] < 1024  # this process holds torch: tens of MiB at least
    assert stats["mem_max_rss_gib"] >= stats["mem_rss_gib"] * 0.99  # peak >= current (page rounding)
    before = memory_stats("cpu")["mem_rss_gib"]
    # 64 MiB of fresh anonymous pages, touched: a torch allocation could reuse heap pages that an
    # earlier test in this process left resident (then RSS would not move).
    big = mmap.mmap(-1, 64 << 20)
    big.write(b"\x01" * (64 << 20))
    after = memory_stats("cpu")["mem_rss_gib"]
    assert after - before > 0.04
    big.close()


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_jsonl_records_and_resume_appends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(M.time, "time", lambda: 1700000000.12345)
    with MetricsLogger(tmp_path, jsonl=True, tensorboard=False) as log:
        log.log(1, {"loss": 3.5, "lr": torch.tensor(1e-3), "tokens_seen": 2048})
        # flushed per line: readable before close
        assert _lines(tmp_path / "metrics.jsonl")[0]["loss"] == 3.5
        log.log(1, {"loss": 3.4, "perplexity": math.exp(3.4)}, prefix="val")
    with MetricsLogger(tmp_path, jsonl=True, tensorboard=False) as log:  # a resumed run
        log.log(2, {"loss": float("nan")})
    rows = _lines(tmp_path / "metrics.jsonl")
    assert rows[0] == {"step": 1, "prefix": "train", "time": 1700000000.123, "loss": 3.5,
                       "lr": pytest.approx(1e-3), "tokens_seen": 2048}
    assert isinstance(rows[0]["tokens_seen"], int)
    assert rows[1]["prefix"] == "val" and rows[1]["perplexity"] == pytest.approx(math.exp(3.4))
    # strict JSON (issue 10): NaN is null plus a flag, and read_metrics gives the NaN back
    assert rows[2]["step"] == 2 and rows[2]["loss"] is None and rows[2]["nonfinite"] == {"loss": "nan"}
    strict = [json.loads(x, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
              for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(strict) == 3 and math.isnan(M.read_metrics(tmp_path / "metrics.jsonl")[-1]["loss"])


def test_reserved_and_bad_values(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"step": 3.0})
        with pytest.raises(TypeError, match="'loss' must be a number"):
            log.log(1, {"loss": "high"})
        with pytest.raises(TypeError, match="scalar"):
            log.log(1, {"loss": torch.ones(2)})
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_partial_line_from_a_crash_is_terminated(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "prefix": "train", "loss": 3.0}\n{"step": 2, "pre')
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(2, {"loss": 2.0})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["loss"] == 2.0
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 3.0), (2, 2.0)]


def test_read_metrics_keeps_the_last_record_per_step(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in (1, 2, 3):
            log.log(step, {"loss": 10.0 + step})  # crashed after step 3, checkpoint was at 1
        log.log(2, {"loss": 2.0})
        log.log(2, {"loss": 9.0}, prefix="val")
        log.log(3, {"loss": 3.0})
    train = read_metrics(tmp_path / "metrics.jsonl", prefix="train")
    assert [(r["step"], r["loss"]) for r in train] == [(1, 11.0), (2, 2.0), (3, 3.0)]
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl", prefix="val")] == [9.0]


def test_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, jsonl=False, tensorboard=True) as log:
        log.log(1, {"loss": 4.0, "mfu": 0.25})
        log.log(2, {"loss": 3.0, "mfu": 0.5})
        log.log(2, {"loss": 3.5}, prefix="val")
    assert not (tmp_path / "metrics.jsonl").exists()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"train/loss", "train/mfu", "val/loss"} <= set(acc.Tags()["scalars"])
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 4.0), (2, 3.0)]
    assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == [(2, 3.5)]


def test_disabled_logger_is_a_no_op(tmp_path: Path) -> None:
    out = tmp_path / "rank1"
    log = MetricsLogger(out, jsonl=True, tensorboard=True, enabled=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not out.exists()

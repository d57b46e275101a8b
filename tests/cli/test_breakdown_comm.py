"""Time breakdown on 2 DDP ranks with a slow network: every gradient all-reduce completes 300 ms
late (LMFORGE_FAULTS comm_delay_s: a sleep in the comm hook's completion callback, on gloo's
thread, so it overlaps backward as a slow link would). The run is labelled communication-bound,
the exposed communication holds the delay, and the bytes per step are the gradients'."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import read_metrics, run_cli, tiny_run_args

DELAY_S, STEPS = 0.3, 6


@pytest.mark.timed
@pytest.mark.slow
@pytest.mark.distributed
def test_slow_network_is_communication_bound(tiny_data_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_FAULTS", json.dumps({"comm_delay_s": DELAY_S}))
    proc = run_cli(["train", *tiny_run_args(tiny_data_dir, tmp_path, "--train.steps", str(STEPS),
                                            "--train.global_batch_size", "8", "--train.micro_batch_size", "2",
                                            "--train.eval_interval", "0", "--checkpoint.enabled", "false",
                                            "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1",
                                            "--metrics.log_interval", "2")], nproc=2)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        print(r["step"], r["bound"], r["critical_rank"], {k: round(v, 4) for k, v in r.items() if k.startswith("time_")})
    grads = rows[0]["mem_grads_bytes"]  # the gradients DDP all-reduces once per step (fp32, uncompressed)
    for r in rows:
        # one synchronising micro-batch of the two per step, one bucket: >= DELAY_S exposed per step
        assert r["time_comm_exposed_s"] >= 2 * DELAY_S, r
        assert r["comm_bytes_per_step"] == grads and r["comm_compression_ratio"] == 1.0, r
    assert all(r["bound"] == 1 for r in rows[1:]), rows  # communication (the first window holds warm-up)
    summary = read_metrics(tmp_path, "summary")[-1]
    print({k: round(v, 4) for k, v in summary.items() if k.startswith(("time_", "bound", "step_time"))})
    parts = sum(summary[k] for k in summary if k.startswith("time_"))
    assert summary["bound"] == 1 and summary["bound_share"] > 0.4, summary
    assert abs(parts - summary["step_time_s"] * STEPS) < 1e-6 * parts
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("time breakdown:"))
    assert line.startswith("time breakdown: communication-bound: ") and "--comm.compression int8" in line, line

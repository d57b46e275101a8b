"""Units of the fault-tolerance pieces: the stability policy's verdicts and state, the straggler
rule, the [stability] config checks, the torchrun command `lmforge train` builds, fault hooks."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.cli import _pop_launcher_args, torchrun_command
from lmforge.config import ConfigError, StabilityConfig, load_job_config
from lmforge.train.faults import FaultInjector
from lmforge.train.stability import StabilityPolicy, TrainingDivergedError
from lmforge.train.stragglers import find_straggler


def policy(**kw) -> StabilityPolicy:
    return StabilityPolicy(StabilityConfig(enabled=True, spike_min_history=3, spike_window=5, **kw))


def feed(p: StabilityPolicy, losses: list[float], start: int = 1) -> list[str]:
    return [p.check(start + i, v, 1.0, (4 * i, 4 * i + 4)).verdict for i, v in enumerate(losses)]


def test_nonfinite_loss_or_grad_is_skipped_and_counted() -> None:
    p = policy()
    assert [p.check(1, math.nan, 1.0, (0, 4)).verdict, p.check(2, 3.0, math.inf, (4, 8)).verdict] == \
        ["nonfinite", "nonfinite"]
    assert p.counters()["skipped_nonfinite"] == 2 and len(p.window) == 0
    off = policy(skip_nonfinite=False)
    assert off.check(1, math.nan, 1.0, (0, 4)).verdict == "ok"
    # Under fp16 loss scaling a finite loss with inf grads is an overflow (GradScaler's business).
    fp16 = StabilityPolicy(StabilityConfig(enabled=True), loss_scaling=True)
    assert fp16.check(1, 3.0, math.inf, (0, 4)).verdict == "overflow" and fp16.overflow_skips == 1
    assert fp16.check(2, math.nan, math.nan, (4, 8)).verdict == "nonfinite"


def test_spike_needs_history_and_a_large_zscore() -> None:
    p = policy(spike_zscore=4.0, max_consecutive_spikes=0)
    assert feed(p, [5.0, 50.0]) == ["ok", "ok"]  # no verdict before spike_min_history losses
    p = policy(spike_zscore=4.0, max_consecutive_spikes=0)
    assert feed(p, [5.0, 5.1, 4.9, 5.05, 5.2, 9.0, 5.0]) == ["ok"] * 5 + ["spike", "ok"]
    assert p.spike_skips == 1 and 9.0 not in p.window  # a spike never enters the window
    assert p.zscore(5.0) < 4.0 < p.zscore(9.0)
    assert feed(policy(spike_zscore=0), [5.0, 5.1, 4.9, 500.0]) == ["ok"] * 4  # 0 disables


def test_consecutive_spikes_roll_back_with_the_offending_ranges() -> None:
    p = policy(spike_zscore=4.0, max_consecutive_spikes=2, max_rollbacks=1)
    assert feed(p, [5.0, 5.1, 4.9, 9.0, 5.0, 9.0]) == ["ok", "ok", "ok", "spike", "ok", "spike"]  # not in a row
    check = p.check(7, 9.5, 1.0, (24, 28))
    assert check.verdict == "rollback" and check.first_spike_step == 6 and check.spike_ranges == [(20, 24), (24, 28)]
    assert p.rollbacks == 1
    feed(p, [9.0], start=8)
    with pytest.raises(TrainingDivergedError, match="max_rollbacks = 1"):
        feed(p, [9.0], start=9)


def test_policy_state_round_trips() -> None:
    p = policy(spike_zscore=4.0)
    feed(p, [5.0, 5.1, 4.9, 9.0, math.nan])
    q = policy(spike_zscore=4.0)
    q.load_state_dict(p.state_dict())
    assert q.counters() == p.counters() and list(q.window) == list(p.window) and q._run == p._run
    assert q.check(9, 9.0, 1.0, (0, 4)).verdict == p.check(9, 9.0, 1.0, (0, 4)).verdict == "spike"


def test_straggler_rule() -> None:
    r = find_straggler([0.010, 0.011, 0.030, 0.010], factor=1.5)
    assert r.straggler_rank == 2 and r.median == pytest.approx(0.010) and r.max_over_median == pytest.approx(3.0)
    assert find_straggler([0.010, 0.014], factor=1.5).straggler_rank == -1
    assert find_straggler([0.010, 0.016], factor=1.5).straggler_rank == 1  # beyond 2x of the median of all
    assert find_straggler([0.010, 0.040], factor=1.5).metrics()["step_time_max_over_median"] == pytest.approx(4.0)
    assert find_straggler([0.002, 0.006], factor=1.5).straggler_rank == -1  # 3x, but 4 ms: noise


@pytest.mark.parametrize("key,value,phrase", [
    ("stability.spike_zscore", "-1", "must be >= 0"),
    ("stability.spike_min_history", "100", "must be <= stability.spike_window"),
    ("stability.max_consecutive_spikes", "-2", "must be >= 0"),
    ("metrics.straggler_factor", "0.5", "must be > 1, or 0"),
])
def test_config_errors_are_one_line(key: str, value: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_job_config(None, [(key, value)])
    assert key in str(e.value) and phrase in str(e.value) and "\n" not in str(e.value)


def test_launcher_options_become_torchrun_options() -> None:
    found, rest = _pop_launcher_args(["--nproc", "2", "--train.steps", "5", "--max-restarts=3"])
    assert found == {"--nproc": "2", "--max-restarts": "3"} and rest == ["--train.steps", "5"]
    cmd = torchrun_command(found, "r.toml", rest)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "--max-restarts=3",
                       "-m", "lmforge", "train", "r.toml", "--train.steps", "5"]
    elastic = torchrun_command({"--nproc": "4", "--nnodes": "1:3", "--rdzv-endpoint": "host:29400"}, None, [])
    assert "--nnodes=1:3" in elastic and "--rdzv-backend=c10d" in elastic and "--standalone" not in elastic
    with pytest.raises(ConfigError, match="needs --rdzv-endpoint"):
        torchrun_command({"--nnodes": "2:4"}, None, [])
    for bad in (["--max-restarts", "x"], ["--nnodes", "3:2"], ["--nproc", "0"]):
        with pytest.raises(ConfigError):
            _pop_launcher_args(bad)


def test_fault_hooks() -> None:
    f = FaultInjector({"nan_steps": [2], "spike_positions": [9], "spike_factor": 4})
    loss = torch.tensor(2.0)
    assert f.poison_loss(1, [0, 1], loss) == 2.0 and math.isnan(f.poison_loss(2, [0, 1], loss))
    assert f.poison_loss(5, [8, 9], loss) == 8.0
    assert not FaultInjector().active
    with pytest.raises(ValueError, match="marker_dir"):
        FaultInjector({"kill": [[3, 1]]})

"""Failure model: Young/Daly closed forms, the event simulation against Daly's expected wall time,
the simulated optimum, the memory tier, seeds, and the Llama 3 fleet's MTBF."""

from __future__ import annotations

import math

import pytest

from lmforge.config.loader import ConfigError
from lmforge.plan.failures import (
    CheckpointTier,
    FailureModel,
    best_interval,
    daly_goodput,
    daly_interval,
    daly_wall_s,
    reliability,
    simulate,
    young_interval,
)

DISK = CheckpointTier("disk", write_s=60.0, restore_s=120.0, survives_node_loss=True)


def test_young_and_daly_closed_forms() -> None:
    assert young_interval(60, 3600) == pytest.approx(math.sqrt(2 * 60 * 3600))
    # Daly eq. 37 by hand: 657.27 * (1 + sqrt(60/7200)/3 + (60/7200)/9) - 60
    assert daly_interval(60, 3600) == pytest.approx(617.9, abs=0.2)
    assert daly_interval(10_000, 3600) == 3600  # a write longer than 2 MTBF: checkpoint every MTBF
    # no failures: the wall time is the work plus the saves
    assert daly_wall_s(1000, 100, 5, 50, math.inf) == pytest.approx(1050)
    # goodput is lower on either side of Daly's interval
    best = daly_goodput(617.9, 60, 600, 3600)
    assert daly_goodput(200, 60, 600, 3600) < best and daly_goodput(2000, 60, 600, 3600) < best


def test_job_mtbf_scales_with_devices_and_nodes() -> None:
    fm = FailureModel(devices=8, device_mtbf_h=80_000, node_mtbf_h=40_000)
    assert fm.interruptions_per_hour == pytest.approx(8 / 80_000 + 1 / 40_000)
    assert fm.at(16_384).job_mtbf_s == pytest.approx(3600 / (16_384 / 80_000 + 2048 / 40_000))
    llama = FailureModel.from_observed(16_384, 419, 54 * 24)
    assert llama.job_mtbf_s / 3600 == pytest.approx(54 * 24 / 419)


def test_simulation_matches_daly_expected_wall_time() -> None:
    fm = FailureModel(devices=4096, device_mtbf_h=4096 * 2.0, restart_s=300)  # job MTBF 2 h
    tau = daly_interval(DISK.write_s, fm.job_mtbf_s)
    sim = simulate(fm, 200 * 3600, tau, DISK, runs=24, seed=1)
    closed = daly_goodput(tau, DISK.write_s, fm.restart_s + DISK.restore_s, fm.job_mtbf_s)
    assert sim.goodput == pytest.approx(closed, abs=0.01)
    assert sim.interruptions == pytest.approx(sim.wall_h / 2.0, rel=0.1)  # one per job MTBF of wall time


def test_simulated_optimum_beats_far_intervals_and_sits_near_daly() -> None:
    fm = FailureModel(devices=4096, device_mtbf_h=4096 * 2.0, restart_s=300)
    best = best_interval(fm, 100 * 3600, DISK, runs=12, seed=0)
    tau = daly_interval(DISK.write_s, fm.job_mtbf_s)
    for far in (tau / 4, tau * 4):
        assert simulate(fm, 100 * 3600, far, DISK, runs=12, seed=0).goodput < best.goodput
    assert tau / 2.5 <= best.interval_s <= tau * 2.5


def test_memory_tier_helps_against_software_crashes_only() -> None:
    mem = CheckpointTier("memory", write_s=2.0, restore_s=10.0, survives_node_loss=False)
    work = 100 * 3600
    soft = FailureModel(devices=4096, device_mtbf_h=4096 * 1.0, software_fraction=1.0, restart_s=120)
    hard = FailureModel(devices=4096, device_mtbf_h=4096 * 1.0, software_fraction=0.0, restart_s=120)
    disk_only = simulate(soft, work, 600, DISK, runs=12, seed=3).goodput
    tiered = simulate(soft, work, 150, DISK, mem, disk_every=4, runs=12, seed=3).goodput
    assert tiered > disk_only + 0.03
    # when every failure takes a machine, the memory snapshots are lost: the disk interval decides
    lost = simulate(hard, work, 150, DISK, mem, disk_every=4, runs=12, seed=3).goodput
    assert lost < tiered - 0.03


def test_seed_fixes_the_draws() -> None:
    fm = FailureModel(devices=1024, device_mtbf_h=1024 * 3.0)
    a = simulate(fm, 50 * 3600, 900, DISK, runs=4, seed=7)
    assert a == simulate(fm, 50 * 3600, 900, DISK, runs=4, seed=7)
    assert a != simulate(fm, 50 * 3600, 900, DISK, runs=4, seed=8)


def test_reliability_report_and_errors() -> None:
    fm = FailureModel(devices=2048, device_mtbf_h=2048 * 4.0)
    r = reliability(fm, 50 * 3600, DISK, runs=4)
    assert r.job_mtbf_h == pytest.approx(4.0)
    assert r.sim_best.goodput >= r.sim_at_daly.goodput - 0.01
    with pytest.raises(ConfigError, match="software_fraction"):
        simulate(FailureModel(devices=8, device_mtbf_h=10, software_fraction=1.5), 100, 10, DISK)


def _stepwise_run(rng, work_s, interval_s, fm, disk, memory, disk_every):  # noqa: ANN001, ANN202
    """The simulation one save at a time (the form before whole cycles were skipped at once)."""
    mtbf = fm.job_mtbf_s
    n = max(1, math.ceil(work_s / interval_s))
    k = disk_every if memory is not None else 1
    t, done, last_mem, last_disk, failures = 0.0, 0, 0, 0, 0
    to_failure = rng.exponential(mtbf)
    while done < n:
        is_disk = (done + 1) % k == 0 or done + 1 == n
        dur = interval_s + (disk.write_s if is_disk else memory.write_s)
        if to_failure >= dur:
            to_failure -= dur
            t += dur
            done += 1
            last_disk, last_mem = (done, last_mem) if is_disk else (last_disk, done)
            continue
        t += to_failure
        failures += 1
        if memory is not None and rng.random() < fm.software_fraction and last_mem > last_disk:
            done, restore = last_mem, memory.restore_s
        else:
            done, restore = last_disk, disk.restore_s
            last_mem = min(last_mem, last_disk)
        while True:
            to_failure = rng.exponential(mtbf)
            if to_failure >= fm.restart_s + restore:
                t += fm.restart_s + restore
                to_failure -= fm.restart_s + restore
                break
            t += to_failure
            failures += 1
    return t, failures


@pytest.mark.parametrize("memory, every, soft", [(None, 1, 0.0), (CheckpointTier("memory", 2.0, 10.0, False), 4, 0.5),
                                                 (CheckpointTier("memory", 2.0, 10.0, False), 1, 0.5),
                                                 (CheckpointTier("memory", 1.0, 5.0, False), 7, 1.0)])
def test_skipping_whole_cycles_gives_the_stepwise_answer(monkeypatch: pytest.MonkeyPatch, memory, every, soft) -> None:  # noqa: ANN001
    """The simulation skips the saves between failures in one step; same draws, same wall times."""
    import lmforge.plan.failures as failures

    fm = FailureModel(devices=512, device_mtbf_h=512 * 1.5, software_fraction=soft, restart_s=200)
    fast = [simulate(fm, 40 * 3600, x, DISK, memory, every, runs=6, seed=5) for x in (97.0, 600.0, 5000.0)]
    monkeypatch.setattr(failures, "_one_run", _stepwise_run)
    slow = [simulate(fm, 40 * 3600, x, DISK, memory, every, runs=6, seed=5) for x in (97.0, 600.0, 5000.0)]
    for a, b in zip(fast, slow):
        assert a.interruptions == b.interruptions and a.goodput == pytest.approx(b.goodput, rel=1e-9)
        assert a.wall_h == pytest.approx(b.wall_h, rel=1e-9)
    never = FailureModel(devices=8, device_mtbf_h=math.inf)
    assert simulate(never, 3600, 100, DISK, runs=1).wall_h == pytest.approx((3600 + 36 * 60) / 3600)

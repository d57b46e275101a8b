"""Failures at scale: how often a synchronous job is interrupted, how often to checkpoint, and what
fraction of wall time ends up as training (goodput).

Why: one device failing stops every rank of a synchronous job, so the job's mean time between
interruptions shrinks as 1 / devices; past a few thousand devices the checkpoint interval decides
a sizeable part of the bill. Two answers are given and compared:

- closed forms for exponential failures: Young (1974) `sqrt(2 * write * MTBF)`, Daly (2006)'s
  higher-order interval and Daly's expected wall time, which also charges failures during restarts;
- an event simulation with a seed (`simulate`) that adds what the closed forms leave out: two
  checkpoint tiers (a host-memory snapshot that a software crash keeps and a hardware failure
  loses, and a durable disk checkpoint every k-th save), and finds the best interval by search.

Times are seconds unless a name says otherwise; rates are per hour in the inputs (MTBF in hours is
how vendors and papers state them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from lmforge.config.checks import require

__all__ = ["CheckpointTier", "FailureModel", "SimResult", "Reliability", "young_interval", "daly_interval",
           "daly_wall_s", "daly_goodput", "simulate", "best_interval", "reliability"]


@dataclass(frozen=True)
class CheckpointTier:
    """One place checkpoints go: `write_s` is the time training stops per save (the blocking part;
    an async save's stall), `restore_s` the time to load it back on restart. A memory tier
    (lmforge's /dev/shm snapshots) survives a process crash but not the loss of a machine."""

    name: str
    write_s: float
    restore_s: float
    survives_node_loss: bool

    def validate(self) -> None:
        require(self.write_s >= 0, f"tier {self.name}.write_s", self.write_s, "must be >= 0")
        require(self.restore_s >= 0, f"tier {self.name}.restore_s", self.restore_s, "must be >= 0")


@dataclass(frozen=True)
class FailureModel:
    """What interrupts a job of `devices` accelerators. `device_mtbf_h`: mean hours between
    interrupting failures of one device (GPU, HBM, its link); `node_mtbf_h`: of one host apart from
    its devices (CPU, memory, NIC, power; inf: none); `software_fraction`: share of interruptions
    that leave every machine up (crashes, hangs; the memory tier survives them); `restart_s`:
    detection + rescheduling + process-group start, before the checkpoint is read;
    `extra_per_hour`: further interruptions of the whole job per hour (spot preemptions)."""

    devices: int
    device_mtbf_h: float
    devices_per_node: int = 8
    node_mtbf_h: float = math.inf
    software_fraction: float = 0.0
    restart_s: float = 600.0
    extra_per_hour: float = 0.0

    def validate(self) -> None:
        require(self.devices >= 1, "devices", self.devices, "must be >= 1")
        require(self.devices_per_node >= 1, "devices_per_node", self.devices_per_node, "must be >= 1")
        require(self.device_mtbf_h > 0, "device_mtbf_h", self.device_mtbf_h, "must be > 0")
        require(self.node_mtbf_h > 0, "node_mtbf_h", self.node_mtbf_h, "must be > 0")
        require(0.0 <= self.software_fraction <= 1.0, "software_fraction", self.software_fraction, "must be in [0, 1]")
        require(self.restart_s >= 0, "restart_s", self.restart_s, "must be >= 0")
        require(self.extra_per_hour >= 0, "extra_per_hour", self.extra_per_hour, "must be >= 0")

    @property
    def nodes(self) -> int:
        return math.ceil(self.devices / self.devices_per_node)

    @property
    def interruptions_per_hour(self) -> float:
        return self.devices / self.device_mtbf_h + self.nodes / self.node_mtbf_h + self.extra_per_hour

    @property
    def job_mtbf_s(self) -> float:
        """Mean seconds between interruptions of the whole job."""
        rate = self.interruptions_per_hour
        return math.inf if rate == 0 else 3600.0 / rate

    def at(self, devices: int) -> FailureModel:
        """The same fleet at another size (per-device and per-node rates kept)."""
        return replace(self, devices=devices)

    @staticmethod
    def from_observed(devices: int, interruptions: int, hours: float, **kw: float) -> FailureModel:
        """The per-device MTBF that `interruptions` in `hours` on `devices` imply (all charged to
        devices, as a paper's count does not split them)."""
        require(interruptions > 0, "interruptions", interruptions, "must be > 0")
        return FailureModel(devices=devices, device_mtbf_h=devices * hours / interruptions, **kw)


def young_interval(write_s: float, mtbf_s: float) -> float:
    """Young (1974): the compute time between checkpoints that minimises the expected waste."""
    return math.sqrt(2.0 * write_s * mtbf_s)


def daly_interval(write_s: float, mtbf_s: float) -> float:
    """Daly (2006), eq. 37: the higher-order optimum; equals the MTBF once a write costs 2 MTBF."""
    if math.isinf(mtbf_s):
        return math.inf  # nothing fails: one checkpoint at the end
    if write_s >= 2.0 * mtbf_s:
        return mtbf_s
    x = write_s / (2.0 * mtbf_s)
    return math.sqrt(2.0 * write_s * mtbf_s) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - write_s


def daly_wall_s(work_s: float, interval_s: float, write_s: float, restart_s: float, mtbf_s: float) -> float:
    """Daly (2006), eq. 13: expected wall time of `work_s` of training with a checkpoint every
    `interval_s` of it, exponential failures of mean `mtbf_s`, `restart_s` (restart + restore)
    after each, failures during restarts and saves included."""
    if math.isinf(mtbf_s):
        return work_s + (0.0 if math.isinf(interval_s) else work_s / interval_s * write_s)
    m = mtbf_s
    return m * math.exp(restart_s / m) * math.expm1((interval_s + write_s) / m) * work_s / interval_s


def daly_goodput(interval_s: float, write_s: float, restart_s: float, mtbf_s: float) -> float:
    """Training time over wall time at that interval (the run length cancels)."""
    return 1.0 / daly_wall_s(1.0, interval_s, write_s, restart_s, mtbf_s)


@dataclass(frozen=True)
class SimResult:
    interval_s: float
    goodput: float  # mean over runs of work / wall
    goodput_std: float
    interruptions: float  # mean per run
    wall_h: float  # mean per run


def _one_run(rng: np.random.Generator, work_s: float, interval_s: float, fm: FailureModel,
             disk: CheckpointTier, memory: CheckpointTier | None, disk_every: int) -> tuple[float, int]:
    """Wall seconds and interruptions of one run. Work is cut into chunks of `interval_s`, each
    ended by a save: to disk every `disk_every`-th save, to memory otherwise (without a memory
    tier every save goes to disk). A failure rolls back to the newest checkpoint that survived it."""
    mtbf = fm.job_mtbf_s
    n = max(1, math.ceil(work_s / interval_s))
    k = disk_every if memory is not None else 1
    t, done, last_mem, last_disk, failures = 0.0, 0, 0, 0, 0
    to_failure = rng.exponential(mtbf)
    cycle = k * interval_s + (k - 1) * (memory.write_s if memory is not None else 0.0) + disk.write_s
    while done < n:
        # Whole cycles of k saves (the k-th to disk) that end before the next failure, at once: the
        # loop then costs O(failures), not O(saves), which makes long horizons affordable (a
        # few-device fleet checkpoints ~1,000 times per failure). No draw is skipped.
        whole = 0
        if done % k == 0:
            fit = (n - 1 - done) // k if math.isinf(to_failure) else int(to_failure // cycle)
            whole = min((n - 1 - done) // k, fit)
            if whole > 0 and whole * cycle > to_failure:  # rounding at the boundary: leave it to the step below
                whole -= 1
        if whole > 0:
            to_failure -= whole * cycle
            t += whole * cycle
            done += whole * k
            last_disk, last_mem = done, (done - 1 if k > 1 else last_mem)
            continue
        is_disk = (done + 1) % k == 0 or done + 1 == n
        dur = interval_s + (disk.write_s if is_disk else memory.write_s)  # type: ignore[union-attr]
        if to_failure >= dur:
            to_failure -= dur
            t += dur
            done += 1
            last_disk, last_mem = (done, last_mem) if is_disk else (last_disk, done)
            continue
        t += to_failure  # an interruption mid-chunk (or mid-save): roll back, restart
        failures += 1
        keeps_memory = memory is not None and rng.random() < fm.software_fraction
        if keeps_memory and last_mem > last_disk:
            done, restore = last_mem, memory.restore_s  # type: ignore[union-attr]
        else:
            done, restore = last_disk, disk.restore_s
            last_mem = min(last_mem, last_disk)  # a lost machine takes its memory snapshot with it
        while True:  # the restart is exposed to failures too
            to_failure = rng.exponential(mtbf)
            if to_failure >= fm.restart_s + restore:
                t += fm.restart_s + restore
                to_failure -= fm.restart_s + restore
                break
            t += to_failure
            failures += 1
    return t, failures


def simulate(fm: FailureModel, work_s: float, interval_s: float, disk: CheckpointTier,
             memory: CheckpointTier | None = None, disk_every: int = 1, runs: int = 16,
             seed: int = 0) -> SimResult:
    """Monte Carlo over `runs` runs of `work_s` seconds of training (exponential interruptions of
    the job's MTBF). The same seed gives the same draws, so intervals compared under one seed see
    common random numbers."""
    fm.validate()
    disk.validate()
    if memory is not None:
        memory.validate()
    require(interval_s > 0, "interval_s", interval_s, "must be > 0")
    require(disk_every >= 1, "disk_every", disk_every, "must be >= 1")
    rng = np.random.default_rng(seed)
    walls, fails = [], []
    for _ in range(runs):
        wall, f = _one_run(rng, work_s, interval_s, fm, disk, memory, disk_every)
        walls.append(wall)
        fails.append(f)
    good = np.asarray([work_s / w for w in walls])
    return SimResult(interval_s, float(good.mean()), float(good.std()), float(np.mean(fails)),
                     float(np.mean(walls)) / 3600.0)


def best_interval(fm: FailureModel, work_s: float, disk: CheckpointTier, memory: CheckpointTier | None = None,
                  disk_every: int = 1, runs: int = 16, seed: int = 0, points: int = 15) -> SimResult:
    """The simulated optimum: intervals from Daly's / 4 to x 4 (geometric), each simulated with the
    same seed; the best mean goodput wins."""
    write = disk.write_s if memory is None else (memory.write_s * (disk_every - 1) + disk.write_s) / disk_every
    centre = daly_interval(max(write, 1e-3), fm.job_mtbf_s)
    if math.isinf(centre):  # nothing fails: one save at the end is best
        return simulate(fm, work_s, work_s, disk, memory, disk_every, runs, seed)
    grid = np.geomspace(centre / 4.0, centre * 4.0, points)
    results = [simulate(fm, work_s, float(x), disk, memory, disk_every, runs, seed) for x in grid]
    return max(results, key=lambda r: r.goodput)


@dataclass(frozen=True)
class Reliability:
    devices: int
    job_mtbf_h: float
    young_s: float
    daly_s: float
    daly_goodput: float  # at Daly's interval, closed form
    sim_at_daly: SimResult
    sim_best: SimResult


def reliability(fm: FailureModel, work_s: float, disk: CheckpointTier, memory: CheckpointTier | None = None,
                disk_every: int = 1, runs: int = 16, seed: int = 0) -> Reliability:
    """Every answer for one job: its MTBF, Young's and Daly's intervals for the disk tier, Daly's
    goodput there, the simulated goodput at Daly's interval and the simulated optimum."""
    m = fm.job_mtbf_s
    young, daly = young_interval(disk.write_s, m), daly_interval(disk.write_s, m)
    return Reliability(
        devices=fm.devices, job_mtbf_h=m / 3600.0, young_s=young, daly_s=daly,
        daly_goodput=daly_goodput(daly, disk.write_s, fm.restart_s + disk.restore_s, m),
        sim_at_daly=simulate(fm, work_s, daly, disk, None, 1, runs, seed),
        sim_best=best_interval(fm, work_s, disk, memory, disk_every, runs, seed))

"""Energy and carbon: joules per training step from the hardware's counters where it exposes them,
a stated estimate where it does not, the per-run sum, and a pre-flight estimate for a planned run.

Sources, best first: NVML's total-energy counter per GPU (pynvml, Volta and later), RAPL package
counters under /sys/class/powercap/intel-rapl:N/energy_uj on CPUs (often root-only or absent in
VMs), else watts x wall time (`TdpEstimate`, `measured = False`, so every report says it is an
estimate). Counters are cumulative; RAPL's wraps at max_energy_range_uj and is unwrapped here.

`EnergyMeter` is what the trainer calls: `start()` once, `step()` after each optimizer step (the
joules since the previous call, a `energy_j` metrics value), `total()` at the end: the sum of the
per-step records, so the run's figure and its steps agree by construction.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lmforge.config.checks import require
from lmforge.config.energy import EnergyConfig

__all__ = ["EnergySource", "RaplSource", "NvmlSource", "TdpEstimate", "EnergyMeter", "EnergyEstimate",
           "rapl_zones", "tdp_watts", "open_source", "preflight_estimate", "CPU_WATTS_PER_THREAD"]

POWERCAP = Path("/sys/class/powercap")
# No datasheet gives a per-thread CPU figure: a 280 W, 64-core / 128-thread EPYC 7763 (Zen 3) is
# ~2.2 W per thread at full load; 5 W per thread used leaves room for memory and uncore power.
CPU_WATTS_PER_THREAD = 5.0
# Board power (TDP) of the SXM parts, W; matched as substrings of torch.cuda.get_device_name().
_GPU_TDP: list[tuple[str, float]] = [("B200", 1000.0), ("H200", 700.0), ("H100", 700.0), ("A100", 400.0),
                                     ("L40", 300.0), ("A10", 150.0), ("V100", 300.0)]
MICRO = 1e-6


class EnergySource(Protocol):
    name: str
    measured: bool

    def read_j(self) -> float:
        """Cumulative joules since an arbitrary origin (monotonic)."""
        ...


def rapl_zones(root: Path = POWERCAP) -> list[Path]:
    """Top-level RAPL zones (packages; sub-zones like core/dram are inside them) whose counter this
    process can read."""
    zones = []
    for z in sorted(root.glob("intel-rapl:*")):
        if z.name.count(":") != 1:
            continue
        try:
            int((z / "energy_uj").read_text())
        except (OSError, ValueError):
            continue
        zones.append(z)
    return zones


class RaplSource:
    """Sum of the package counters of the readable RAPL zones, unwrapped."""

    measured = True

    def __init__(self, zones: Sequence[Path]):
        require(len(zones) > 0, "energy.source", "rapl", "no readable RAPL zone under /sys/class/powercap")
        self.zones = list(zones)
        self.name = f"RAPL ({len(self.zones)} package zone(s))"
        self._range = []
        for z in self.zones:
            try:
                self._range.append(int((z / "max_energy_range_uj").read_text()))
            except (OSError, ValueError):
                self._range.append(2**32)
        self._last = [self._raw(z) for z in self.zones]
        self._total_uj = 0

    @staticmethod
    def _raw(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read_j(self) -> float:
        for i, z in enumerate(self.zones):
            now = self._raw(z)
            delta = now - self._last[i]
            if delta < 0:  # the counter wrapped
                delta += self._range[i] + 1
            self._total_uj += delta
            self._last[i] = now
        return self._total_uj * MICRO


class NvmlSource:
    """NVML's total energy (mJ since the driver loaded) summed over the given GPU indices (NVML's
    numbering of the machine's GPUs, not CUDA_VISIBLE_DEVICES-relative torch indices)."""

    measured = True

    def __init__(self, indices: Sequence[int]):
        import pynvml  # optional: only where installed

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self.name = f"NVML ({len(self._handles)} GPU(s))"

    def read_j(self) -> float:
        return sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles) * 1e-3


class TdpEstimate:
    """Not a measurement: `watts` x the seconds of `clock` since creation. GPUs: board power x wall
    time. CPUs: power per busy thread x this process's CPU time (`time.process_time`, all its
    threads), so other jobs on a shared machine are not charged to the run."""

    measured = False

    def __init__(self, watts: float, clock: Callable[[], float] = time.monotonic, what: str = "wall time"):
        require(watts > 0, "energy.watts_per_device", watts, "must be > 0")
        self.watts = watts
        self._clock = clock
        self._t0 = clock()
        self.name = f"estimate: {watts:g} W x {what} (no energy counter readable)"

    def read_j(self) -> float:
        return self.watts * (self._clock() - self._t0)


def tdp_watts(device_name: str | None, cpu_threads: int | None = None) -> float:
    """The power the estimate assumes for one device: a GPU's board TDP by name, or for a CPU
    `CPU_WATTS_PER_THREAD` x the threads this process may use."""
    if device_name:
        for key, watts in _GPU_TDP:
            if key.lower() in device_name.lower():
                return watts
    threads = cpu_threads or len(os.sched_getaffinity(0))
    return CPU_WATTS_PER_THREAD * threads


def open_source(cfg: EnergyConfig, gpu_indices: Sequence[int] = (), device_name: str | None = None,
                cpu_threads: int | None = None, root: Path = POWERCAP) -> EnergySource:
    """The best source `cfg.source` allows here: NVML for GPUs when pynvml imports, RAPL for CPUs when
    readable, else the TDP estimate: GPUs `cfg.watts_per_device` (or the board TDP) x devices x wall
    time, CPUs `cfg.watts_per_device` (or `CPU_WATTS_PER_THREAD`) per busy thread x CPU time."""
    cfg.validate()
    if cfg.source in ("auto", "nvml") and gpu_indices:
        try:
            return NvmlSource(gpu_indices)
        except Exception:  # not installed, no driver, counter unsupported: fall through
            require(cfg.source != "nvml", "energy.source", "nvml", "pynvml is not importable or NVML failed here")
    if cfg.source in ("auto", "rapl") and not gpu_indices:
        zones = rapl_zones(root)
        if zones or cfg.source == "rapl":
            return RaplSource(zones)
    if gpu_indices:
        return TdpEstimate((cfg.watts_per_device or tdp_watts(device_name)) * len(gpu_indices))
    return TdpEstimate(cfg.watts_per_device or CPU_WATTS_PER_THREAD, clock=time.process_time,
                       what="process CPU time (per busy thread)")


class EnergyMeter:
    """Per-step energy records of one process's devices and their sum."""

    def __init__(self, source: EnergySource, carbon_g_per_kwh: float = 0.0):
        require(carbon_g_per_kwh >= 0, "energy.carbon_g_per_kwh", carbon_g_per_kwh, "must be >= 0")
        self.source = source
        self.carbon_g_per_kwh = carbon_g_per_kwh
        self.records: list[float] = []
        self._last: float | None = None

    def start(self) -> None:
        self.records.clear()
        self._last = self.source.read_j()

    def step(self) -> float:
        """Joules since `start()` or the previous `step()`; recorded."""
        require(self._last is not None, "EnergyMeter", "step()", "call start() first")
        now = self.source.read_j()
        joules = now - self._last  # type: ignore[operator]
        self._last = now
        self.records.append(joules)
        return joules

    def total(self) -> float:
        """The run's joules: the sum of the per-step records."""
        return math.fsum(self.records)

    def summary(self) -> dict[str, float | str | bool]:
        j = self.total()
        kwh = j / 3.6e6
        return {"energy_j": j, "energy_kwh": kwh, "co2e_kg": kwh * self.carbon_g_per_kwh / 1000.0,
                "energy_steps": len(self.records), "energy_source": self.source.name,
                "energy_measured": self.source.measured}


@dataclass(frozen=True)
class EnergyEstimate:
    joules: float
    kwh: float
    co2e_kg: float


def preflight_estimate(step_s: float, steps: int, watts_per_device: float, devices: int = 1,
                       carbon_g_per_kwh: float = 0.0) -> EnergyEstimate:
    """Before a run: predicted step time x steps x devices x power, and its carbon."""
    for key, v in (("step_s", step_s), ("steps", steps), ("watts_per_device", watts_per_device),
                   ("devices", devices)):
        require(v > 0, key, v, "must be > 0")
    j = step_s * steps * watts_per_device * devices
    kwh = j / 3.6e6
    return EnergyEstimate(j, kwh, kwh * carbon_g_per_kwh / 1000.0)

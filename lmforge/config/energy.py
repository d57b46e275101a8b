"""Energy and carbon of a run (lmforge.observability.energy): where the joules come from and the grid's
carbon intensity.

`source`: "auto" reads NVML energy counters on GPUs (pynvml importable), RAPL counters under
/sys/class/powercap on CPUs (when readable), and otherwise estimates watts x time from
`watts_per_device` (or the device's TDP), stated as an estimate in the logs. `carbon_g_per_kwh`:
grams CO2e per kWh of the grid the run draws from (default 480: the world average of 2023,
Ember's Global Electricity Review 2024); set the local figure for a real report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.config.checks import require

ENERGY_SOURCES = ("auto", "nvml", "rapl", "tdp")


@dataclass
class EnergyConfig:
    enabled: bool = False
    source: Literal[ENERGY_SOURCES] = "auto"
    # for the "tdp" estimate: W per GPU (None: its board TDP), or on CPUs W per busy thread (None: 5)
    watts_per_device: float | None = None
    carbon_g_per_kwh: float = 480.0

    def validate(self) -> None:
        require(self.source in ENERGY_SOURCES, "energy.source", self.source, f"must be one of {list(ENERGY_SOURCES)}")
        require(self.watts_per_device is None or self.watts_per_device > 0, "energy.watts_per_device",
                self.watts_per_device, "must be > 0 (or left out: the device's TDP)")
        require(self.carbon_g_per_kwh >= 0, "energy.carbon_g_per_kwh", self.carbon_g_per_kwh, "must be >= 0")

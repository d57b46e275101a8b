"""The run's energy in the metrics ([energy] enabled = true): every rank meters its own devices
(observability/energy.py), the joules of all ranks are summed at log steps (`energy_j`, one
all-reduce, only with energy on) and once at the end (an "energy" summary row: joules, kWh,
kg CO2e, source, measured or estimated). RAPL counts a whole CPU package, so on CPUs only local
rank 0 of a node reads it (the other ranks' processes draw from the same package)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from lmforge.config import JobConfig
from lmforge.observability.energy import EnergyMeter, open_source, rapl_zones


class RunEnergy:
    def __init__(self, cfg: JobConfig, local_rank: int, device: torch.device) -> None:
        # NVML numbers every GPU of the machine and ignores CUDA_VISIBLE_DEVICES: torch's own mapping
        # turns this process's cuda:i into the NVML index of the same GPU
        gpus = [torch.cuda._get_nvml_device_index(device.index or 0)] if device.type == "cuda" else []
        name = torch.cuda.get_device_name(device) if gpus else None
        source = open_source(cfg.energy, gpu_indices=gpus, device_name=name,
                             cpu_threads=torch.get_num_threads())
        self.shares_package = not gpus and source.measured and bool(rapl_zones())
        self.counts = local_rank == 0 or not self.shares_package
        self.meter = EnergyMeter(source, cfg.energy.carbon_g_per_kwh)
        self.device = device
        self._logged = 0  # records already summed into a window

    def start(self) -> None:
        self.meter.start()
        self._logged = 0

    def step(self) -> None:
        self.meter.step()

    def _all_ranks(self, joules: float) -> float:
        value = torch.tensor([joules if self.counts else 0.0], dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(value)
        return float(value)

    def window_metrics(self) -> dict[str, float]:
        """`energy_j`: all ranks' joules of the steps since the last call (a collective)."""
        records = self.meter.records[self._logged:]
        self._logged = len(self.meter.records)
        return {"energy_j": self._all_ranks(math.fsum(records))}

    def summary(self) -> tuple[dict[str, float], str]:
        """The run's total over all ranks (a collective: the sum of its step records) as metrics,
        and one line that says whether it was measured or estimated and how."""
        joules = self._all_ranks(self.meter.total())
        kwh = joules / 3.6e6
        co2 = kwh * self.meter.carbon_g_per_kwh / 1000.0
        source = self.meter.source
        how = f"measured ({source.name})" if source.measured else f"estimated ({source.name})"
        line = (f"energy: {joules / 1e3:,.2f} kJ = {kwh:.3g} kWh, {co2:.3g} kg CO2e at "
                f"{self.meter.carbon_g_per_kwh:g} g/kWh; {how}")
        return {"energy_j": joules, "energy_kwh": kwh, "co2e_kg": co2, "energy_steps": len(self.meter.records),
                "energy_measured": int(source.measured)}, line

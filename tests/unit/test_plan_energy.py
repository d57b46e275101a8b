"""Energy readers, the per-step meter (the run's sum is the sum of its steps) and the pre-flight
estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config.energy import EnergyConfig
from lmforge.config.loader import ConfigError
from lmforge.observability.energy import (
    CPU_WATTS_PER_THREAD,
    EnergyMeter,
    RaplSource,
    TdpEstimate,
    open_source,
    preflight_estimate,
    rapl_zones,
    tdp_watts,
)


def _zone(root: Path, name: str, uj: int, max_uj: int = 1000) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "energy_uj").write_text(f"{uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def test_rapl_reads_packages_and_unwraps(tmp_path: Path) -> None:
    a = _zone(tmp_path, "intel-rapl:0", 900)
    _zone(tmp_path, "intel-rapl:0:0", 5)  # a sub-zone (core): inside the package's count
    b = _zone(tmp_path, "intel-rapl:1", 100)
    assert rapl_zones(tmp_path) == [a, b]
    src = RaplSource(rapl_zones(tmp_path))
    assert src.read_j() == 0.0
    (a / "energy_uj").write_text("50\n")  # wrapped: 900 -> 1000 -> 0 -> 50 = 151 uJ
    (b / "energy_uj").write_text("400\n")
    assert src.read_j() == pytest.approx(451e-6)


def test_open_source_falls_back_to_a_stated_estimate(tmp_path: Path) -> None:
    src = open_source(EnergyConfig(), root=tmp_path)  # no RAPL zone there: W per busy thread x CPU time
    assert isinstance(src, TdpEstimate) and not src.measured and "estimate" in src.name
    assert src.watts == CPU_WATTS_PER_THREAD and "CPU time" in src.name
    before = src.read_j()
    sum(i * i for i in range(300_000))  # burn some CPU: the estimate grows with this process's CPU time
    assert src.read_j() > before
    gpu = open_source(EnergyConfig(source="tdp"), gpu_indices=[0, 1], device_name="NVIDIA H100 80GB HBM3")
    assert gpu.watts == 1400 and "wall time" in gpu.name
    assert tdp_watts(None, cpu_threads=2) == 2 * CPU_WATTS_PER_THREAD
    _zone(tmp_path, "intel-rapl:0", 1)
    assert isinstance(open_source(EnergyConfig(), root=tmp_path), RaplSource)
    assert open_source(EnergyConfig(source="tdp", watts_per_device=50), root=tmp_path).watts == 50
    with pytest.raises(ConfigError, match="RAPL"):
        open_source(EnergyConfig(source="rapl"), root=tmp_path / "none")
    assert tdp_watts("NVIDIA H100 80GB HBM3") == 700 and tdp_watts("NVIDIA A100-SXM4-80GB") == 400


class _Counter:
    name, measured = "fake", True

    def __init__(self, increments: list[float]):
        self.value, self.increments = 1234.5, iter(increments)

    def read_j(self) -> float:
        self.value += next(self.increments)
        return self.value


def test_run_total_equals_the_sum_of_step_records() -> None:
    steps = [0.1, 3.7, 1e-3, 250.0, 0.0, 12.25]
    meter = EnergyMeter(_Counter([0.0, *steps]), carbon_g_per_kwh=400.0)
    meter.start()
    got = [meter.step() for _ in steps]
    assert got == pytest.approx(steps)
    assert meter.total() == sum(meter.records)
    assert meter.total() == pytest.approx(sum(steps))
    s = meter.summary()
    assert s["energy_kwh"] == pytest.approx(sum(steps) / 3.6e6)
    assert s["co2e_kg"] == pytest.approx(sum(steps) / 3.6e6 * 0.4)
    assert s["energy_steps"] == len(steps)


def test_tdp_estimate_meter_and_preflight_agree_on_the_same_time() -> None:
    now = [100.0]
    meter = EnergyMeter(TdpEstimate(40.0, clock=lambda: now[0]))
    meter.start()
    for _ in range(30):
        now[0] += 0.5
        meter.step()
    assert meter.total() == pytest.approx(40.0 * 15.0)
    est = preflight_estimate(0.5, 30, 40.0, carbon_g_per_kwh=480.0)
    assert est.joules == pytest.approx(meter.total())
    assert est.co2e_kg == pytest.approx(600 / 3.6e6 * 0.48)
    with pytest.raises(ConfigError, match="steps"):
        preflight_estimate(0.5, 0, 40.0)
    fresh = EnergyMeter(TdpEstimate(1.0))
    with pytest.raises(ConfigError, match="start"):
        fresh.step()


def test_nvml_counters_summed_over_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynvml is not installed here: a stand-in module with NVML's three calls (mJ counters)."""
    import sys
    import types

    counters = {0: 5_000, 1: 7_000}
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetTotalEnergyConsumption = lambda h: counters[h]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    src = open_source(EnergyConfig(), gpu_indices=[0, 1])
    assert src.measured and src.name == "NVML (2 GPU(s))"
    meter = EnergyMeter(src)
    meter.start()
    counters[0] += 1500
    counters[1] += 2500
    assert meter.step() == pytest.approx(4.0)  # (1500 + 2500) mJ
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails: the stated estimate, or an error if asked
    assert isinstance(open_source(EnergyConfig(), gpu_indices=[0], device_name="NVIDIA H200"), TdpEstimate)
    with pytest.raises(ConfigError, match="pynvml"):
        open_source(EnergyConfig(source="nvml"), gpu_indices=[0])


def test_run_meters_the_gpu_it_trains_on_when_cuda_visible_devices_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML ignores CUDA_VISIBLE_DEVICES: with GPUs 2 and 3 visible, the run on cuda:1 meters NVML's
    GPU 3, not NVML's GPU 1 (someone else's)."""
    import sys
    import types

    import torch

    from lmforge.config import JobConfig
    from lmforge.train.energy_log import RunEnergy

    handles: list[int] = []
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetHandleByIndex = lambda i: handles.append(i) or i
    fake.nvmlDeviceGetTotalEnergyConsumption = lambda h: 1000 * h
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    run = RunEnergy(JobConfig(), local_rank=1, device=torch.device("cuda", 1))
    assert handles == [3] and run.meter.source.measured

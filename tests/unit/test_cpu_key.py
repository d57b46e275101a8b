"""The name under which measured figures are cached must tell CPU generations apart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.observability import peak
from lmforge.tensors import cpu_features
from lmforge.tensors.cpu_features import cpu_generation, cpu_key

# What KVM guests showed for two generations sold under one name (first CPU's block, trimmed).
ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu sse2 avx fma avx2 bmi2

processor\t: 1
cpu family\t: 99
"""
ZEN4 = ZEN3.replace("model\t\t: 1\n", "model\t\t: 17\n").replace("avx2 bmi2", "avx2 bmi2 avx512f avx512_bf16")


def test_same_model_name_different_generation_gives_different_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in cpu_features.ISA_CAP_VARS:
        monkeypatch.delenv(var, raising=False)
    assert cpu_generation(ZEN3) == "family 25, model 1, stepping 1, avx2+fma"  # the second CPU is not read
    assert cpu_key(ZEN3) == "AMD EPYC (family 25, model 1, stepping 1, avx2+fma)"
    assert cpu_key(ZEN4) == "AMD EPYC (family 25, model 17, stepping 1, avx2+fma+avx512f+avx512_bf16)"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert cpu_key(ZEN4).endswith("avx512_bf16) [ATEN_CPU_CAPABILITY=avx2]")


def test_no_cpuinfo_still_names_the_machine() -> None:
    assert cpu_generation("") == ""
    assert cpu_key("") and "(" not in cpu_key("").split("[")[0]


def test_a_peak_measured_on_one_generation_is_not_used_on_another(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A home directory shared by nodes of two generations (a cluster's NFS home, a VM moved to
    another host): each must measure its own peak, or MFU reads against the other's."""
    cache = tmp_path / "peak.json"
    measured = iter([100e9, 200e9])
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda dev, dt, n, s: (next(measured), n))
    monkeypatch.setattr(cpu_features, "read_cpuinfo", lambda: ZEN3)
    assert peak.measure_cpu_peak_flops(torch.float32, n=64, seconds=0.1, cache_path=cache) == 100e9
    monkeypatch.setattr(cpu_features, "read_cpuinfo", lambda: ZEN4)
    assert peak.measure_cpu_peak_flops(torch.float32, n=64, seconds=0.1, cache_path=cache) == 200e9
    monkeypatch.setattr(cpu_features, "read_cpuinfo", lambda: ZEN3)
    assert peak.measure_cpu_peak_flops(torch.float32, n=64, seconds=0.1, cache_path=cache) == 100e9

"""Peak FLOP/s: the GPU table, the CPU matmul benchmark and its cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from lmforge.observability import peak
from lmforge.observability.errors import ObservabilityError
from lmforge.observability.peak import (
    default_cache_path,
    dtype_key,
    known_gpu_peak_flops,
    measure_cpu_peak_flops,
    resolve_peak_flops,
    run_peak_benchmark,
)
from lmforge.tensors.cpu_features import cpu_model_name


@pytest.mark.parametrize("name,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),  # SXM
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H100 NVL", "bf16", 835.5e12),
    ("NVIDIA H200", torch.float16, 989.4e12),
    ("NVIDIA GH200 480GB", "bf16", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5e12),
    ("NVIDIA A10G", "bf16", 70e12),  # not the A10's 125: "A10" must not match A10G or A100
    ("NVIDIA A10", "bf16", 125e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA L40S", "bf16", 362.05e12),
    ("NVIDIA L40", "bf16", 181.05e12),
    ("Tesla V100-SXM2-16GB", torch.float16, 125e12),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, None),  # no bf16 tensor cores
    ("Tesla T4", "fp16", 65e12),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2e12),
    ("Some Future Accelerator", "bf16", None),
])
def test_known_gpu_table(name: str, dtype: torch.dtype | str, expected: float | None) -> None:
    assert known_gpu_peak_flops(name, dtype) == expected


def test_float32_means_tf32_when_allowed() -> None:
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert known_gpu_peak_flops("NVIDIA A100-SXM4-40GB", torch.float32) == 156e12
        torch.set_float32_matmul_precision("highest")
        assert known_gpu_peak_flops("NVIDIA A100-SXM4-40GB", torch.float32) == 19.5e12
    finally:
        torch.set_float32_matmul_precision(previous)


def test_dtype_names() -> None:
    assert dtype_key(torch.bfloat16) == dtype_key("bfloat16") == dtype_key("BF16") == "bf16"
    assert dtype_key("half") == "fp16" and dtype_key(torch.float32) == "fp32"
    with pytest.raises(ObservabilityError, match="unknown dtype 'int8'.*allowed: bf16"):
        dtype_key("int8")


@pytest.fixture
def one_thread() -> object:
    """Two threads on a busy 2-core machine wait for each other (a 128^3 matmul then takes ~100 ms
    whatever the CPU): measure the arithmetic on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_measurement_is_plausible_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 one_thread: None) -> None:
    cache = tmp_path / "sub" / "peak.json"
    flops = measure_cpu_peak_flops(torch.float32, n=128, seconds=0.2, cache_path=cache)
    assert 2e9 < flops < MAX_GHZ * 1e9 * _fp32_flops_per_cycle()  # one core (see the band test below)
    data = json.loads(cache.read_text())
    (key, entry), = data.items()
    assert f"threads={torch.get_num_threads()}" in key and f"torch={torch.__version__}" in key
    assert "dtype=fp32" in key and "n=128" in key and cpu_model_name() in key
    assert entry["flops"] == flops and entry["n_used"] == 128
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]

    def no_measuring(*a: object, **k: object) -> tuple[float, int]:
        raise AssertionError("should have used the cache")

    monkeypatch.setattr(peak, "measure_matmul_flops", no_measuring)
    assert measure_cpu_peak_flops(torch.float32, n=128, seconds=0.2, cache_path=cache) == flops
    # A different n (or dtype) is a different key; force re-measures and overwrites.
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda dev, dt, n, s: (123.0, n))
    assert measure_cpu_peak_flops(torch.float32, n=256, seconds=0.2, cache_path=cache) == 123.0
    assert measure_cpu_peak_flops(torch.float32, n=128, seconds=0.2, cache_path=cache, force=True) == 123.0
    assert len(json.loads(cache.read_text())) == 2
    # A cap on the instruction sets (e.g. AVX2 paths forced on an AVX-512 CPU) is another machine's
    # peak. (Only the key is read here: oneDNN and MKL read their caps once, when first used.)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "SSE41")
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda dev, dt, n, s: (77.0, n))
    assert measure_cpu_peak_flops(torch.float32, n=128, seconds=0.2, cache_path=cache) == 77.0
    assert sum("DNNL_MAX_CPU_ISA=SSE41" in k for k in json.loads(cache.read_text())) == 1


@pytest.mark.timed
def test_n_shrinks_to_fit_the_time_budget() -> None:
    # One fp32 4096^3 matmul is 137 GFLOP: no CPU does it in the 12.5 ms a 0.05 s budget allows
    # per matmul, so n must shrink (this is what keeps emulated fp16 on CPU from taking minutes).
    t0 = time.perf_counter()
    flops, n_used = peak.measure_matmul_flops("cpu", "fp32", n=4096, seconds=0.05)
    assert flops > 0 and 128 <= n_used < 4096
    assert time.perf_counter() - t0 < 5.0


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "peak.json"
    cache.write_text("{not json")
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda dev, dt, n, s: (5e9, n))
    assert measure_cpu_peak_flops("bf16", n=64, seconds=0.1, cache_path=cache) == 5e9
    assert list(json.loads(cache.read_text()).values())[0]["flops"] == 5e9


def test_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_path() == tmp_path / "c" / "peak_flops.json"
    monkeypatch.delenv("LMFORGE_CACHE_DIR")
    assert default_cache_path() == Path.home() / ".cache" / "lmforge" / "peak_flops.json"


def test_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "peak.json"
    assert resolve_peak_flops("cpu", torch.bfloat16, override=2.5e12, cache_path=cache) == 2.5e12
    with pytest.raises(ObservabilityError, match="must be > 0"):
        resolve_peak_flops("cpu", torch.bfloat16, override=0.0, cache_path=cache)
    with pytest.raises(ObservabilityError, match="set metrics.peak_flops"):
        resolve_peak_flops("cpu", torch.bfloat16, measure_if_missing=False, cache_path=cache)
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda dev, dt, n, s: (7e10, n))
    assert resolve_peak_flops("cpu", torch.bfloat16, cache_path=cache) == 7e10
    # Now cached: no measuring needed.
    assert resolve_peak_flops("cpu", torch.bfloat16, measure_if_missing=False, cache_path=cache) == 7e10


def test_run_peak_benchmark(tmp_path: Path) -> None:
    with pytest.raises(ObservabilityError, match="unknown dtype"):
        run_peak_benchmark(["bf16", "fp64"], n=64, seconds=0.05, cache_path=tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()  # validated before measuring anything
    out = run_peak_benchmark(["bf16", "fp32"], n=64, seconds=0.1, cache_path=tmp_path / "p.json")
    keys = [k for k in out if k.startswith("cpu ")]
    assert len(keys) == 2 and "bf16" in keys[0] and "fp32" in keys[1]
    assert all(v > 0 for v in out.values())


def _fp32_flops_per_cycle() -> int:
    """Upper bound of fp32 FLOPs per cycle per core for torch's dispatch level: two FMA ports x
    lanes x 2 (AVX2: 8 lanes -> 32; AVX512: 16 lanes -> 64; anything else bounded by AVX512's)."""
    return 32 if torch.backends.cpu.get_cpu_capability() == "AVX2" else 64


MAX_GHZ = 6.0  # no server or desktop core sustains more


def test_measured_peaks_fit_the_dtype_and_the_threads() -> None:
    """Figures a real CPU can produce: fp32 on one thread between 5 GFLOP/s (any core with AVX2
    does ~30+) and one core's FMA limit, on all threads below threads x that limit; bf16 far
    below fp32 without native bf16 (converted element by element), near or above it with it."""
    from lmforge.train.precision import cpu_native_feature, detect_hardware

    threads = torch.get_num_threads()
    per_core_max = MAX_GHZ * 1e9 * _fp32_flops_per_cycle()
    all_threads, _ = peak.measure_matmul_flops("cpu", "fp32", n=256, seconds=0.2, batch_seconds=0.001)
    assert all_threads < threads * per_core_max
    torch.set_num_threads(1)  # best-of-many 1 ms batches on one thread: robust on a busy machine
    try:
        fp32, _ = peak.measure_matmul_flops("cpu", "fp32", n=128, seconds=0.2, batch_seconds=0.001)
        bf16, _ = peak.measure_matmul_flops("cpu", "bf16", n=128, seconds=0.2, batch_seconds=0.001)
    finally:
        torch.set_num_threads(threads)
    assert 5e9 < fp32 < per_core_max
    hw = detect_hardware("cpu")  # the CPU's flags and any ONEDNN_MAX_CPU_ISA cap, as `auto` reads them
    if cpu_native_feature("bf16", hw.cpu_flags, hw.onednn_isa_cap):
        assert bf16 > 0.5 * fp32  # AMX / AVX512_BF16
    else:  # converted in software: ~30x below on a Zen 3 (AVX2), 3-5x on an Ice Lake Xeon (AVX512F)
        assert bf16 < fp32 / 2


def test_bench_peak_label_names_the_size_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow dtype shrinks n to fit the time budget: the printed label must say the n measured,
    also when the figure comes from the cache."""
    cache = tmp_path / "peak.json"
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda dev, dt, n, s: (5e9, 256))
    for _ in range(2):  # measured, then cached
        (label,) = run_peak_benchmark(dtypes=["bf16"], n=2048, seconds=0.1, cache_path=cache)
        assert "n=256," in label and "n=2048" not in label

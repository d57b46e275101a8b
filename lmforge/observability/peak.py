"""Peak FLOP/s per device, the denominator of MFU.

GPUs: a table of datasheet peaks, dense (no 2:4 sparsity), at boost clock, matmul on tensor
cores with fp32 accumulation (what PyTorch uses). CPUs have no meaningful datasheet figure, so
the peak is measured: the best rate of large square matmuls on the threads this process uses,
cached on disk so a run pays for it once per machine, thread count, torch version and dtype.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lmforge.observability.errors import ObservabilityError
from lmforge.storage.atomic import write_text_atomic
from lmforge.tensors.cpu_features import cpu_key
from lmforge.tensors.dtypes import DTYPES, short_name

log = logging.getLogger(__name__)

CACHE_ENV = "LMFORGE_CACHE_DIR"
CACHE_FILE = "peak_flops.json"

# name (regex, searched case-insensitively in torch.cuda.get_device_name()) -> dense peak FLOP/s.
# Order matters where one name contains another: the first match wins.
# "tf32" is fp32 matmul on tensor cores (allow_tf32 / matmul precision "high"); "fp32" is without.
_GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"\bB200\b", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12}),
    (r"\bGH200\b", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"\bH200\b.*\bNVL\b", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"\bH200\b", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    (r"\bH100\b.*\bNVL\b", {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12}),
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    (r"\bH100\b", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12}),  # SXM
    (r"\bA100\b", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    # AWS's A10 variant has half the A10's tensor rate (measured bf16 matmuls reach ~69 TFLOP/s).
    (r"\bA10G\b", {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    (r"\bA40\b", {"bf16": 149.7e12, "fp16": 149.7e12, "tf32": 74.8e12, "fp32": 37.4e12}),
    (r"\bL40S\b", {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"\bL40\b", {"bf16": 181.05e12, "fp16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    # Volta and Turing have no bf16 tensor cores.
    (r"\bV100\b.*\bPCIE\b", {"fp16": 112e12, "fp32": 14e12}),
    (r"\bV100\b", {"fp16": 125e12, "fp32": 15.7e12}),
    (r"\bT4\b", {"fp16": 65e12, "fp32": 8.1e12}),
    # GeForce cards run fp16/bf16 with fp32 accumulation at half their fp16-accumulate rate.
    (r"\bRTX 5090\b", {"bf16": 209.5e12, "fp16": 209.5e12, "tf32": 104.8e12, "fp32": 104.8e12}),
    (r"\bRTX 4090\b", {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    (r"\bRTX 3090\b", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    (r"\bRTX 6000 Ada\b", {"bf16": 364.25e12, "fp16": 364.25e12, "tf32": 182.1e12, "fp32": 91.1e12}),
    (r"\bRTX A6000\b", {"bf16": 154.8e12, "fp16": 154.8e12, "tf32": 77.4e12, "fp32": 38.7e12}),
    # AMD Instinct (ROCm builds report these through torch.cuda).
    (r"\bMI3(00X|25X)\b", {"bf16": 1307.4e12, "fp16": 1307.4e12, "tf32": 653.7e12, "fp32": 163.4e12}),
    (r"\bMI250X\b", {"bf16": 383e12, "fp16": 383e12, "fp32": 95.7e12}),
]

_TORCH_DTYPES = {**DTYPES, "tf32": torch.float32}  # tf32: fp32 tensors on tf32 tensor cores


def dtype_key(dtype: torch.dtype | str) -> str:
    """'bf16' | 'fp16' | 'fp32' | 'tf32' for a torch dtype or a name ('bfloat16', 'half', ...)."""
    key = "tf32" if str(dtype).strip().lower() == "tf32" else short_name(dtype)
    if key is None:
        raise ObservabilityError(f"unknown dtype {dtype!r} for peak FLOP/s; allowed: bf16, fp16, fp32, tf32")
    return key


def _gpu_dtype_key(dtype: torch.dtype | str) -> str:
    """As dtype_key, but torch.float32 on a GPU runs on tf32 tensor cores unless PyTorch's
    float32 matmul precision is "highest" (the name "fp32" always means plain fp32)."""
    key = dtype_key(dtype)
    if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
        key = "tf32"
    return key


def known_gpu_peak_flops(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Datasheet dense peak FLOP/s of one GPU for `dtype`, or None if the GPU/dtype is not known.

    `device_name` is torch.cuda.get_device_name(). torch.float32 means tf32 tensor cores when
    PyTorch is allowed to use them (torch.get_float32_matmul_precision() != "highest").
    """
    key = _gpu_dtype_key(dtype)
    for pattern, peaks in _GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peaks.get(key)
    return None


# -- measurement ---------------------------------------------------------------------------------


@contextmanager
def on_threads(threads: int) -> Iterator[None]:
    """torch on `threads` intra-op threads inside the block, as before it after (measurements
    that must not depend on, or change, the caller's thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device | str, dtype: torch.dtype | str = torch.bfloat16, n: int = 2048,
                         seconds: float = 2.0, batch_seconds: float = 0.01) -> tuple[float, int]:
    """Best observed FLOP/s of n x n x n matmuls (2 n^3 FLOPs each) on `device`; no cache.

    Warms up, then times batches of matmuls for about `seconds` and keeps the fastest batch
    (best-of rejects interference from other processes). If one matmul at `n` would take longer
    than a quarter of the budget (fp16 on most CPUs is emulated and ~1000x slower), `n` is
    halved until it fits. Each timed batch lasts about `batch_seconds`: shorter batches let the
    best one fall between other processes' time slices on a busy machine. Returns (flops_per_s,
    n actually used).
    """
    device = torch.device(device)
    key = dtype_key(dtype)
    tdtype = _TORCH_DTYPES[key]
    if n < 16 or seconds <= 0:
        raise ObservabilityError(f"matmul benchmark needs n >= 16 and seconds > 0, got n={n}, seconds={seconds}")

    # fp32 vs tf32 is a process-wide switch in PyTorch: set it for the benchmark, then restore.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if key == "tf32" else "highest")
    try:
        return _measure(device, tdtype, n, seconds, batch_seconds)
    finally:
        torch.set_float32_matmul_precision(previous)


def _measure(device: torch.device, tdtype: torch.dtype, n: int, seconds: float,
             batch_seconds: float = 0.01) -> tuple[float, int]:
    def one(size: int) -> float:
        a = torch.randn(size, size, device=device).to(tdtype)
        b = torch.randn(size, size, device=device).to(tdtype)
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        return time.perf_counter() - t0

    # Probe small, then shrink n until one matmul fits a quarter of the budget (n^3 scaling).
    probe = min(n, 128)
    one(probe)
    t_probe = max(one(probe), 1e-7)
    while n > probe and t_probe * (n / probe) ** 3 > seconds / 4:
        n //= 2
    a = torch.randn(n, n, device=device).to(tdtype)
    b = torch.randn(n, n, device=device).to(tdtype)
    c = torch.empty(n, n, device=device, dtype=tdtype)
    _sync(device)
    t0 = time.perf_counter()
    torch.mm(a, b, out=c)  # warm-up: allocator, kernel selection, thread pool
    _sync(device)
    first = time.perf_counter() - t0
    # Enough matmuls per timed batch that timer and launch overheads vanish (>= ~batch_seconds).
    reps = max(1, int(batch_seconds / max(first, 1e-7)))
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
        if time.perf_counter() >= deadline:
            break
    return 2.0 * n**3 / best, n


def cpu_label() -> str:
    """This CPU as the peak cache names it (tensors/cpu_features.py: cpu_key, caps included)."""
    return f"cpu={cpu_key()}"


def default_cache_path() -> Path:
    """$LMFORGE_CACHE_DIR/peak_flops.json, else ~/.cache/lmforge/peak_flops.json."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() / CACHE_FILE if root else Path.home() / ".cache" / "lmforge" / CACHE_FILE


def _cache_key(device_label: str, dtype: str, n: int, threads: int | None) -> str:
    parts = [device_label]
    if threads is not None:
        parts.append(f"threads={threads}")
    parts += [f"torch={torch.__version__}", f"dtype={dtype}", f"n={n}"]
    return " | ".join(parts)


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable peak FLOP/s cache %s (%s); it will be rewritten", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, data: dict) -> None:
    """Atomic (storage/atomic.py). A cache that cannot be written (read-only home) only costs a
    re-measurement next time, so it warns instead of failing."""
    try:
        write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        log.warning("could not write peak FLOP/s cache %s: %s", path, e)


def _cached_measure(device: torch.device, label: str, threads: int | None, dtype: torch.dtype | str, n: int,
                    seconds: float, cache_path: Path | None, force: bool, measure: bool = True) -> float | None:
    key_dtype = dtype_key(dtype)
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    key = _cache_key(label, key_dtype, n, threads)
    cache = _read_cache(path)
    entry = cache.get(key)
    if not force and isinstance(entry, dict) and isinstance(entry.get("flops"), int | float) and entry["flops"] > 0:
        return float(entry["flops"])
    if not measure:
        return None
    flops, n_used = measure_matmul_flops(device, key_dtype, n, seconds)
    cache = _read_cache(path)  # re-read: another process may have added entries meanwhile
    cache[key] = {"flops": flops, "n_used": n_used, "seconds": seconds,
                  "measured_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    _write_cache(path, cache)
    return flops


def measure_cpu_peak_flops(dtype: torch.dtype | str = torch.bfloat16, n: int = 2048, seconds: float = 2.0,
                           cache_path: Path | None = None, force: bool = False) -> float:
    """Measured peak matmul FLOP/s of this CPU on torch.get_num_threads() threads, cached.

    The cache key is (CPU model, generation and instruction-set caps, thread count, torch version, dtype, n):
    change any and it is measured again. `force` re-measures and overwrites the cached figure.
    """
    flops = _cached_measure(torch.device("cpu"), cpu_label(), torch.get_num_threads(), dtype, n,
                            seconds, cache_path, force)
    assert flops is not None
    return flops


def resolve_peak_flops(device: torch.device | str, dtype: torch.dtype | str, override: float | None = None,
                       measure_if_missing: bool = True, cache_path: Path | None = None) -> float:
    """Peak FLOP/s of one device for MFU: the override if given (metrics.peak_flops), else the
    datasheet figure of a known GPU, else a measured (cached) matmul peak."""
    if override is not None:
        if not override > 0:
            raise ObservabilityError(f"peak FLOP/s override must be > 0, got {override}")
        return float(override)
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = known_gpu_peak_flops(name, dtype)
        if known is not None:
            return known
        label, threads = f"gpu={name}", None
        dtype = _gpu_dtype_key(dtype)
    elif device.type == "cpu":
        label, threads = cpu_label(), torch.get_num_threads()
    else:
        label, threads = f"{device.type}={platform.machine()}", None
    flops = _cached_measure(device, label, threads, dtype, 2048, 2.0, cache_path, force=False,
                            measure=measure_if_missing)
    if flops is None:
        raise ObservabilityError(f"no known or cached peak FLOP/s for {label} ({dtype_key(dtype)}); "
                                 "set metrics.peak_flops or run `lmforge bench peak`")
    return flops


def _measured_size(label: str, dtype: torch.dtype | str, n: int, threads: int | None,
                   cache_path: Path | None) -> int:
    """The matrix size a cached figure was measured at (smaller than asked when one matmul at `n`
    did not fit the time budget), so what is printed is what was measured."""
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    entry = _read_cache(path).get(_cache_key(label, dtype_key(dtype), n, threads))
    used = entry.get("n_used") if isinstance(entry, dict) else None
    return int(used) if isinstance(used, int) and used > 0 else n


def run_peak_benchmark(dtypes: Iterable[torch.dtype | str] = ("bf16", "fp32"), n: int = 2048, force: bool = False,
                       seconds: float = 2.0, cache_path: Path | None = None) -> dict[str, float]:
    """Figures for `lmforge bench peak`: the measured CPU peak per dtype and, with a GPU, its
    measured and datasheet peaks. Keys are labels for display; values FLOP/s. Prints nothing."""
    keys = [dtype_key(d) for d in dtypes]  # validate them all before measuring anything
    if "tf32" in keys and not torch.cuda.is_available():  # measuring nothing would read as a result
        raise ObservabilityError("--dtypes tf32: a tensor-core mode of GPUs, and this machine has none; without a "
                                 "GPU: bf16, fp16, fp32 (a CPU's fp32 matmul is plain fp32)")
    results: dict[str, float] = {}
    threads = torch.get_num_threads()
    for key in keys:
        if key == "tf32":
            continue  # the GPU's mode (measured below); on CPU it is plain fp32
        flops = measure_cpu_peak_flops(key, n, seconds, cache_path, force)
        used = _measured_size(cpu_label(), key, n, threads, cache_path)
        results[f"cpu {key} measured (n={used}, {threads} threads)"] = flops
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
        name = torch.cuda.get_device_name(dev)
        for key in keys:
            flops = _cached_measure(dev, f"gpu={name}", None, key, n, seconds, cache_path, force)
            assert flops is not None
            results[f"{name} {key} measured (n={_measured_size(f'gpu={name}', key, n, None, cache_path)})"] = flops
            known = known_gpu_peak_flops(name, key)
            if known is not None:
                results[f"{name} {key} datasheet"] = known
    return results

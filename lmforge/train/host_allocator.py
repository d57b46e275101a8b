"""How the training process's C allocator treats freed memory (`train.host_allocator`).

A CPU training step allocates and frees the same large activation and gradient blocks every step.
glibc's malloc serves blocks above its mmap threshold with fresh `mmap`s and returns them to the
kernel on `free`, and it trims freed memory at the top of its heap: every step then faults its
working set back in, page by page, and the kernel zeroes each page first. On a 2-core Zen 3 that
was 22,000-37,000 page faults per step for bench/train_throughput.py's model, and the main job's
model trained 12-31% faster without them (docs/benchmarks.md). Raising both thresholds keeps freed blocks in the
process for the next step to reuse (the same thing Intel's CPU launchers get by preloading
jemalloc or tcmalloc), at the price of a resident size that stays near the run's peak.

"auto" does this for CPU training on glibc; "system" leaves malloc as the process started. Other C
libraries (musl, macOS) are left alone: the setting there reads "system" with the reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from dataclasses import dataclass

# mallopt(3) parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, and freed memory is trimmed only above it. 1 GiB: an
# int (mallopt takes one), above any single activation of the models a CPU trains, and glibc takes it.
KEEP_BELOW_BYTES = 1 << 30


@dataclass(frozen=True)
class HostAllocator:
    """What the process's allocator does now, for the run header."""

    mode: str  # "kept" (freed memory stays in the process) or "system"
    reason: str

    def __str__(self) -> str:
        return f"{self.mode} ({self.reason})"


def _glibc() -> ctypes.CDLL | None:
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return None
    path = ctypes.util.find_library("c") or "libc.so.6"
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


def keep_freed_memory() -> HostAllocator:
    """Raise glibc's mmap and trim thresholds to KEEP_BELOW_BYTES (mallopt; affects allocations
    from now on). Idempotent; returns "system" where the C library is not glibc or refuses."""
    libc = _glibc()
    if libc is None:
        return HostAllocator("system", f"C library {platform.libc_ver()[0] or 'unknown'} is not glibc: left as it is")
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, KEEP_BELOW_BYTES) and mallopt(M_TRIM_THRESHOLD, KEEP_BELOW_BYTES)):
        return HostAllocator("system", "glibc refused the mmap/trim thresholds: left as it is")
    return HostAllocator("kept", f"glibc keeps freed blocks up to {KEEP_BELOW_BYTES >> 30} GiB for reuse: "
                                 "no step faults its activations back in")


def configure_host_allocator(setting: str, device_type: str) -> HostAllocator:
    """Apply `train.host_allocator` for a process that trains on `device_type`: "auto" keeps freed
    memory when training on the CPU (where activations live in host memory), "system" never."""
    if setting == "system":
        return HostAllocator("system", "train.host_allocator = 'system'")
    if device_type != "cpu":
        return HostAllocator("system", f"activations live on {device_type}, not in host memory")
    return keep_freed_memory()

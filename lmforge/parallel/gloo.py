"""torch's gloo with one worker thread: the backend of the tensor-parallel groups of CPU runs.

torch's gloo runs each group's collectives on a pool of worker threads (2 by default, not settable
through `init_process_group`). DTensor (tensor and sequence parallelism) issues its collectives
through the functional API, which on gloo queues the next one before the last is waited for, so
two all-gathers then run side by side on those threads. With torch 2.13.0 that corrupts the heap
now and then (a SIGSEGV or glibc's "unaligned tcache chunk" in a gloo worker thread; reduced to
torch alone in scripts/gloo_funcol_check.py: 4 of 4 rounds died with 2 threads, 0 of 4 with one).

With one worker thread a group's collectives run one at a time, in the order queued: what every
rank already agrees on. They still overlap the compute of the thread that queued them. Only the
tensor-parallel mesh dimension gets it (`mesh_backend_override`): a group with one thread deadlocks
when a collective's completion callback, which runs on that thread, waits for another collective on
the same group, as torch's PowerSGD DDP hook does (measured: a data-parallel test hung until its
900 s timeout). The backend is registered with torch under `GLOO_ONE_THREAD`; it is gloo in every
other respect.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

GLOO_ONE_THREAD = "gloo_1thread"


def _create(store: dist.Store, rank: int, size: int, timeout: timedelta) -> dist.ProcessGroupGloo:
    """torch's creator signature for a backend plugin: gloo on the default device, one thread."""
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_default_device()]
    options._threads = 1
    return dist.ProcessGroupGloo(store, rank, size, options)


def register_gloo_one_thread() -> str:
    """Make `GLOO_ONE_THREAD` a backend name torch accepts (idempotent: registering again replaces
    the entry with the same function); returns the name."""
    dist.Backend.register_backend(GLOO_ONE_THREAD, _create, devices=["cpu"])
    return GLOO_ONE_THREAD


def mesh_backend_override(device_type: str, dim_names: tuple[str, ...]) -> dict[str | int, str]:
    """`init_device_mesh`'s backend_override: the "tp" dimension of a CPU mesh whose default group
    is gloo runs on `GLOO_ONE_THREAD`; nothing otherwise (NCCL has no such fault)."""
    if device_type != "cpu" or "tp" not in dim_names or dist.get_backend() != "gloo":
        return {}
    return {"tp": register_gloo_one_thread()}

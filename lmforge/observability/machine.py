"""Measurements of this machine for a calibrated cluster file (`lmforge bench cluster`): matmul
and attention-kernel rates by size, memory bandwidth, and the seconds of each gloo collective by
message size between processes on this host. Each is what the planner's time model
(lmforge/plan/timing.py) reads from a cluster file; lmforge/plan/calibration.py turns them into one.

Every figure is the lower quartile of its repeated timings (`quiet_seconds`), not their median. On a
shared host the noise only ever adds time, and it comes in stretches of seconds: the probe steps of
`lmforge bench cluster` on a 2-core VM ran 25-40% slower for whole stretches and a 4 KiB gloo
all-reduce took 3.5 ms against its neighbours' 0.2 ms (2026-12-05). A median moves with how much of a
run such a stretch covered; the lower quartile stays at what the machine does undisturbed, which is
what a cluster file describes."""

from __future__ import annotations

import os
import socket
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence

import torch

from lmforge.observability.flops import attended_pairs
from lmforge.observability.peak import on_threads

# (tokens, inner, outer) of the matmuls timed for the efficiency curve: the projection, feed-forward
# and output shapes small training runs have (2 x tokens x inner x outer FLOPs each), and n = 2048,
# the square matmul `lmforge bench peak` times.
MATMUL_SHAPES = ((128, 64, 64), (256, 64, 128), (512, 128, 128), (1024, 64, 512), (1024, 192, 192),
                 (1024, 192, 512), (1024, 256, 704), (1024, 192, 512 * 4), (2048, 512, 512),
                 (1024, 512, 8192), (2048, 2048, 2048))
# (batch, heads, seq, head_dim) of the causal attention timed for its curve: the micro probes',
# tiny models' and ~50M models' heads, and longer sequences up to 2048.
ATTENTION_SHAPES = ((8, 4, 64, 16), (8, 4, 128, 16), (8, 4, 256, 48), (4, 8, 512, 64), (1, 8, 1024, 64),
                    (1, 8, 2048, 64))
COLLECTIVE_BYTES = tuple(2**k for k in range(12, 25, 2))  # 4 KiB .. 16 MiB


def quiet_seconds(times: Sequence[float]) -> float:
    """The lower quartile of repeated timings of one thing: what it takes when the host does not
    disturb it (see the module docstring for why not the median)."""
    if not times:
        raise ValueError("quiet_seconds: no timings")
    if len(times) == 1:
        return float(times[0])
    return statistics.quantiles(times, n=4, method="inclusive")[0]


def _quiet_call_seconds(fn, seconds: float, min_reps: int = 5) -> float:
    """`quiet_seconds` of `fn()` called repeatedly for about `seconds` (at least `min_reps` times)."""
    fn()  # warm-up: first-call allocation and kernel choice
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) >= 200:
            break
    return quiet_seconds(times)


def matmul_rates(shapes: Iterable[tuple[int, int, int]] = MATMUL_SHAPES, threads: int = 1,
                 seconds: float = 0.3, dtype: torch.dtype = torch.float32) -> list[tuple[float, float]]:
    """(FLOPs of one matmul, FLOP/s achieved) for each (tokens, inner, outer) shape on `threads`
    threads (a rank of a CPU run is one process on one core)."""
    out = []
    with on_threads(threads):
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            flops = 2.0 * m * k * n
            out.append((flops, flops / _quiet_call_seconds(lambda a=a, b=b: a @ b, seconds)))
    return out


def attention_rates(shapes: Iterable[tuple[int, int, int, int]] = ATTENTION_SHAPES, threads: int = 1,
                    seconds: float = 0.3) -> list[tuple[float, float]]:
    """(W = 2 seq^2 head_dim, training FLOP/s) of causal scaled_dot_product_attention, forward and
    backward, for each (batch, heads, seq, head_dim) shape on `threads` threads. Its FLOPs are the
    planner's (the causal pairs of lmforge/observability/flops.py, backward twice the forward); the
    rate is the kernel's own, which on CPUs is a fraction of the matmul rate at the same size."""
    import torch.nn.functional as F

    out = []
    with on_threads(threads):
        for b, h, s, d in shapes:
            q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
            grad = torch.randn(b, h, s, d)

            def step(q=q, k=k, v=v, grad=grad) -> None:
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

            flops = 3 * 2 * 2.0 * b * h * attended_pairs("full", s) * d
            out.append((2.0 * s * s * d, flops / _quiet_call_seconds(step, seconds)))
    return out


def memory_bandwidth(threads: int = 1, nbytes: int = 128 * 2**20, seconds: float = 0.5) -> float:
    """Bytes/s one rank moves through memory: a copy of `nbytes` (read once, written once)."""
    with on_threads(threads):
        src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
        return 2 * nbytes / _quiet_call_seconds(lambda: dst.copy_(src), seconds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank: int, world: int, port: int, sizes: tuple[int, ...], repeats: int,
                       kinds: tuple[str, ...], out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    warnings.filterwarnings("ignore", category=FutureWarning)  # the *_into_tensor names FSDP2 still calls
    results: dict[str, list[tuple[int, float]]] = {k: [] for k in kinds}
    warm = torch.ones(1024)
    for _ in range(20):  # the first collectives of a new group run ~10x slow (measured: 4 KiB at 2-3 ms)
        dist.all_reduce(warm)
    for nbytes in sizes:
        n = max(world, nbytes // 4 // world * world)  # elements, divisible by the world size
        full, part = torch.ones(n), torch.ones(n // world)
        runs = {"all_reduce": lambda full=full: dist.all_reduce(full),
                "all_gather": lambda full=full, part=part: dist.all_gather_into_tensor(full, part),
                "reduce_scatter": lambda full=full, part=part: dist.reduce_scatter_tensor(part, full),
                "all_to_all": lambda full=full: dist.all_to_all_single(torch.empty_like(full), full)}
        for kind in kinds:
            fn = runs[kind]
            fn()
            times = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            # the slower rank's figure: a collective ends for the job when it ends on every rank
            t = torch.tensor([quiet_seconds(times)], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            results[kind].append((4 * n, float(t)))
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


def collective_times(kinds: tuple[str, ...], ranks: int = 2, sizes: tuple[int, ...] = COLLECTIVE_BYTES,
                     repeats: int = 9) -> dict[str, list[tuple[int, float]]]:
    """kind -> [(bytes, seconds)] of the gloo collectives `kinds` (any of all_reduce, all_gather:
    bytes gathered, reduce_scatter: bytes reduced, all_to_all) on `ranks` processes of this host,
    one thread each; each figure is the slower rank's lower quartile of `repeats`."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_collective_worker, args=(r, ranks, port, tuple(sizes), repeats, tuple(kinds), out))
                 for r in range(ranks)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        if any(p.exitcode != 0 for p in procs):
            for p in procs:
                p.kill()
            raise RuntimeError(f"collective measurement failed: exit codes {[p.exitcode for p in procs]}")
        return dict(out)

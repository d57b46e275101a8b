"""Does gloo survive functional collectives that are in flight together: torch's, and lmforge's?

DTensor (tensor and sequence parallelism) runs its collectives through torch's functional
collectives, which on gloo are asynchronous: the next one can be queued before the last is waited
for, and gloo's worker threads (2 per group by default) then run them side by side. With torch
2.13.0 on CPU that pattern corrupted the heap now and then when an all-gather was among them
(glibc: "malloc(): unaligned tcache chunk detected", or a SIGSEGV in a gloo worker thread), in
lmforge's tp=2 training and in this script alone: 2 gloo ranks, each iteration queues three
all-gathers (`--pattern allgather`; `mixed`: an all-reduce, a reduce-scatter and an all-gather) of
a tp=2 block's activation shapes before using any. Waiting for each before queueing the next, or
torch's classic `async_op=True` API, did not crash.

lmforge therefore runs its tensor-parallel groups on gloo with one worker thread
(lmforge.parallel.gloo). This script runs the same pattern on torch's gloo (reported: whether this
torch still has the fault, i.e. whether the workaround is still needed) and on lmforge's backend
(judged). Each round is a fresh pair of processes; the report counts the rounds whose ranks died.
Exit 1 when any round on lmforge's backend died.

    .venv/bin/python scripts/gloo_funcol_check.py [--rounds 4] [--iters 20000] [--pattern allgather|mixed]
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import socket
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp

from lmforge.parallel.gloo import GLOO_ONE_THREAD, register_gloo_one_thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(pattern: str, shard: torch.Tensor, full: torch.Tensor, group: dist.ProcessGroup
                 ) -> list[Callable[[], torch.Tensor]]:
    """One iteration's collectives: three all-gathers of a tp=2 block's sequence shard, or an
    all-reduce, a reduce-scatter and an all-gather (what a block's forward and backward issue)."""
    if pattern == "allgather":
        return [lambda k=k: funcol.all_gather_single(shard * k, 1, group) for k in (1.0, 2.0, 3.0)]
    return [lambda: funcol.all_reduce(full * 1.0, "sum", group),
            lambda: funcol.reduce_scatter_single(full * 1.0, "sum", 1, group),
            lambda: funcol.all_gather_single(shard * 1.0, 1, group)]


def _rank(rank: int, port: int, iters: int, pattern: str, backend: str) -> None:
    faulthandler.enable()  # a crash names where each thread was
    torch.set_num_threads(1)
    register_gloo_one_thread()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    shard = torch.randn(1, 64, 192, generator=torch.Generator().manual_seed(rank))
    full = torch.randn(1, 128, 192, generator=torch.Generator().manual_seed(2 + rank))
    ops = _collectives(pattern, shard, full, dist.group.WORLD)
    for _ in range(iters):
        results = [op() for op in ops]  # all queued, then used
        if not all(bool(torch.isfinite(t).all()) for t in results):  # uses (so waits for) every one
            raise RuntimeError("a collective returned a non-finite value")
    dist.barrier()
    os._exit(0)  # no interpreter teardown: gloo's can abort on its own, which is not what is checked


def crashed_rounds(rounds: int, iters: int, pattern: str, backend: str) -> int:
    died = 0
    for _ in range(rounds):
        try:
            mp.spawn(_rank, args=(free_port(), iters, pattern, backend), nprocs=2)
        except mp.ProcessExitedException as e:
            died += 1
            print(f"  a rank died: {e}", flush=True)
    return died


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--pattern", choices=["allgather", "mixed"], default="allgather")
    args = ap.parse_args()
    print(f"torch {torch.__version__}: 2 gloo ranks, {args.rounds} rounds of {args.iters} iterations each")
    died: dict[str, int] = {}
    for label, backend in (("torch's gloo (2 worker threads)", "gloo"),
                           ("lmforge's gloo (1 worker thread)", GLOO_ONE_THREAD)):
        t0 = time.monotonic()
        died[backend] = crashed_rounds(args.rounds, args.iters, args.pattern, backend)
        print(f"{label}, {args.pattern} (three queued, then used): {died[backend]} of {args.rounds} "
              f"rounds died ({time.monotonic() - t0:.0f} s)", flush=True)
    return 1 if died[GLOO_ONE_THREAD] else 0


if __name__ == "__main__":
    sys.exit(main())

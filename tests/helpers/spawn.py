"""Run a function on N gloo ranks in fresh processes and collect what each rank returns.

forkserver: torch is imported once in a clean server process and the ranks are forked from it
(no per-rank torch import: seconds saved on 2 cores; no fork of pytest's own state). One server
serves the whole pytest process (`fork_ranks` starts every rank: `run_ranks` here, `train_ranks`
in tests/helpers/cli.py): the first caller's `preload` is the one that holds. Each rank ends with
barrier, destroy_process_group and os._exit(0): a plain return aborts now and then in gloo's
teardown.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    crash_log = open(Path(out) / f"error{rank}.crash.txt", "w")  # noqa: SIM115 (open until os._exit)
    faulthandler.enable(crash_log)  # a native crash: where each thread was, for run_ranks' message
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=180))
        result = fn(rank, world, *args)
        torch.save(result, Path(out) / f"result{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (Path(out) / f"error{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def fork_ranks(entry: Callable[..., None], nprocs: int, args: tuple, preload: Sequence[str], timeout: float) -> str:
    """Run `entry(rank, *args)` in `nprocs` processes forked from the server; wait up to `timeout`
    seconds. Returns "" when every process exited 0, else why not (a rank that exits non-zero
    ends the others; at the timeout all are killed). `entry` must be a module-level function."""
    multiprocessing.set_forkserver_preload(list(preload))  # only if no caller has started the server yet
    ctx = mp.start_processes(entry, args=args, nprocs=nprocs, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=min(5.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return f"timed out after {timeout:g} s"
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
        return str(e)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return ""


def run_ranks(fn: Callable[..., Any], world: int, out: Path, args: tuple = (),
              preload: Sequence[str] = ("torch",), timeout: float = 900) -> list[Any]:
    """Call `fn(rank, world, *args)` on `world` gloo ranks (the default process group is set up);
    return the per-rank results. `fn` must be a module-level function (pickled by reference)."""
    out.mkdir(parents=True, exist_ok=True)
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # for a server started by this call; given back after
    try:
        failure = fork_ranks(_entry, world, (fn, world, free_port(), str(out), args), preload, timeout)
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before
    if failure:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error*.txt")))
        raise AssertionError(f"ranks failed: {failure}\n{errors}")
    return [torch.load(out / f"result{r}.pt", weights_only=False) for r in range(world)]

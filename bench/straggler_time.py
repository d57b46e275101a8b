"""Which per-rank time tells a slow rank apart? 2 gloo ranks train an FSDP2 MLP; rank 1 is made slow
by 100 ms per step, either sleeping or burning CPU. Prints each rank's wall time and process CPU
time per step (medians after warm-up). The baseline is the same run with no delay.

Wall time is the same on both ranks (collectives wait for the slowest), so it cannot name the slow
rank; CPU time does when the slowness is computation (gloo waits sleep, not spin), which is what
lmforge.train.stragglers uses. The check: with rank 1 burning 100 ms of CPU per step, its CPU time
over rank 0's, relative to the same ratio without delay (the named baseline), is at least
`--min-ratio` (default 1.5, the default `metrics.straggler_factor`: the slow rank is named), exit 1 below.

    .venv/bin/python bench/straggler_time.py [--min-ratio 1.5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers.spawn import run_ranks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402

TARGET = 1.5  # the default metrics.straggler_factor


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _rank(rank: int, world: int, mode: str) -> list[tuple[float, float]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(64, 256)
    out = []
    for _ in range(8):
        w0, c0 = time.perf_counter(), time.process_time()
        if rank == 1 and mode == "sleep":
            time.sleep(0.1)
        elif rank == 1 and mode == "spin":
            _spin(0.1)
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        out.append((time.perf_counter() - w0, time.process_time() - c0))
    return out[2:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-ratio", type=float, default=TARGET,
                    help=f"exit 1 if the slow rank's CPU-time ratio (vs no delay) is below this (default {TARGET:g})")
    args = ap.parse_args()
    print(f"{'rank 1 delay':<13} {'rank':>4} {'wall ms/step':>13} {'CPU ms/step':>12}")
    cpu_ratio: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("none", "sleep", "spin"):
            cpus = []
            for rank, rows in enumerate(run_ranks(_rank, 2, Path(tmp) / mode, args=(mode,))):
                wall = statistics.median(w for w, _ in rows) * 1e3
                cpu = statistics.median(c for _, c in rows) * 1e3
                cpus.append(cpu)
                print(f"{mode:<13} {rank:>4} {wall:>13.1f} {cpu:>12.1f}")
            cpu_ratio[mode] = cpus[1] / max(cpus[0], 1e-9)
    return verdict("straggler_time", "no delay (CPU rank1/rank0)", "CPU rank1/rank0 burning 100 ms / no delay",
                   cpu_ratio["spin"] / cpu_ratio["none"], args.min_ratio)


if __name__ == "__main__":
    sys.exit(main())

"""The gradient all-reduce alone on a real slow link: lmforge's hierarchical all-reduce against
gloo's flat one, 4 ranks as 2 nodes x 2, each node in its own network namespace (uplink `--rate`,
tests/helpers/slow_network.py), no model: the collective's time without training noise.

`--mb` MB of fp32 gradients in DDP-sized buckets (`--bucket-mb`), all launched at once and waited
for (as DDP's hooks are), `--reps` times after one warm-up, alternating flat and hierarchical; the
verdict is the median flat time / the median hierarchical one, target >= 1.1 (across the link a
4-rank ring carries 1.5x the bucket per node, the hierarchical scheme 1x: 1.5x at best).

    sudo PYTHONPATH=. .venv/bin/python bench/comm_collective.py [--mb 104] [--bucket-mb 26] [--reps 3] [--rate 1gbit]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
from _check import verdict  # noqa: E402

TARGET = 1.1


def worker(mb: float, bucket_mb: float, reps: int) -> None:
    """One rank under torchrun: time both schemes, rank 0 prints `flat: S` / `hierarchical: S` lines."""
    import time

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.parallel.hierarchical import HierarchicalState, hierarchical_allreduce

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    state = HierarchicalState.from_mesh(mesh, node_size=0)  # LOCAL_WORLD_SIZE
    n_buckets = max(1, round(mb / bucket_mb))
    buckets = [torch.randn(int(bucket_mb * 2**20 / 4)) for _ in range(n_buckets)]

    def flat() -> None:
        for w in [dist.all_reduce(b, async_op=True) for b in buckets]:
            w.wait()

    def hierarchical() -> None:
        for f in [hierarchical_allreduce(b, state) for b in buckets]:
            f.wait()

    for _ in range(reps + 1):  # the first round warms up
        for name, fn in (("flat", flat), ("hierarchical", hierarchical)):
            dist.barrier()
            t = time.perf_counter()
            fn()
            dist.barrier()
            if dist.get_rank() == 0:
                print(f"{name}: {time.perf_counter() - t:.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=104)
    ap.add_argument("--bucket-mb", type=float, default=26)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.mb, args.bucket_mb, args.reps)
    from tests.helpers.slow_network import slow_network

    with slow_network(2, rate=args.rate) as net:
        print(net.message, flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": net.interface, "PYTHONPATH": str(REPO)}
        cmds = [net.command(i, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
                                "--nproc-per-node", "2", "--master-addr", net.addresses[0], "--master-port", "29500",
                                __file__, "--worker", "--mb", str(args.mb), "--bucket-mb", str(args.bucket_mb),
                                "--reps", str(args.reps)]) for i in range(2)]
        procs = [subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for c in cmds]
        out = procs[0].communicate(timeout=600)[0]
        procs[1].wait(timeout=60)
    if any(p.returncode for p in procs):
        print(f"FAIL: workers exited {[p.returncode for p in procs]}", file=sys.stderr)
        return 1
    times: dict[str, list[float]] = {"flat": [], "hierarchical": []}
    for name, sec in re.findall(r"^(flat|hierarchical): ([\d.]+)$", out, flags=re.M):
        times[name].append(float(sec))
    med = {k: statistics.median(v[1:]) for k, v in times.items()}  # without the warm-up round
    print(f"{args.mb:g} MB in {max(1, round(args.mb / args.bucket_mb))} buckets, 4 ranks as 2 nodes x 2; "
          f"median of {args.reps}")
    for name, s in med.items():
        print(f"{name:<13} {s:.3f} s  {med['flat'] / s:.2f}x  ({args.mb * 8 / 1000 / s:.2f} Gbit/s of gradient)")
    if not net.slowed:
        print("no verdict: " + net.message)
        return 0
    return verdict("comm_collective_hierarchical", "flat gloo all-reduce", "flat time / hierarchical",
                   med["flat"] / med["hierarchical"], TARGET)


if __name__ == "__main__":
    sys.exit(main())

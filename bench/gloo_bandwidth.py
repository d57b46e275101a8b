"""Measured gloo all-reduce on this machine, for the CPU cluster preset of the planner
(lmforge/plan/presets/cpu.toml: intra_node bandwidth and latency).

Two ranks (gloo, one thread each; lmforge/observability/machine.py: collective_times, the slower
rank's lower quartile of 9) all-reduce fp32 tensors of growing size; the
time t(n) of a ring all-reduce of n bytes over p ranks is 2 (p - 1) (lat + n / (p bw)), so a
least-squares line through (n, t) gives the latency and the link bandwidth. Prints both and the
fit's worst relative residual. Its verdict (bench/_check.py, as every benchmark's): 1 - that residual
against the target 0.5, i.e. the fitted ring model within 50 % of every measured time; below it the
figures are too noisy to put in a preset (exit 1: rerun on a quiet machine).

    PYTHONPATH=. python bench/gloo_bandwidth.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402

SIZES = tuple(2**k for k in range(10, 25, 2))  # bytes: 1 KiB .. 16 MiB
REPEATS = 9
TARGET = 0.5  # 1 - worst relative residual of the fit


def fit(times: dict[int, float], world: int) -> tuple[float, float, float]:
    """(latency s, bandwidth bytes/s, worst relative residual) of t = 2 (p-1) (lat + n / (p bw))."""
    p = world
    xs = [n / p for n in times]
    ys = [t / (2 * (p - 1)) for t in times.values()]
    # Weighted least squares with weights 1 / y^2: relative errors count, so the small messages
    # (latency) weigh as much as the large ones (bandwidth).
    w = [1.0 / y**2 for y in ys]
    sw, sx, sy = sum(w), sum(wi * x for wi, x in zip(w, xs)), sum(wi * y for wi, y in zip(w, ys))
    sxx, sxy = sum(wi * x * x for wi, x in zip(w, xs)), sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    lat = max((sy - slope * sx) / sw, 1e-7)
    worst = max(abs(lat + slope * x - y) / y for x, y in zip(xs, ys))
    return lat, 1.0 / slope, worst


def main() -> int:
    from lmforge.observability.machine import collective_times

    world = 2
    times = dict(collective_times(("all_reduce",), world, SIZES, REPEATS)["all_reduce"])
    for n, t in sorted(times.items()):
        print(f"{n:>10} bytes  {t * 1e6:10.1f} us  {n / t / 1e9:6.2f} GB/s algorithmic")
    lat, bw, worst = fit(times, world)
    print(f"gloo ring all-reduce, {world} ranks: latency {lat * 1e6:.1f} us, link bandwidth {bw / 1e9:.2f} GB/s, "
          f"worst residual {worst:.0%}")
    return verdict("gloo_bandwidth", "the ring model fitted to the same run's times", "1 - worst relative residual",
                   1.0 - worst, TARGET)


if __name__ == "__main__":
    sys.exit(main())

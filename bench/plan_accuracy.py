"""Step-time predictions of the planner (lmforge/plan: `predict`) against measured step times of
the same layouts on this machine.

The cluster file: by default this machine calibrated in the same run (`lmforge bench cluster`:
matmul rates, memory bandwidth, gloo collectives, and fixed costs fitted to probe runs of a
64-wide micro model, none of them a layout below); `--cluster cpu` (or any file) takes a file as
it is. Each layout trains through `lmforge train` (one thread per rank: a CPU cluster's device is
one core) for `--steps` steps; its step time is the lower quartile of the per-step times after 3
warm-up steps (global batch tokens / the logged tokens/s), the statistic the calibration takes of its
probes (lmforge/observability/machine.py: quiet_seconds): on a shared host noise only adds time, in
stretches of seconds, so a median compares whichever stretches each run caught. Layouts run in
interleaved rounds so machine noise hits all alike. This machine's one-thread fp32 matmul rate (n = 2048) is measured right
before and right after each layout and printed against the cluster's peak (a load indicator);
with `--rescale` each prediction is scaled by it (for the static preset on a loaded machine). The
check: every layout's min(pred / measured, measured / pred) >= 0.8, i.e. within 25 %; exit 1
otherwise.

    PYTHONPATH=. .venv/bin/python bench/plan_accuracy.py [--cluster calibrate|cpu|FILE] [--rounds 1]
        [--steps 10] [--rescale]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402

TARGET = 0.8  # min(pred/measured, measured/pred): within 25 %
FIFTY_M = ["--model.dim", "512", "--model.n_layers", "12", "--model.n_heads", "8", "--model.n_kv_heads", "8",
           "--model.multiple_of", "256", "--train.seq_len", "64", "--train.micro_batch_size", "2",
           "--train.global_batch_size", "4"]
# name: (recipe, ranks, overrides); global batch 8 x 128 tokens unless overridden.
LAYOUTS: dict[str, tuple[str, int, list[str]]] = {
    "dense-single": ("tiny-dense", 1, []),
    "dense-fsdp2": ("tiny-dense", 2, ["--parallel.dp_shard", "2", "--train.micro_batch_size", "4"]),
    "dense-tp2": ("tiny-dense", 2, ["--parallel.tp", "2", "--parallel.dp_shard", "1"]),
    "dense-ddp2": ("tiny-dense", 2, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1",
                                     "--train.micro_batch_size", "4"]),
    "dense-ac-full": ("tiny-dense", 1, ["--train.activation_checkpointing", "full"]),
    "moe-single": ("tiny-moe", 1, []),
    "moe-ep2": ("tiny-moe", 2, ["--parallel.dp_shard", "2", "--parallel.ep", "2", "--train.micro_batch_size", "4"]),
    "50m-single": ("tiny-dense", 1, FIFTY_M),
    "50m-tp2": ("tiny-dense", 2, [*FIFTY_M, "--parallel.tp", "2", "--parallel.dp_shard", "1"]),
}


def run_layout(name: str, steps: int, data_dir: Path, out: Path) -> tuple[list[float], Path]:
    """Per-step seconds after 3 warm-up steps, and the run directory (the same timed run as
    `lmforge bench cluster`'s probes: lmforge/cli_bench.py `timed_steps`)."""
    from lmforge.cli_bench import timed_steps

    recipe, nproc, extra = LAYOUTS[name]
    return timed_steps(REPO / "recipes" / f"{recipe}.toml", nproc, extra, steps, data_dir, out), out


def matmul_rate(n: int = 2048) -> float:
    """Median fp32 FLOP/s of n x n matmuls on one thread now (the load the next layout will see)."""
    from lmforge.observability.machine import matmul_rates

    return matmul_rates([(n, n, n)], seconds=0.5)[0][1]


def predicted_seconds(run_dir: Path, nproc: int, cluster: str) -> float:
    from lmforge.config import JobConfig
    from lmforge.config.loader import build_dataclass
    from lmforge.plan.cluster import load_cluster
    from lmforge.plan.predict import predict

    job = build_dataclass(JobConfig, json.loads((run_dir / "config.json").read_text()))
    return predict(job, load_cluster(cluster), nproc).step_time.total


def calibrate(out: Path) -> None:
    """`lmforge bench cluster --out OUT`: this machine as a cluster file, printed as it goes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lmforge", "bench", "cluster", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        raise RuntimeError(f"calibration failed: {proc.stderr.strip().splitlines()[-1:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--cluster", default="calibrate",
                    help="'calibrate' (measure this machine first, the default), a preset name or a cluster file")
    ap.add_argument("--rescale", action="store_true",
                    help="scale each prediction by the cluster's peak / the matmul rate measured around the layout")
    ap.add_argument("--min-ratio", type=float, default=TARGET)
    args = ap.parse_args()
    names = [n for n in args.layouts.split(",") if n]
    measured: dict[str, list[float]] = {n: [] for n in names}
    predicted: dict[str, float] = {}
    slowdown: dict[str, list[float]] = {n: [] for n in names}
    failed: dict[str, str] = {}
    from lmforge.observability.machine import quiet_seconds
    from lmforge.plan.cluster import load_cluster

    with tempfile.TemporaryDirectory() as tmp:
        cluster = args.cluster
        if cluster == "calibrate":
            cluster = str(Path(tmp) / "cluster.toml")
            calibrate(Path(cluster))
        preset_peak = load_cluster(cluster).accelerator.peak_flops("fp32")
        data_dir = Path(tmp) / "data"
        for r in range(args.rounds):
            for name in names:
                if name in failed:
                    continue
                try:
                    before = matmul_rate()
                    times, out = run_layout(name, args.steps, data_dir, Path(tmp) / f"{name}-{r}")
                    slowdown[name].append(preset_peak / ((before + matmul_rate()) / 2))
                    measured[name] += times
                    predicted[name] = predicted_seconds(out, LAYOUTS[name][1], cluster)
                except RuntimeError as e:
                    failed[name] = str(e).splitlines()[-1]
    if failed:
        print(f"FAIL: layouts failed: {failed}", file=sys.stderr)
        return verdict("plan_accuracy", "matmul rate around each layout", "layouts failed", float("nan"), args.min_ratio)
    meas = {n: quiet_seconds(v) for n, v in measured.items()}
    scales = {n: statistics.mean(v) if args.rescale else 1.0 for n, v in slowdown.items()}
    print(f"cluster {args.cluster}; its peak / the matmul rate measured around each layout: "
          + ", ".join(f"{n} {statistics.mean(v):.2f}" for n, v in slowdown.items())
          + ("" if args.rescale else " (not applied)"))
    print(f"{'layout':<14} {'ranks':>5} {'measured s':>11} {'predicted s':>11} {'used s':>9} {'used/meas':>10}")
    worst, worst_name = float("inf"), ""
    for n in names:
        p = predicted[n] * scales[n]
        ratio = p / meas[n]
        sym = min(ratio, 1 / ratio)
        if sym < worst:
            worst, worst_name = sym, n
        print(f"{n:<14} {LAYOUTS[n][1]:>5} {meas[n]:>11.4f} {predicted[n]:>11.4f} {p:>9.4f} {ratio:>10.3f}")
    baseline = (f"cluster {args.cluster}" + (", scaled by the matmul rate around each layout" if args.rescale else ""))
    return verdict("plan_accuracy", baseline, f"worst min(pred/meas, meas/pred) ({worst_name})", worst,
                   args.min_ratio)


if __name__ == "__main__":
    sys.exit(main())

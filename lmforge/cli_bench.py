"""`lmforge bench`: this machine's figures. `bench peak`: the matmul peak MFU divides by (cached);
`bench cluster`: the machine as a cluster file for `lmforge plan` (the calibrated CPU preset). CPUs differ between machines (the cpu preset's constants fitted on
one were 1.5-3x off on another), so the planner's CPU predictions are checked against a file made
here, on the machine they are checked on.

Measurements: lmforge/observability/machine.py (matmul and attention-kernel rates, memory bandwidth,
gloo collectives); probes: short `lmforge train` runs of a micro model (lmforge/plan/calibration.py:
FITS), as many per fit as it has constants; fitting and writing: lmforge/plan/calibration.py."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.storage.layout import RunDir

__all__ = ["add_bench_command"]

REPO = Path(__file__).resolve().parents[1]
PROBE_WARMUP = 3  # steps dropped before the median: first-step allocation and kernel choice


# Largest `bench peak --n`: three n x n fp32 matrices of 16384 take 3 GiB; beyond that the benchmark
# shrinks n to fit its time budget anyway, so a larger n would be reported but not measured.
BENCH_PEAK_MAX_N = 16384


def cmd_bench_peak(args: argparse.Namespace) -> int:
    from lmforge.config import ConfigError
    from lmforge.observability.peak import run_peak_benchmark

    if not 16 <= args.n <= BENCH_PEAK_MAX_N:
        raise ConfigError("--n", args.n, f"must be in [16, {BENCH_PEAK_MAX_N}] (matrix size; three n x n matrices "
                          f"of n = {args.n} would take {3 * 4 * args.n**2 / 2**30:,.1f} GiB in fp32)", "command line")

    results = run_peak_benchmark(dtypes=args.dtypes.split(","), n=args.n, force=args.force)
    for key, value in results.items():
        print(f"{key}: {value / 1e9:,.1f} GFLOP/s")
    return 0


# What every timed `lmforge train` run of `bench cluster` and bench/plan_accuracy.py shares: the
# embedded corpus's first 120 documents, batches of 8 x 128 tokens, fp32, no evaluation or
# checkpoint, every step logged (its tokens/s is the step time).
STEP_TIMING_ARGS = ("--tokenizer.vocab_size", "512", "--data.max_documents", "120", "--data.val_fraction", "0.05",
                    "--train.seq_len", "128", "--train.global_batch_size", "8", "--train.micro_batch_size", "8",
                    "--train.mixed_precision", "fp32", "--train.eval_interval", "0", "--checkpoint.enabled", "false",
                    "--scheduler.warmup_steps", "1", "--metrics.log_interval", "1", "--metrics.progress", "none",
                    "--metrics.tensorboard", "false", "--metrics.plot", "false", "--metrics.peak_flops", "1e11",
                    "--metrics.straggler_factor", "0", "--overwrite")


def timed_steps(recipe: Path, ranks: int, overrides: list[str] | tuple[str, ...], steps: int, data_dir: Path,
                out: Path) -> list[float]:
    """Seconds of each step after `PROBE_WARMUP` of `lmforge train RECIPE` on `ranks` processes of one
    thread each (a CPU cluster's device is one core), `overrides` after the shared arguments."""
    args = ["train", str(recipe), *STEP_TIMING_ARGS, "--data.dir", str(data_dir), "--train.output_dir", str(out),
            "--train.steps", str(steps), *overrides]
    if ranks > 1:
        args += ["--nproc", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"lmforge train {recipe.name} {' '.join(overrides)} failed: {tail}")
    cfg = json.loads(RunDir(out).config.read_text())
    tokens = cfg["train"]["global_batch_size"] * cfg["train"]["seq_len"]
    rows = [json.loads(x) for x in RunDir(out).metrics.read_text().splitlines() if x.strip()]
    return [tokens / r["tokens_per_s"] for r in rows if r.get("prefix") == "train"][PROBE_WARMUP:]


def _probe_steps(probe, steps: int, work: Path, round_: int) -> tuple[list[float], Path]:  # noqa: ANN001 (Probe)
    """Seconds of each step of one probe run (after the warm-up steps), and its run dir."""
    from lmforge.cli_errors import UserError

    recipe = REPO / "recipes" / f"{probe.recipe}.toml"
    if not recipe.is_file():
        raise UserError(f"bench cluster: probe recipe {recipe} not found; run it from an lmforge checkout "
                        "(the probes train recipes/tiny-dense.toml and recipes/tiny-moe.toml), or pass --no-probes")
    out = work / f"probe-{probe.name}-{round_}"
    times = timed_steps(recipe, probe.ranks, probe.overrides, steps, work / "data", out)
    if not times:
        raise RuntimeError(f"bench cluster: probe {probe.name} logged no step after the warm-up")
    return times, out


def measure_probes(probes: list, steps: int, rounds: int, work: Path) -> dict[str, tuple[float, Path]]:  # noqa: ANN001
    """Probe name -> (seconds per step: the lower quartile of the steps of all its runs, a run dir).
    The probes run in `rounds` interleaved rounds (every probe once per round), so a stretch of
    machine noise lands on one run of each rather than on every run of one; the lower quartile is
    the probe undisturbed (observability/machine.py: quiet_seconds, as every calibration figure)."""
    from lmforge.observability.machine import quiet_seconds

    steps_of: dict[str, list[float]] = {p.name: [] for p in probes}
    runs: dict[str, Path] = {}
    for r in range(rounds):
        for probe in probes:
            times, runs[probe.name] = _probe_steps(probe, steps, work, r)
            steps_of[probe.name] += times
    return {name: (quiet_seconds(times), runs[name]) for name, times in steps_of.items()}


def cmd_bench_cluster(args: argparse.Namespace) -> int:
    from lmforge.cli_errors import UserError

    # The arguments first: a mistake is answered before torch is imported.
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out}: exists; pass --overwrite to replace it")
    if out.suffix != ".toml":
        raise UserError(f"--out {out}: a cluster file is TOML; give a path ending in .toml")
    cores = os.cpu_count() or 1
    if not 2 <= args.ranks <= max(2, cores):
        raise UserError(f"--ranks {args.ranks}: must be 2 to {max(2, cores)} (processes on this host, one core each)")
    if args.probe_rounds < 1:
        raise UserError(f"--probe-rounds {args.probe_rounds}: must be >= 1")
    if args.probe_steps < PROBE_WARMUP + 2:
        raise UserError(f"--probe-steps {args.probe_steps}: must be >= {PROBE_WARMUP + 2} "
                        f"({PROBE_WARMUP} warm-up steps are dropped)")

    import tomllib

    import torch

    from lmforge.config import JobConfig
    from lmforge.config.loader import build_dataclass
    from lmforge.observability.machine import (
        attention_rates,
        collective_times,
        matmul_rates,
        memory_bandwidth,
    )
    from lmforge.plan.calibration import (
        FITS,
        cluster_dict,
        collective_table,
        fit_attention,
        fit_constants,
        fit_efficiency,
        to_toml,
        with_constants,
    )
    from lmforge.plan.cluster import COLLECTIVE_KINDS, PRESETS_DIR, Efficiency, cluster_from_dict
    from lmforge.storage.atomic import atomic_open
    from lmforge.tensors.cpu_features import cpu_model_name

    start = time.perf_counter()
    rates = matmul_rates()
    peak, eff_max, half = fit_efficiency(rates)
    # bf16 at one small size only: without native bf16 a large one takes tens of seconds.
    (_, f32_small), = matmul_rates([(512, 512, 512)])
    (_, bf16_small), = matmul_rates([(512, 512, 512)], dtype=torch.bfloat16)
    peak_bf16 = peak * bf16_small / f32_small
    hbm = memory_bandwidth()
    attention_max, attention_half = fit_attention(attention_rates(), peak)
    print(f"matmul (1 thread, fp32): peak {peak / 1e9:.1f} GFLOP/s, efficiency max {eff_max:.3f}, half at "
          f"{half / 1e9:.4f} GFLOP; bf16/fp32 at n=512: {bf16_small / f32_small:.3f}; memory {hbm / 1e9:.1f} GB/s")
    print(f"attention kernel (1 thread, fp32, causal, forward + backward): max {attention_max:.3f} of the matmul "
          f"peak, half at {attention_half / 1e9:.4f} GFLOP")
    times = collective_times(COLLECTIVE_KINDS, args.ranks)
    table = collective_table(times, args.ranks)
    for kind, pts in table.points.items():
        print(f"gloo {kind:<14} " + "  ".join(f"{b / 2**10:.0f}K {t * 1e6:.0f}us" for b, t in pts))
    base = tomllib.loads((PRESETS_DIR / "cpu.toml").read_text())
    eff = Efficiency(max=eff_max, half_flops=half, op_overhead_s=0.0, comm_overlap=0.0, attention_max=attention_max,
                     attention_half_flops=attention_half)
    name = f"cpu ({cpu_model_name()})"

    def build(e: Efficiency):  # noqa: ANN202 (Cluster)
        data = cluster_dict(base, name="cpu-calibrated", accelerator_name=name, peak_fp32=peak, peak_bf16=peak_bf16,
                            hbm_bytes_per_s=hbm, devices=args.ranks, efficiency=e, collectives=table,
                            description="")
        return data, cluster_from_dict(data, where=str(out))

    _, cluster = build(eff)
    fitted: dict[str, float] = {}
    if not args.no_probes:
        with tempfile.TemporaryDirectory(prefix="lmforge-calibrate-") as tmp:
            probes = [p for fit in FITS for p in fit.probes]
            measured = measure_probes(probes, args.probe_steps, args.probe_rounds, Path(tmp))
            for fit in FITS:
                runs = []
                for probe in fit.probes:
                    seconds, run = measured[probe.name]
                    runs.append((build_dataclass(JobConfig, json.loads(RunDir(run).config.read_text())),
                                 probe.ranks, seconds))
                    print(f"probe {probe.name:<8} ({probe.ranks} rank{'s' * (probe.ranks > 1)}): {seconds:.4f} s/step")
                values = fit_constants(runs, cluster, fit.constants)
                fitted.update(values)
                cluster = with_constants(cluster, **values)
                print("  -> " + ", ".join(f"{k.removesuffix('_s')} {v * 1e6:.1f} us" if k.endswith("_s")
                                          else f"{k} {v:.2f}" for k, v in values.items()))
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    description = (f"measured by `lmforge bench cluster` on {cpu_model_name()}, {cores} cores, torch "
                   f"{torch.__version__}, {when}")
    data, _ = build(cluster.efficiency)
    data["description"] = description
    header = (f"This machine as a cluster for `lmforge plan --cluster {out}`: {description}.\n"
              "One device = one rank = one process on one core. [collectives]: gloo between processes of this "
              "host;\n[efficiency] constants fitted to micro-model probe runs (lmforge/plan/calibration.py). "
              "Power, failures and price: the cpu preset's.")
    text = to_toml(data, header)
    cluster_from_dict(tomllib.loads(text), where=str(out))  # what is written loads back
    with atomic_open(out) as f:
        f.write(text)
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s)"
          + ("" if fitted or args.no_probes else "; no probe fitted"))
    return 0


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="micro-benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("peak", help="measure (and cache) this machine's matmul peak for MFU")
    q.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp16, fp32, tf32 (GPU only)")
    q.add_argument("--n", type=int, default=2048, help="matrix size")
    q.add_argument("--force", action="store_true", help="re-measure even if cached")
    q.set_defaults(func=cmd_bench_peak)
    q = bsub.add_parser("cluster", help="measure this machine and write it as a cluster file for `lmforge plan`")
    q.add_argument("--out", required=True, help="cluster TOML to write")
    q.add_argument("--ranks", type=int, default=2, help="processes the collectives and probes use (default 2)")
    q.add_argument("--probe-steps", type=int, default=14, help="steps per probe training run (default 14)")
    q.add_argument("--probe-rounds", type=int, default=3,
                   help="interleaved rounds of the probe runs; each probe's time is the lower quartile of all its "
                        "steps (default 3)")
    q.add_argument("--no-probes", action="store_true",
                   help="measure matmuls, memory and collectives only (the fixed costs stay 0)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.set_defaults(func=cmd_bench_cluster)

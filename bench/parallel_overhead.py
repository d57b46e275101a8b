"""Tokens/s of each parallel layout on 2 CPU ranks relative to one process on the same global batch.

Every layout trains the same model on the same data for the same steps through `lmforge train`;
layouts run in interleaved rounds (A, B, C, A, B, C, ...) so machine noise hits all alike, and
the median of each layout's per-step tokens/s (after warm-up) is compared with the single process
(the named baseline). The check: every layout runs, and the slowest one reaches `--min-ratio` of
the single process (default 0.6: on one 2-core machine a layout pays its communication and
scheduling, measured 0.63x-1.13x; the slowest is tp); exit 1 if a layout fails or falls below.

    .venv/bin/python bench/parallel_overhead.py [--rounds 2] [--steps 12] [--layouts single,ddp,fsdp,...] [--min-ratio 0.6]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402

TARGET = 0.6  # slowest layout's tokens/s / one process's, same cores

MODEL = ["--model.dim", "256", "--model.n_layers", "4", "--model.n_heads", "4", "--model.n_kv_heads", "4",
         "--model.vocab_size", "4096", "--model.multiple_of", "64", "--model.max_seq_len", "256",
         "--tokenizer.vocab_size", "4096"]

# name: (processes, overrides). Global batch 16 sequences of 256 tokens in every layout.
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "single": (1, ["--train.micro_batch_size", "16"]),
    "ddp": (2, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1", "--train.micro_batch_size", "8"]),
    "fsdp": (2, ["--train.micro_batch_size", "8"]),
    "fsdp-zero2": (2, ["--parallel.fsdp_reshard_after_forward", "never", "--train.micro_batch_size", "8"]),
    "tp": (2, ["--parallel.tp", "2", "--parallel.dp_shard", "1", "--train.micro_batch_size", "16"]),
    "pp-1f1b": (2, ["--parallel.pp", "2", "--parallel.dp_shard", "1", "--parallel.pp_microbatches", "4",
                    "--train.micro_batch_size", "16"]),
}


def run_layout(name: str, steps: int, data_dir: Path, out: Path, threads: int, precision: str = "fp32") -> list[float]:
    """Per-step tokens/s after 2 warm-up steps. `precision`: train.mixed_precision (fp32 on CPUs
    without native bf16, where a bf16 matmul is ~40x slower; bf16 where it is native)."""
    nproc, extra = LAYOUTS[name]
    args = ["train", *MODEL, "--data.dir", str(data_dir), "--data.max_documents", "400",
            "--train.output_dir", str(out), "--train.steps", str(steps), "--train.seq_len", "256",
            "--train.global_batch_size", "16", "--train.eval_interval", "0", "--checkpoint.enabled", "false",
            "--scheduler.warmup_steps", "2", "--metrics.log_interval", "1", "--metrics.progress", "none",
            "--metrics.tensorboard", "false", "--metrics.plot", "false", "--metrics.peak_flops", "1e12",
            "--train.mixed_precision", precision, *extra]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    # The machine's cores are split among the ranks, so every layout uses the same hardware.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // nproc))}
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["tokens_per_s"] for r in rows if r.get("prefix") == "train"][2:]  # skip warm-up steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--precision", default="fp32", help="train.mixed_precision of every layout (default fp32)")
    ap.add_argument("--min-ratio", type=float, default=TARGET,
                    help=f"exit 1 if the slowest layout is below this fraction of one process (default {TARGET:g})")
    args = ap.parse_args()
    names = [n for n in args.layouts.split(",") if n]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        print(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    if "single" not in names:
        names.insert(0, "single")
    samples: dict[str, list[float]] = {n: [] for n in names}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        for r in range(args.rounds):
            for name in names:
                if name in failed:
                    continue
                try:
                    samples[name] += run_layout(name, args.steps, data_dir, Path(tmp) / f"{name}-{r}", args.threads,
                                                args.precision)
                except RuntimeError as e:
                    failed[name] = str(e).splitlines()[-1]
    base = statistics.median(samples["single"]) if "single" not in failed else float("nan")
    print(f"{'layout':<12} {'ranks':>5} {'tokens/s':>10} {'vs single':>10}")
    ratios: dict[str, float] = {}
    for name in names:
        if name in failed:
            print(f"{name:<12} {LAYOUTS[name][0]:>5} {'failed':>10}   {failed[name][:80]}")
            continue
        tps = statistics.median(samples[name])
        ratios[name] = tps / base
        print(f"{name:<12} {LAYOUTS[name][0]:>5} {tps:>10,.0f} {tps / base:>9.2f}x")
    if failed:  # a layout that does not run fails the benchmark, whatever the others measure
        print(f"FAIL: layouts failed: {', '.join(failed)}", file=sys.stderr)
        return verdict("parallel_overhead", "single process", f"layouts failed: {','.join(failed)}",
                       float("nan"), args.min_ratio)
    slowest = min((n for n in ratios if n != "single"), key=ratios.__getitem__, default="single")
    return verdict("parallel_overhead", "single process", f"slowest layout ({slowest}) / single",
                   ratios[slowest], args.min_ratio)


if __name__ == "__main__":
    sys.exit(main())

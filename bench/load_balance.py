"""Load balancing across uneven ranks (comm.load_balance) on 2 CPU ranks under DDP: rank 1 is made
slow in proportion to its samples (it burns `--delay` seconds of CPU per sample, LMFORGE_FAULTS
delay_per_sample_s: a slower device), the baseline is the same run with equal splits. Prints each
run's median step time after the split settled (the last `--tail` steps), the final split and the
largest per-step loss difference (relative; fp32, expected <= 1e-5: the loss is weighted by tokens).

The check: equal-split step time / balanced step time >= `--min-ratio` (default 1.33: the step
time cut by >= 25%), exit 1 below or when the losses differ by more than 1e-5 relative.

    .venv/bin/python bench/load_balance.py [--steps 16] [--delay 0.03] [--tail 6] [--min-ratio 1.33]
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
sys.path.insert(0, str(REPO / "bench"))
from _check import verdict  # noqa: E402

TARGET = 1.33  # equal-split step time / balanced: a cut of >= 25%

MODEL = ["--model.dim", "128", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "4",
         "--model.vocab_size", "1024", "--model.multiple_of", "64", "--model.max_seq_len", "128",
         "--tokenizer.vocab_size", "1024"]


def run(balanced: bool, steps: int, delay: float, data_dir: Path, out: Path) -> list[dict]:
    args = ["train", *MODEL, "--data.dir", str(data_dir), "--data.max_documents", "300",
            "--train.output_dir", str(out), "--train.steps", str(steps), "--train.seq_len", "128",
            "--train.global_batch_size", "16", "--train.micro_batch_size", "8", "--train.eval_interval", "0",
            "--train.mixed_precision", "fp32", "--checkpoint.enabled", "false", "--scheduler.warmup_steps", "2",
            "--metrics.log_interval", "1", "--metrics.progress", "none", "--metrics.tensorboard", "false",
            "--metrics.plot", "false", "--metrics.peak_flops", "1e12", "--metrics.straggler_factor", "0",
            "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1", "--comm.load_balance", str(balanced).lower(),
            "--comm.load_balance_interval", "2", "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "LMFORGE_FAULTS": json.dumps({"delay_rank": 1, "delay_per_sample_s": delay})}
    proc = subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{'balanced' if balanced else 'equal'} run failed:\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if "load balance" in line or line.startswith("time breakdown"):
            print(f"  {line}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r.get("prefix") == "train"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--delay", type=float, default=0.03, help="rank 1's extra CPU seconds per sample")
    ap.add_argument("--tail", type=int, default=6, help="steps at the end compared (the split settled)")
    ap.add_argument("--min-ratio", type=float, default=TARGET)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        print("equal splits:")
        equal = run(False, args.steps, args.delay, data, Path(tmp) / "equal")
        print("balanced:")
        bal = run(True, args.steps, args.delay, data, Path(tmp) / "balanced")
    t_equal = statistics.median(r["step_time_s"] for r in equal[-args.tail:])
    t_bal = statistics.median(r["step_time_s"] for r in bal[-args.tail:])
    diff = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(equal, bal))
    print(f"step time (median of the last {args.tail}): equal {t_equal * 1e3:.1f} ms, balanced {t_bal * 1e3:.1f} ms; "
          f"rank 1's share {bal[-1]['lb_min_share']:.3f}; largest loss difference {diff:.2e} (relative)")
    if len(equal) != len(bal) or diff > 1e-5:
        print(f"FAIL: losses differ by {diff:.2e} relative (> 1e-5)", file=sys.stderr)
        return 1
    return verdict("load_balance", "equal splits, same slow rank", "equal / balanced step time", t_equal / t_bal,
                   args.min_ratio)


if __name__ == "__main__":
    sys.exit(main())

"""The lmforge CLI from tests: a debug-sized run's arguments, `lmforge` in a fresh process (under
torchrun when nproc > 1, killed with its whole process group on a timeout) or a one-process
`lmforge train` in this process, and a run's metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A debug-sized model and run that finish in seconds on 2 cores.
TINY_MODEL = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
              "--model.vocab_size", "512", "--model.multiple_of", "32", "--model.max_seq_len", "64"]


def tiny_run_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return [*TINY_MODEL, "--tokenizer.vocab_size", "512", "--data.dir", str(data_dir),
            "--data.max_documents", "120", "--data.val_fraction", "0.05",
            "--train.output_dir", str(out_dir), "--train.seq_len", "32", "--train.mixed_precision", "fp32",
            "--scheduler.warmup_steps", "2", "--optimizer.lr", "0.01", "--metrics.log_interval", "1", "--metrics.tensorboard", "false",
            "--metrics.progress", "none", "--metrics.peak_flops", "1e11", "--metrics.plot", "false", *extra]


def run_process_group(cmd: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; on a timeout kill the whole group (torchrun's workers
    too: killing only the launcher would leave hung ranks spinning for the rest of the suite)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)}\ntimed out after {timeout} s\nstdout:\n{out[-3000:]}\n"
                             f"stderr:\n{err[-5000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_cli(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `lmforge` in a fresh process (torchrun when nproc > 1); fail loudly with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lmforge", *args]
    else:
        cmd = [sys.executable, "-m", "lmforge", *args]
    proc = run_process_group(cmd, env, timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def train_in_process(args: list[str]) -> None:
    """`lmforge train ARGS` in this process (`lmforge.cli.main`), on one intra-op thread as
    run_cli's OMP_NUM_THREADS=1 (its losses are bit-equal to run_cli's). For one-process runs a
    test compares against or starts from, where what the run computes is the point and not the
    process: a fresh `lmforge` process spends ~5 s of 2 cores importing torch, this ~0.5 s of
    training. Runs under test for what a process does (exit codes, stderr, signals, a resume in
    a new process, peak RSS, torchrun) keep run_cli."""
    import torch

    from lmforge.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", *args])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, f"lmforge train {' '.join(args)}: exit code {code} (its output is in the captured stdout/stderr)"


def read_metrics(run_dir: Path, prefix: str = "train") -> list[dict]:
    from lmforge.storage.strict_json import (
        restore_nonfinite,  # strict JSON: NaN/inf are null + a "nonfinite" flag
    )

    rows = [restore_nonfinite(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return [r for r in rows if r.get("prefix", "train") == prefix]

"""The lmforge CLI from tests: a debug-sized run's arguments, `lmforge` in a fresh process (under
torchrun when nproc > 1, killed with its whole process group on a timeout), a one-process
`lmforge train` in this process, `lmforge train` on N ranks forked from a preloaded server, and a
run's metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
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


# What a rank of `train_ranks` has imported before it is forked (see tests/helpers/spawn.py).
TRAIN_PRELOAD = ("torch", "lmforge.cli", "lmforge.train.trainer")


def _train_rank(rank: int, world: int, port: int, out: str, env: dict[str, str], args: list[str]) -> None:
    """One rank of `train_ranks`: the caller's environment plus torchrun's for a one-node job, then
    the worker's entry point (`lmforge.cli.main`); stdout/stderr go to files, the exit code is main's."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(Path(out) / f"{name}{rank}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(REPO)  # as run_cli; the server's directory and environment are its first caller's
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    code = 1
    try:
        import torch

        from lmforge.cli import main

        torch.set_num_threads(1)
        code = main(["train", *args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def train_ranks(args: list[str], nproc: int, timeout: int = 300) -> subprocess.CompletedProcess:
    """`lmforge train ARGS` on `nproc` gloo ranks as torchrun would start them (the same
    environment variables, one intra-op thread, the worker's entry point), but forked from a
    server that has imported torch and the trainer: a 2-rank job of 6 tiny steps took 10.4 s under
    torchrun and 1.9 s forked, on 2 cores. For jobs where what the ranks compute is the point
    (layout parity, resumes, memory); the torchrun process itself stays under test through run_cli.
    Fails loudly with every rank's output; returns the ranks' stdout and stderr, in rank order."""
    from tests.helpers.spawn import fork_ranks, free_port

    out = Path(tempfile.mkdtemp(prefix="train-ranks-"))
    failure = fork_ranks(_train_rank, nproc, (nproc, free_port(), str(out), dict(os.environ), args), TRAIN_PRELOAD,
                         timeout)
    text = {name: "".join((out / f"{name}{r}.txt").read_text(errors="replace")
                          for r in range(nproc) if (out / f"{name}{r}.txt").exists())
            for name in ("stdout", "stderr")}
    shutil.rmtree(out, ignore_errors=True)
    assert not failure, (f"lmforge train {' '.join(args)} on {nproc} forked ranks: {failure}\nstdout:\n"
                         f"{text['stdout'][-3000:]}\nstderr:\n{text['stderr'][-5000:]}")
    return subprocess.CompletedProcess(["lmforge", "train", *args], 0, text["stdout"], text["stderr"])


def read_metrics(run_dir: Path, prefix: str = "train") -> list[dict]:
    from lmforge.storage.strict_json import (
        restore_nonfinite,  # strict JSON: NaN/inf are null + a "nonfinite" flag
    )

    rows = [restore_nonfinite(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return [r for r in rows if r.get("prefix", "train") == prefix]

"""Gradient communication on a real slow link: step time of each compressor against none, or of the
hierarchical all-reduce against the flat one, with ranks in their own network namespaces.

The link (tests/helpers/slow_network.py): one namespace per node, joined by veth pairs to a bridge,
each node's uplink limited to `--rate` with tbf (and `--delay` one way where the kernel has netem;
the bench prints which). One torchrun per namespace (`ip netns exec`, `--nnodes N --node-rank i
--master-addr <node 0>`), DDP (`--parallel.dp_replicate`, `--parallel.dp_shard 1`), gloo pinned to
the namespace's interface. Needs root (CAP_NET_ADMIN); elsewhere it runs over loopback and says
that the network is NOT slowed (no verdict then).

Model: wide and shallow (dim 1024, 2 layers: ~27 M parameters, 108 MB of fp32 gradients a step)
with one 16-token sequence per rank, so a 1 Gbit/s link, not the 2 cores, sets the step time; a
one-process run of the same per-rank batch (no communication) is printed to show how much.

Modes:
  compressors (default): 2 nodes x 1 rank, `--comm.compression` none, bf16, int8, int4, int2, topk,
    topk_local (top-k with `--comm.adam_moments local`), powersgd in interleaved rounds; the verdict
    is the slowest of int8 / topk / topk_local / powersgd against none (step time of none / theirs,
    target >= 1.1). Compressors not in this tree (the package
    lmforge.parallel.comm) are listed and skipped; with none of them to run there is no verdict.
  --hierarchical: 2 nodes x 2 ranks (node_size = LOCAL_WORLD_SIZE = 2), flat DDP against
    `--comm.hierarchical true`; verdict: flat step time / hierarchical, target >= 1.1 (across the
    link a 4-rank ring carries 1.5x the gradient per node, the hierarchical scheme 1x).

    sudo PYTHONPATH=. .venv/bin/python bench/comm.py [--hierarchical] [--steps 10] [--rounds 1]
        [--compressors none,int8,...] [--rate 1gbit] [--delay 1ms] [--loopback]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO))
from _check import verdict  # noqa: E402

from tests.helpers.slow_network import SlowNetwork, slow_network  # noqa: E402

COMPRESSORS = ("none", "bf16", "int8", "int4", "int2", "topk", "topk_local", "powersgd")
# runs other than `--comm.compression NAME`: top-k with each rank's AdamW moments before the
# compression (its updates travel after backward, not overlapped with it)
CONFIGS = {"topk_local": ["--comm.compression", "topk", "--comm.adam_moments", "local"]}
MUST_BEAT = ("int8", "topk", "topk_local", "powersgd")  # at least these faster than none on a comm-bound model
TARGET = 1.1
PORT = "29500"  # inside node 0's namespace (its own port space); loopback fallback shares the host's
MICRO, SEQ = 1, 16
MODEL = ["--model.dim", "1024", "--model.n_layers", "2", "--model.n_heads", "8", "--model.n_kv_heads", "8",
         "--model.vocab_size", "512", "--model.multiple_of", "256", "--model.max_seq_len", str(SEQ),
         "--tokenizer.vocab_size", "512"]
DATA = ["--data.max_documents", "200", "--data.val_fraction", "0.05", "--train.seq_len", str(SEQ)]


def run_args(data_dir: Path, out: Path, steps: int, ranks: int, extra: list[str]) -> list[str]:
    """`lmforge train` overrides: MICRO sequences per rank, DDP over all ranks, fp32, no saves."""
    ddp = ["--parallel.dp_replicate", str(ranks), "--parallel.dp_shard", "1"] if ranks > 1 else []
    return ["train", *MODEL, *DATA, "--data.dir", str(data_dir), "--train.output_dir", str(out),
            "--train.steps", str(steps), "--train.micro_batch_size", str(MICRO),
            "--train.global_batch_size", str(MICRO * ranks), "--train.mixed_precision", "fp32",
            "--train.eval_interval", "0", "--checkpoint.enabled", "false", "--scheduler.warmup_steps", "1",
            "--metrics.log_interval", "1", "--metrics.progress", "none", "--metrics.tensorboard", "false",
            "--metrics.plot", "false", "--metrics.peak_flops", "1e11", "--metrics.straggler_factor", "0",
            *ddp, *extra]


def step_seconds(out: Path, ranks: int, warmup: int = 2) -> list[float]:
    """Seconds per optimizer step from the run's metrics.jsonl (tokens of a step / tokens_per_s)."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    tokens = MICRO * ranks * SEQ
    return [tokens / r["tokens_per_s"] for r in rows if r.get("prefix") == "train"][warmup:]


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # torchrun and its workers: their own session
        p.wait()


def run_job(net: SlowNetwork, per_node: int, args: list[str], out: Path, timeout: float) -> list[float]:
    """One torchrun per node, each inside its namespace; the job's step times."""
    nodes = len(net.addresses)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": net.interface,
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONPATH": str(REPO)}
    procs: list[subprocess.Popen] = []
    logs = []
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for i in range(nodes):
            log = open(out.parent / f"{out.name}-node{i}.log", "w")  # noqa: SIM115 (closed below)
            logs.append(log)
            cmd = net.command(i, [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
                                  "--node-rank", str(i), "--nproc-per-node", str(per_node),
                                  "--master-addr", net.addresses[0], "--master-port", PORT,
                                  "-m", "lmforge", *args])
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{out.name}: timed out after {timeout:.0f} s") from None
    finally:
        _kill(procs)
        for log in logs:
            log.close()
    if any(p.returncode for p in procs):
        tail = (out.parent / f"{out.name}-node0.log").read_text()[-1500:]
        raise RuntimeError(f"{out.name}: exit {[p.returncode for p in procs]}\n{tail}")
    return step_seconds(out, nodes * per_node)


def run_single(args: list[str], out: Path, timeout: float) -> list[float]:
    """The same per-rank work in one process: compute only, no communication."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"single: exit {proc.returncode}\n{proc.stderr[-1500:]}")
    return step_seconds(out, 1)


def available(names: list[str]) -> tuple[list[str], list[str]]:
    """Compressors this tree implements: none always; the others once lmforge.parallel.comm exists
    (until then the config accepts their names but nothing compresses, so they are not run)."""
    have = importlib.util.find_spec("lmforge.parallel.comm") is not None
    return [n for n in names if n == "none" or have], [n for n in names if n != "none" and not have]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hierarchical", action="store_true", help="2 nodes x 2 ranks: flat against hierarchical")
    ap.add_argument("--compressors", default=",".join(COMPRESSORS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--delay", default="1ms")
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--loopback", action="store_true", help="no namespaces: the same runs over loopback (reference)")
    args = ap.parse_args()
    if args.hierarchical:
        per_node, configs = 2, {"flat": [], "hierarchical": ["--comm.hierarchical", "true"]}
        skipped: list[str] = []
    else:
        names = [n for n in args.compressors.split(",") if n]
        unknown = [n for n in names if n not in COMPRESSORS]
        if unknown:
            print(f"unknown compressors {unknown}; known: {', '.join(COMPRESSORS)}", file=sys.stderr)
            return 2
        runnable, skipped = available(["none", *[n for n in names if n != "none"]])
        per_node, configs = 1, {n: CONFIGS.get(n, ["--comm.compression", n]) for n in runnable}
    if skipped:
        print(f"SKIPPED (not in this tree: lmforge.parallel.comm is missing): {', '.join(skipped)}", flush=True)
    ranks = 2 * per_node
    samples: dict[str, list[float]] = {n: [] for n in ["single", *configs]}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        prep = subprocess.run([sys.executable, "-m", "lmforge", "data", "prepare", *MODEL, *DATA,
                               "--data.dir", str(data_dir)], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        if prep.returncode:
            print(prep.stderr[-2000:], file=sys.stderr)
            return 1
        loopback = nullcontext(SlowNetwork(["127.0.0.1"] * 2, message="network NOT slowed: loopback, by request"))
        with loopback if args.loopback else slow_network(2, rate=args.rate, delay=args.delay) as net:
            print(net.message, flush=True)
            for r in range(args.rounds):
                samples["single"] += run_single(run_args(data_dir, Path(tmp) / f"single-{r}", args.steps, 1, []),
                                                Path(tmp) / f"single-{r}", args.timeout)
                for name, extra in configs.items():
                    out = Path(tmp) / f"{name}-{r}"
                    samples[name] += run_job(net, per_node, run_args(data_dir, out, args.steps, ranks, extra), out,
                                             args.timeout)
    base_name = "flat" if args.hierarchical else "none"
    step = {n: statistics.median(v) for n, v in samples.items()}
    print(f"{ranks} ranks as 2 nodes x {per_node}; median step time over {args.rounds} round(s) x "
          f"{args.steps - 2} steps")
    print(f"{'config':<14} {'step s':>8} {base_name + ' / it':>10}")
    for name, s in step.items():
        print(f"{name:<14} {s:>8.3f} {step[base_name] / s:>9.2f}x")
    print(f"communication share of the {base_name} step: {1 - step['single'] / step[base_name]:.0%} "
          f"(single = the same per-rank work in one process)")
    if step["single"] > 0.7 * step[base_name]:
        print(f"note: not communication-bound in this run (one process's compute is "
              f"{step['single'] / step[base_name]:.0%} of the {base_name} step: a busy machine?)")
    if not net.slowed:
        print("no verdict: " + net.message)
        return 0
    if args.hierarchical:
        return verdict("comm_hierarchical", "flat DDP all-reduce", "flat step time / hierarchical",
                       step["flat"] / step["hierarchical"], TARGET)
    judged = [n for n in MUST_BEAT if n in step]
    if not judged:
        print(f"no verdict: none of {', '.join(MUST_BEAT)} could run here; rerun after lmforge.parallel.comm "
              "is merged")
        return 0
    slowest = min(judged, key=lambda n: step["none"] / step[n])
    return verdict("comm_compression", "none (uncompressed DDP)", f"none step time / {slowest}'s (slowest of "
                   f"{', '.join(judged)})", step["none"] / step[slowest], TARGET)


if __name__ == "__main__":
    sys.exit(main())

"""GPU readiness check: the CUDA-only code paths of lmforge, on one machine with an NVIDIA GPU, in
a few minutes, with one table at the end. CI has no GPU; run this where one is (`bash
scripts/gpu_check.sh`), and record the table in docs/benchmarks.md.

Checks (each a short `lmforge train` run on the default corpus, or an in-process check):
  tiny-dense-bf16    recipes/tiny-dense.toml in bf16 autocast: loss falls, checkpoint, generate on CUDA
  fp16-loss-scaling  the same in fp16 with the dynamic GradScaler: loss falls, loss scale > 1
  compile            bf16 + torch.compile per block: loss falls, close to the eager bf16 run
  cpu-offload        FSDP2 CPUOffloadPolicy (pinned host memory) with a "cpu:gloo,cuda:nccl" group:
                     through the trainer (--nproc 2, dp_shard 2) with 2+ GPUs; with one GPU,
                     in-process on a one-rank FSDP2 mesh (NCCL allows one rank per GPU, and the
                     trainer refuses offload at dp_shard = 1)
  moe-grouped        recipes/tiny-moe.toml in bf16 (grouped expert matmuls), plus the grouped
                     kernel against the per-expert loop on CUDA
  1b-dense           a Llama-3.2-1B shape (lmforge sizes: 1B) for a few steps: tokens/s and MFU
  flex-window        sliding-window attention through compiled flex_attention (the model's CUDA
                     path) against SDPA's dense causal kernel, forward + backward in bf16 at 16k
                     tokens: attended pairs per second of the window >= 85% of the dense kernel's
                     (issue 13), and the window's output equal to the blocked kernel's

Exit status: 0 all passed (skips allowed), 1 a check failed, 2 no CUDA GPU (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NO_GPU = "gpu_check: no CUDA GPU: torch.cuda.is_available() is False on this machine; run it where an NVIDIA GPU is"

# The 1B shape of lmforge.models.llama.sizes (Llama 3.2 1B), as overrides (the vocabulary stays the
# model's 128256; the default corpus's tokenizer uses its first 8192 ids).
ONE_B = ["--model.dim", "2048", "--model.n_layers", "16", "--model.n_heads", "32", "--model.n_kv_heads", "8",
         "--model.vocab_size", "128256", "--model.ffn_hidden", "8192", "--model.rope_theta", "500000.0",
         "--model.max_seq_len", "2048", "--model.tie_embeddings", "true"]


@dataclass
class Result:
    name: str
    status: str  # PASS, FAIL, SKIP
    first_loss: float = math.nan
    last_loss: float = math.nan
    tokens_per_s: float = math.nan
    mfu: float = math.nan
    seconds: float = 0.0
    note: str = ""


@dataclass
class RunSummary:
    """What a training run's metrics.jsonl says (train records, last one per step)."""

    losses: list[float] = field(default_factory=list)
    tokens_per_s: float = math.nan
    mfu: float = math.nan
    loss_scales: list[float] = field(default_factory=list)


def read_run(run_dir: Path) -> RunSummary:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return RunSummary()
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("prefix", "train") == "train" and "loss" in rec:
            by_step[int(rec["step"])] = rec
    rows = [by_step[s] for s in sorted(by_step)]
    if not rows:
        return RunSummary()
    last = rows[-1]
    return RunSummary(losses=[float(r["loss"]) for r in rows], tokens_per_s=float(last.get("tokens_per_s", math.nan)),
                      mfu=float(last.get("mfu", math.nan)),
                      loss_scales=[float(r["loss_scale"]) for r in rows if "loss_scale" in r])


def training_verdict(s: RunSummary, min_drop: float) -> tuple[str, str]:
    """PASS when every logged loss is finite and the last is at least `min_drop` nats below the
    first; else FAIL with the reason."""
    if len(s.losses) < 2:
        return "FAIL", f"{len(s.losses)} logged losses"
    if not all(math.isfinite(v) for v in s.losses):
        return "FAIL", "non-finite loss"
    drop = s.losses[0] - s.losses[-1]
    if drop < min_drop:
        return "FAIL", f"loss fell {drop:.2f} nats (< {min_drop})"
    return "PASS", f"loss -{drop:.2f}"


def _lmforge(args: list[str], nproc: int = 1) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "lmforge", *args]
    return [sys.executable, "-m", "lmforge", *args]


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Run a command, its output to `log`; (return code, last error line)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124, f"timed out after {timeout:.0f} s"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return rc, (lines[-1][:120] if lines else "")


TINY = "recipes/tiny-dense.toml"
BF16 = ("--train.mixed_precision", "bf16")


@dataclass(frozen=True)
class TrainCheck:
    """One `lmforge train` run of a check: the recipe, the check's own overrides, its steps and the
    loss drop it must show. Kept as data so that a test can load every run's config without a GPU."""

    recipe: str
    overrides: tuple[str, ...]
    steps: int
    min_drop: float
    nproc: int = 1
    timeout: float = 300


TRAIN_CHECKS = {
    "tiny-dense-bf16": TrainCheck(TINY, BF16, 60, 1.0),
    "fp16-loss-scaling": TrainCheck(TINY, ("--train.mixed_precision", "fp16"), 60, 1.0),
    "compile": TrainCheck(TINY, (*BF16, "--train.compile", "true"), 60, 1.0, timeout=420),
    # two ranks, the recipe's global batch of 8: 4 sequences per rank and step
    "cpu-offload": TrainCheck(TINY, (*BF16, "--parallel.dp_shard", "2", "--parallel.cpu_offload", "true",
                                     "--train.micro_batch_size", "4"), 40, 1.0, nproc=2),
    "moe-grouped": TrainCheck("recipes/tiny-moe.toml", BF16, 60, 1.0),
    "1b-dense": TrainCheck(TINY, (*ONE_B, *BF16, "--train.seq_len", "2048", "--train.global_batch_size", "8",
                                  "--train.micro_batch_size", "4", "--optimizer.lr", "3e-4",
                                  "--checkpoint.enabled", "false"), 30, 0.5, timeout=420),
}


def train_args(name: str, out: Path, data_dir: Path) -> list[str]:
    """`lmforge train` arguments of check `name` on CUDA, its run in out/name."""
    check = TRAIN_CHECKS[name]
    steps = check.steps
    return ["train", check.recipe, "--train.device", "cuda", "--data.dir", str(data_dir),
            "--train.output_dir", str(out / name), "--train.steps", str(steps),
            "--scheduler.warmup_steps", str(max(1, steps // 10)), "--train.eval_interval", "0",
            "--checkpoint.interval", str(steps), "--checkpoint.resume", "none",
            "--metrics.log_interval", str(max(1, steps // 6)), "--metrics.progress", "none",
            "--metrics.tensorboard", "false", "--metrics.plot", "false", *check.overrides]


def prepare_args(data_dir: Path) -> list[str]:
    return ["data", "prepare", TINY, "--data.dir", str(data_dir)]


def generate_args(run_dir: Path) -> list[str]:
    return ["generate", str(run_dir), "--prompt", "KING", "--device", "cuda", "--max-new-tokens", "24"]


def train_check(name: str, out: Path, data_dir: Path) -> tuple[Result, RunSummary]:
    check = TRAIN_CHECKS[name]
    t0 = time.perf_counter()
    rc, last = _run(_lmforge(train_args(name, out, data_dir), check.nproc), out / f"{name}.log", check.timeout)
    s = read_run(out / name)
    res = Result(name, "FAIL", s.losses[0] if s.losses else math.nan, s.losses[-1] if s.losses else math.nan,
                 s.tokens_per_s, s.mfu, time.perf_counter() - t0)
    if rc != 0:
        res.note = f"exit {rc}: {last} ({out / f'{name}.log'})"
        return res, s
    res.status, res.note = training_verdict(s, check.min_drop)
    return res, s


# -- in-process checks (run in a child process: `gpu_check.py --inner NAME OUT`) ----------------------


def inner_offload(out: Path, device: str = "cuda", precision: str = "bf16") -> dict:
    """FSDP2 with CPUOffloadPolicy on a one-rank mesh, process group "cpu:gloo,cuda:nccl": the
    sharded parameters and optimizer state live in pinned host memory, the step trains in bf16
    autocast. (`device` "cpu": the same code on a gloo group, where offload changes nothing; the
    unit tests run it so, in the `precision` the CPU runs natively: bf16 where it is emulated
    (AVX2) makes the 8 steps take minutes instead of seconds.)"""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.config import ModelConfig, ParallelConfig
    from lmforge.models.llama import build_model
    from lmforge.parallel.fsdp import FSDPPolicy, apply_fsdp
    from lmforge.train.precision import autocast_context

    dev = torch.device(device, 0) if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=8192, multiple_of=64, max_seq_len=256)
        model = build_model(cfg, dev, seed=0)
        mesh = init_device_mesh(dev.type, (1,), mesh_dim_names=("dp_shard",))
        apply_fsdp(model, mesh, FSDPPolicy.from_config(ParallelConfig(cpu_offload=True), dev))
        params = list(model.parameters())
        on_cpu = all(p.to_local().device.type == "cpu" for p in params)
        pinned = dev.type == "cuda" and all(p.to_local().is_pinned() for p in params)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        x = torch.randint(0, cfg.vocab_size, (8, 129), generator=torch.Generator().manual_seed(0)).to(dev)
        losses = []
        for _ in range(8):
            with autocast_context(precision, dev):
                logits = model(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        state_on_cpu = all(t.device.type == "cpu" for st in opt.state.values() for t in st.values()
                           if isinstance(t, torch.Tensor) and t.dim() > 0)
        return {"losses": losses, "params_on_cpu": on_cpu, "pinned": pinned, "optimizer_state_on_cpu": state_on_cpu}
    finally:
        dist.destroy_process_group()


def inner_grouped(out: Path, device: str = "cuda") -> dict:
    """The grouped expert matmul on CUDA in bf16 against the per-expert loop in fp32, and which
    path lmforge picks on this GPU (`device` "cpu": the same on CPU, as the unit tests run it)."""
    import torch

    from lmforge.models.common.moe import GroupedExperts, grouped_mm_path

    dev = torch.device(device)
    torch.manual_seed(0)
    ex = GroupedExperts(256, 512, 8).to(dev)
    ex.init_weights(0.02, 0.02)
    counts = torch.tensor([100, 0, 37, 250, 8, 64, 1, 52], device=dev)
    x = torch.randn(int(counts.sum()), 256, device=dev)
    with torch.no_grad():
        ref = ex.forward_loop(x, counts)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            got = ex(x, counts)
    err = float((got.float() - ref).abs().max() / ref.abs().max())
    capability = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    path = grouped_mm_path(dev.type, torch.bfloat16, False, capability)
    return {"path": path, "rel_err": err, "capability": list(capability or (0, 0))}


FLEX_TARGET = 0.85  # window's attended pairs per second / dense causal's


def per_pair_ratio(window_pairs: int, window_s: float, full_pairs: int, full_s: float) -> float:
    """How fast the window kernel attends one (query, key) pair relative to the dense causal kernel
    (1.0: as fast per attended pair; the window's speed-up over full is this x full / window pairs)."""
    return (window_pairs / window_s) / (full_pairs / full_s)


def _fwd_bwd_seconds(fn, q, k, v, repeats: int = 5) -> float:  # noqa: ANN001
    import torch

    for _ in range(2):  # compile and autotune outside the timing
        fn(q, k, v).sum().backward()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn(q, k, v).sum().backward()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def inner_flex_window(out: Path, n: int = 16384, w: int = 1024, heads: int = 16, head_dim: int = 128) -> dict:
    """Compiled flex_attention with the sliding-window block mask (`attend(backend="auto")` on CUDA,
    the block mask built every call as in the model) against SDPA's causal kernel, bf16."""
    import torch
    import torch.nn.functional as F

    from lmforge.models.common.sparse_attention import AttnSpec, attend, blocked_attention
    from lmforge.observability.flops import attended_pairs

    dev = torch.device("cuda", 0)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, device=dev, dtype=torch.bfloat16, generator=g, requires_grad=True)
               for _ in range(3))
    spec = AttnSpec("window", w)
    small = [t.detach()[:, :, :2048].float() for t in (q, k, v)]
    with torch.no_grad():
        err = float((attend(*small, spec) - blocked_attention(*small, spec)).abs().max())
    window_s = _fwd_bwd_seconds(lambda a, b, c: attend(a, b, c, spec), q, k, v)
    full_s = _fwd_bwd_seconds(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v)
    ratio = per_pair_ratio(attended_pairs("window", n, w), window_s, attended_pairs("full", n), full_s)
    return {"window_s": window_s, "full_s": full_s, "per_pair_ratio": ratio, "max_err_vs_blocked": err}


INNER = {"offload": inner_offload, "grouped": inner_grouped, "flex-window": inner_flex_window}


def run_inner(name: str, out: Path, timeout: float = 240) -> tuple[dict | None, str]:
    result = out / f"inner-{name}.json"
    rc, last = _run([sys.executable, str(Path(__file__).resolve()), "--inner", name, str(out)],
                    out / f"inner-{name}.log", timeout)
    if rc != 0 or not result.is_file():
        return None, f"exit {rc}: {last} ({out / f'inner-{name}.log'})"
    return json.loads(result.read_text()), ""


# -- the checks -------------------------------------------------------------------------------------


CHECKS = ("tiny-dense-bf16", "fp16-loss-scaling", "compile", "cpu-offload", "moe-grouped", "1b-dense", "flex-window")


def run_checks(out: Path, only: set[str]) -> list[Result]:
    import torch

    data = out / "data"
    results: list[Result] = []
    t0 = time.perf_counter()
    rc, last = _run(_lmforge(prepare_args(data)), out / "data.log", 600)
    if rc != 0:
        return [Result("data-prepare", "FAIL", seconds=time.perf_counter() - t0, note=f"exit {rc}: {last}")]
    bf16: RunSummary | None = None

    if "tiny-dense-bf16" in only:
        res, bf16 = train_check("tiny-dense-bf16", out, data)
        if res.status == "PASS":
            rc, last = _run(_lmforge(generate_args(out / "tiny-dense-bf16")), out / "generate.log", 120)
            if rc != 0:
                res.status, res.note = "FAIL", f"generate on cuda: exit {rc}: {last}"
            else:
                res.note += "; generate ok"
        results.append(res)
    if "fp16-loss-scaling" in only:
        res, s = train_check("fp16-loss-scaling", out, data)
        if res.status == "PASS" and not (s.loss_scales and min(s.loss_scales) > 1.0):
            res.status, res.note = "FAIL", f"loss scale {s.loss_scales[-1:] or 'not logged'}"
        elif res.status == "PASS":
            res.note += f"; loss scale {s.loss_scales[-1]:.0f}"
        results.append(res)
    if "compile" in only:
        res, s = train_check("compile", out, data)
        if res.status == "PASS" and bf16 is not None and bf16.losses:
            gap = abs(s.losses[-1] - bf16.losses[-1]) / abs(bf16.losses[-1])
            if gap > 0.05:
                res.status = "FAIL"
            res.note += f"; last loss {gap:.1%} from eager"
        results.append(res)
    if "cpu-offload" in only:
        if torch.cuda.device_count() >= 2:
            res, _ = train_check("cpu-offload", out, data)
            res.note += "; trainer, 2 GPUs"
        else:
            t1 = time.perf_counter()
            got, err = run_inner("offload", out)
            res = Result("cpu-offload", "FAIL", seconds=time.perf_counter() - t1)
            if got is None:
                res.note = err
            else:
                res.first_loss, res.last_loss = got["losses"][0], got["losses"][-1]
                ok = got["params_on_cpu"] and got["pinned"] and got["optimizer_state_on_cpu"]
                res.status, res.note = training_verdict(RunSummary(losses=got["losses"]), 0.5)
                if not ok:
                    res.status = "FAIL"
                res.note += (f"; 1 GPU, one-rank FSDP2 mesh; params on cpu {got['params_on_cpu']}, pinned "
                             f"{got['pinned']}, optimizer state on cpu {got['optimizer_state_on_cpu']}")
        results.append(res)
    if "moe-grouped" in only:
        res, _ = train_check("moe-grouped", out, data)
        got, err = run_inner("grouped", out)
        if got is None:
            res.status, res.note = "FAIL", f"{res.note}; grouped kernel check: {err}"
        else:
            if got["rel_err"] > 0.02:  # bf16 against fp32: ~0.5% of the largest output on CPU
                res.status = "FAIL"
            res.note += f"; sm{got['capability'][0]}{got['capability'][1]}: {got['path']}, bf16 err {got['rel_err']:.2%}"
        results.append(res)
    if "1b-dense" in only:
        res, _ = train_check("1b-dense", out, data)
        res.note += "; tokens/s and MFU of the last 5 steps"
        results.append(res)
    if "flex-window" in only:
        t1 = time.perf_counter()
        got, err = run_inner("flex-window", out, timeout=420)
        res = Result("flex-window", "FAIL", seconds=time.perf_counter() - t1, note=err)
        if got is not None:
            ok = got["per_pair_ratio"] >= FLEX_TARGET and got["max_err_vs_blocked"] <= 1e-4
            res.status = "PASS" if ok else "FAIL"
            res.note = (f"16k tokens, w 1024: window {got['window_s'] * 1e3:.1f} ms, full causal "
                        f"{got['full_s'] * 1e3:.1f} ms; per attended pair {got['per_pair_ratio']:.2f}x dense "
                        f"(target {FLEX_TARGET}); max |flex - blocked| {got['max_err_vs_blocked']:.1e}")
        results.append(res)
    return results


def format_table(results: list[Result]) -> str:
    def num(v: float, fmt: str) -> str:
        return "-" if not math.isfinite(v) else format(v, fmt)

    rows = [("check", "result", "loss first -> last", "tokens/s", "MFU", "time", "note")]
    for r in results:
        rows.append((r.name, r.status, f"{num(r.first_loss, '.2f')} -> {num(r.last_loss, '.2f')}",
                     num(r.tokens_per_s, ",.0f"), num(r.mfu * 100, ".1f") + ("%" if math.isfinite(r.mfu) else ""),
                     f"{r.seconds:.0f} s", r.note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="working directory (default: a new temp directory)")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of: {', '.join(CHECKS)}")
    p.add_argument("--inner", nargs=2, metavar=("NAME", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    only = {c.strip() for c in args.only.split(",") if c.strip()}
    unknown = sorted(only - set(CHECKS))
    if unknown:
        print(f"gpu_check: --only {','.join(unknown)}: unknown; allowed are {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    if args.inner:
        name, out = args.inner
        result = INNER[name](Path(out))
        (Path(out) / f"inner-{name}.json").write_text(json.dumps(result))
        return 0

    out = args.out or Path(tempfile.mkdtemp(prefix="lmforge-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"gpu_check: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}; logs in {out}", flush=True)
    results = run_checks(out, only)
    print(format_table(results))
    print(f"gpu_check: {time.perf_counter() - start:.0f} s in all")
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

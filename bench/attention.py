"""Attention forward + backward time against sequence length on CPU: full causal (SDPA's causal
flash kernel, the named baseline) and sliding window (lmforge/models/common/sparse_attention.py:
blocked_attention), same run, interleaved so machine noise hits both alike.

Two checks (issue 13): the exponent of a least-squares fit of log(time) against log(length) for
the sliding window is at most `--max-exponent` (1.15: linear cost, O(n * w), not a masked O(n^2)),
and at the longest length the window is at least `--min-ratio` (4x) faster than full. Exit 1 when
either misses. One head layout of the tiny model (4 heads of 64, GQA off, batch 1, fp32); each
figure is the best of `--repeats` runs. `--topk` adds top-k sparse (window + 4 blocks of 64) as a
third, informative row. Default: 1k..16k, w = 512, 2 repeats: ~2 minutes on 2 shared cores.

    .venv/bin/python bench/attention.py [--lengths 1024,2048,4096,8192,16384] [--window 512]
                                        [--repeats 2] [--min-ratio 4] [--max-exponent 1.15] [--topk]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _check import verdict  # noqa: E402


def fwd_bwd_seconds(fn, n: int, heads: int, kv_heads: int, head_dim: int, repeats: int) -> float:
    import torch

    g = torch.Generator().manual_seed(n)
    q = torch.randn(1, heads, n, head_dim, generator=g, requires_grad=True)
    k = torch.randn(1, kv_heads, n, head_dim, generator=g, requires_grad=True)
    v = torch.randn(1, kv_heads, n, head_dim, generator=g, requires_grad=True)
    grad = torch.randn(1, heads, n, head_dim, generator=g)
    best = math.inf
    for _ in range(repeats):
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        fn(q, k, v).backward(grad)
        best = min(best, time.perf_counter() - t0)
    return best


def fit_exponent(lengths: list[int], seconds: list[float]) -> float:
    """Slope of log(seconds) against log(length), least squares."""
    xs, ys = [math.log(n) for n in lengths], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--min-ratio", type=float, default=4.0)
    ap.add_argument("--max-exponent", type=float, default=1.15)
    ap.add_argument("--topk", action="store_true", help="also time top-k sparse (window + 4 blocks of 64)")
    args = ap.parse_args()

    import torch

    from lmforge.models.common.sparse_attention import AttnSpec, blocked_attention

    lengths = [int(x) for x in args.lengths.split(",")]
    variants = {"full": AttnSpec("full"), f"window {args.window}": AttnSpec("window", args.window)}
    if args.topk:
        variants[f"topk w{args.window} k4 B64"] = AttnSpec("topk", args.window, 4, 64)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; heads {args.heads}/{args.kv_heads} x {args.head_dim}, batch 1, fp32",
          flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    print(f"{'length':>7} " + " ".join(f"{name:>22}" for name in variants) + f" {'full/window':>12}", flush=True)
    for n in lengths:
        for name, spec in variants.items():  # interleaved per length: noise hits all variants alike
            times[name].append(fwd_bwd_seconds(lambda q, k, v, s=spec: blocked_attention(q, k, v, s), n,
                                               args.heads, args.kv_heads, args.head_dim, args.repeats))
        window = times[f"window {args.window}"][-1]
        print(f"{n:>7} " + " ".join(f"{times[name][-1]:>21.3f}s" for name in variants)
              + f" {times['full'][-1] / window:>11.2f}x", flush=True)
    exps = {name: fit_exponent(lengths, t) for name, t in times.items()}
    print("fitted exponent (time ~ length^e): " + ", ".join(f"{k} {v:.3f}" for k, v in exps.items()), flush=True)
    if len(lengths) > 3:  # without the short lengths, where fixed per-call costs flatten the fit
        tail = {name: fit_exponent(lengths[-3:], t[-3:]) for name, t in times.items()}
        print(f"exponent over {lengths[-3]}..{lengths[-1]}: " + ", ".join(f"{k} {v:.3f}" for k, v in tail.items()),
              flush=True)
    win_exp = exps[f"window {args.window}"]
    exp_ok = win_exp <= args.max_exponent
    print(f"attention: sliding-window exponent = {win_exp:.3f}; target <= {args.max_exponent:g}: "
          f"{'PASS' if exp_ok else 'FAIL'}", flush=True)
    ratio = times["full"][-1] / times[f"window {args.window}"][-1]
    status = verdict("attention", f"full causal SDPA at {lengths[-1]}", f"full/window{args.window} time", ratio,
                     args.min_ratio)
    if not exp_ok:
        print(f"FAIL: attention: window exponent {win_exp:.3f} > {args.max_exponent:g}", file=sys.stderr)
    return max(status, 0 if exp_ok else 1)


if __name__ == "__main__":
    sys.exit(main())

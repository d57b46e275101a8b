"""Async checkpoint stall vs synchronous save, on a ~50M-parameter Llama + AdamW state (fp32).

Acceptance (issue 5): the time the step loop is blocked by an async save must be <= 10% of the
synchronous save time (the named baseline): the check is sync / stall >= `--min-ratio` (default 10),
exit 1 below. Both modes use the same CheckpointManager (DCP FileSystemWriter, sha256
manifest, atomic rename); runs are interleaved (sync, async, sync, ...) so machine noise hits
both alike, and medians are compared. Also prints the size ratio of zstd / bf16 / int8 moments /
incremental (frozen embeddings) on the same state, and their save times.

    PYTHONPATH=. python bench/ckpt_async.py [--reps 3] [--dir /tmp/ckpt-bench] [--min-ratio 10] [--skip-sizes]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.checkpoint.manager import CheckpointManager
from lmforge.checkpoint.state import ModelOptimizerState
from lmforge.config import ModelConfig
from lmforge.models.llama.model import Transformer
from lmforge.storage.layout import MANIFEST

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402

TARGET = 10.0  # sync save time / async stall: the stall is <= 10% of a synchronous save


def build(seed: int = 0) -> tuple[Transformer, torch.optim.Optimizer, int]:
    cfg = ModelConfig(dim=512, n_layers=10, n_heads=8, vocab_size=16384, multiple_of=256, max_seq_len=64)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (1, 17))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()  # AdamW state exists (exp_avg, exp_avg_sq): ~3x the weights
    return model, opt, sum(p.numel() for p in model.parameters())


def size(path: Path) -> int:
    return json.loads((path / MANIFEST).read_text())["bytes"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir on local disk)")
    ap.add_argument("--min-ratio", type=float, default=TARGET,
                    help=f"exit 1 if sync save / async stall is below this (default {TARGET:g})")
    ap.add_argument("--skip-sizes", action="store_true", help="skip the storage-mode size table (not checked)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    model, opt, n = build()
    state = {"app": ModelOptimizerState(model, opt)}
    state_mib = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3 / 2**20
    print(f"model: {n / 1e6:.1f}M parameters; model + AdamW state ~{state_mib:.0f} MiB fp32; "
          f"torch threads {torch.get_num_threads()}")

    sync = CheckpointManager(root / "sync", keep_last=1)
    asyn = CheckpointManager(root / "async", keep_last=1, async_save=True)
    tokens = torch.randint(0, 16384, (8, 65), generator=torch.Generator().manual_seed(0))

    def train_step() -> float:
        """One real step; returns its time. opt.step() first waits (pre-hook) for the async copy."""
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    sync_s, stall_s, total_s, step_s = [], [], [], []
    for rep in range(args.reps + 1):  # rep 0 warms up (allocations, page cache, staging buffers)
        t0 = time.perf_counter()
        sync.save(rep, state)
        dt = time.perf_counter() - t0
        plain_step = train_step()
        asyn.save(rep, state)
        step_during = train_step()  # training goes on while the copy and the write run
        asyn.wait()
        rec = asyn.stats()[-1]  # stall_s = the save call + the optimizer hook's wait for the copy
        if rep:
            sync_s.append(dt)
            stall_s.append(rec["stall_s"])
            total_s.append(rec["total_s"])
            step_s.append((plain_step, step_during))
        print(f"  rep {rep}{' (warm-up)' if not rep else ''}: sync save {dt:.3f} s | async stall {rec['stall_s']:.3f} s, "
              f"total {rec['total_s']:.3f} s | train step {plain_step:.2f} s alone, {step_during:.2f} s during the "
              f"async save")
    asyn.close()
    s, a, t = statistics.median(sync_s), statistics.median(stall_s), statistics.median(total_s)
    print(f"sync save {s:.3f} s; async stall {a:.3f} s, async total {t:.3f} s; "
          f"stall / sync = {a / s:.3f}")
    status = verdict("ckpt_async", "synchronous save", "sync save / async stall", s / max(a, 1e-9), args.min_ratio)
    if args.skip_sizes:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
        return status

    base = size(root / "sync" / f"step-{args.reps:08d}")
    print(f"sizes relative to the plain fp32 checkpoint ({base / 2**20:.0f} MiB):")
    for name, kw in [("zstd", {"compression": "zstd"}), ("bf16 moments", {"optimizer_states": "bf16"}),
                     ("int8 moments", {"optimizer_states": "int8"}),
                     ("int8 moments + zstd", {"optimizer_states": "int8", "compression": "zstd"})]:
        t0 = time.perf_counter()
        p = CheckpointManager(root / name.replace(" ", "_"), keep_last=1, **kw).save(0, state)
        print(f"  {name:<22} ratio {size(p) / base:.3f}   save {time.perf_counter() - t0:.2f} s")
    model.tok_embeddings.weight.requires_grad_(False)  # frozen embeddings + output head: fine-tuning
    model.output.weight.requires_grad_(False)
    inc = CheckpointManager(root / "incremental", keep_last=2, full_every=4)
    inc.save(1, state)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1e-3)
    t0 = time.perf_counter()
    p = inc.save(2, state)
    print(f"  {'incremental (frozen emb)':<22} ratio {size(p) / base:.3f}   save {time.perf_counter() - t0:.2f} s")
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

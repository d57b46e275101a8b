"""Training throughput: lmforge's Llama against transformers.LlamaForCausalLM, same run, interleaved.

Both models have the same shape (6 layers, width 384, 6 heads, no GQA, SwiGLU hidden 1024,
vocabulary 8192, untied, context 256, batch 8), start from the SAME weights (ours, exported
through lmforge.interop.hf), train on the same random token batches with the same dtype
policy and the same AdamW. `--dtype bf16`: fp32 master weights under torch.autocast("cpu",
bfloat16); `--dtype fp32`: plain fp32, no autocast. The default is what lmforge's `auto`
precision picks on this CPU: bf16 where the CPU has native bf16 (AVX512_BF16 or AMX), fp32
elsewhere (AVX2-only CPUs run bf16 matmuls ~100x slower than fp32). One step is:
forward, loss, backward, clip_grad_norm_(1.0), optimizer step, zero_grad.

The loss (`--loss`, default `library`): each library computes its own loss as its users get it,
lmforge the chunked fp32 cross-entropy as its trainer calls it (`lmforge.models.common.cross_entropy`,
gradient written into the logits), HF its `labels=` path (`ForCausalLMLoss`, given `shift_labels`
so both score the same 2048 tokens).
With `--loss same` both models' logits go through one function (logits -> float ->
F.cross_entropy), so the comparison is model against model alone.

Each model trains in a process of its own, so each runs with its library's process settings and
neither inherits the other's heap (`--allocator`, default `library`): lmforge with what its trainer
sets on a CPU run (`train.host_allocator = "auto"`: glibc keeps freed memory, train/host_allocator.py),
transformers with malloc as the process started, as its users run it. `kept` gives both lmforge's
setting and `system` neither: model against model. The faults/step column shows what the setting does.

The machine may be shared and noisy, so the models take turns: after a warm-up, each round times
`--steps` steps of every model, the order alternating (A B, B A, ...), and the report gives the
median tokens/s over rounds. MFU = tokens/s x training FLOPs per token / measured peak.

    python bench/train_throughput.py --rounds 12 --steps 4 [--dtype fp32|bf16] [--compile] [--loss same|library]
        [--allocator library|kept|system] [--threads 2] [--min-ratio 1.1]

Exit 1 when lmforge/hf (ratio of the medians) is below `--min-ratio` (default: the target, 1.1).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge.compress.torchao_import import IMPORT_NOTICE_LOGGERS, loggers_silenced
from lmforge.config import ModelConfig
from lmforge.interop.hf.registry import to_hf_config, to_hf_state_dict
from lmforge.models.llama import build_model
from lmforge.observability.flops import training_flops_per_token as count_training_flops
from lmforge.observability.metrics import stale_peak_warning
from lmforge.observability.peak import resolve_peak_flops
from lmforge.tensors.dtypes import DTYPES
from lmforge.train.host_allocator import configure_host_allocator
from lmforge.train.precision import choose_precision, detect_hardware

BATCH, SEQ = 8, 256
MODEL = ModelConfig(dim=384, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=8192, ffn_hidden=1024,
                    max_seq_len=SEQ, tie_embeddings=False)
ADAMW = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
TARGET_RATIO = 1.1  # lmforge / hf tokens/s (issue 9)
NAMES = ("lmforge", "hf", "lmforge+compile")
# --allocator -> which contestants keep freed memory (train.host_allocator "auto") instead of malloc as started
ALLOCATORS = {"library": ("lmforge", "lmforge+compile"), "kept": NAMES, "system": ()}


def default_dtype() -> str:
    """What lmforge's `mixed_precision = "auto"` resolves to on this CPU (lmforge.train.precision):
    bf16 with native bf16 that oneDNN may use, else fp32."""
    return choose_precision("auto", detect_hardware("cpu")).mode


def training_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    return count_training_flops(cfg, seq)


def peak_flops(dtype: torch.dtype) -> float:
    """Measured matmul peak of this CPU in `dtype` on the threads in use (cached by observability.peak)."""
    return resolve_peak_flops("cpu", dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


@dataclass
class Contestant:
    name: str
    model: torch.nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs, targets) -> mean loss
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        params = list(self.model.parameters())
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, **ADAMW, **optimizer_impl())

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def optimizer_impl() -> dict[str, bool]:
    """fused AdamW where this torch has it for CPU, else foreach; the same for every model."""
    try:
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.zeros(2)
        torch.optim.AdamW([p], fused=True).step()
        return {"fused": True}
    except (RuntimeError, TypeError):
        return {"foreach": True}


def autocast(dtype: str) -> contextlib.AbstractContextManager:
    """bf16: torch.autocast on CPU (fp32 master weights); fp32: no autocast at all."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def model_then_loss(model: Callable[[torch.Tensor], torch.Tensor],
                    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
                    dtype: str = "bf16") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Forward under the dtype policy, then the loss outside it (as lmforge's trainer does)."""
    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(dtype):
            logits = model(x)
        return loss(logits, y)
    return step


def build_contestant(name: str, loss_mode: str = "library", dtype: str = "bf16") -> Contestant:
    """One of NAMES, from lmforge's seed-0 weights (HF through lmforge.interop.hf)."""
    ours = build_model(MODEL, seed=0).train()
    if loss_mode == "library":
        from lmforge.models.common.cross_entropy import cross_entropy as chunked_cross_entropy

        def lmforge_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return chunked_cross_entropy(logits, y, overwrite_logits=True)  # as the trainer calls it
    else:
        lmforge_loss = cross_entropy
    if name == "lmforge":
        return Contestant(name, ours, model_then_loss(ours, lmforge_loss, dtype))
    if name == "lmforge+compile":
        from lmforge.parallel.compile import apply_compile

        apply_compile(ours)
        # the same loss as the eager lmforge contestant: the two differ only in compilation
        return Contestant(name, ours, model_then_loss(ours, lmforge_loss, dtype))
    if name != "hf":
        raise ValueError(f"contestant {name!r}: one of {NAMES}")
    # transformers imports torchao (lazily, with the model class) where installed: no notices in the report
    with loggers_silenced(IMPORT_NOTICE_LOGGERS):
        import transformers

        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in to_hf_config(MODEL).items()
                                             if k not in ("architectures", "model_type", "torch_dtype", "dtype")},
                                          attn_implementation="sdpa")
        hf = transformers.LlamaForCausalLM(hf_cfg).float().train()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), MODEL), strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise RuntimeError(f"weights do not map onto HF: missing {missing}, unexpected {unexpected}")
    assert hf.config._attn_implementation == "sdpa", hf.config._attn_implementation
    if loss_mode == "library":
        def hf_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with autocast(dtype):
                return hf(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
    else:
        hf_loss = model_then_loss(lambda x: hf(input_ids=x, use_cache=False).logits, dtype=dtype)
    return Contestant("hf", hf, hf_loss)


def build_contestants(compile_: bool, loss_mode: str = "library", dtype: str = "bf16") -> list[Contestant]:
    """lmforge and hf (and lmforge+compile) in this process, for tests and other benchmarks."""
    return [build_contestant(n, loss_mode, dtype) for n in NAMES[:3 if compile_ else 2]]


def batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, MODEL.vocab_size, (n, BATCH, SEQ + 1), generator=g)
    return [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]


def run(c: Contestant, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds for the steps over `data` (the loss is read once at the end, like a logger would)."""
    t0 = time.perf_counter()
    loss = None
    for x, y in data:
        loss = c.step(x, y)
    float(loss)
    return time.perf_counter() - t0


def contestant_process(conn, name: str, loss_mode: str, dtype: str, threads: int | None, keep_memory: bool,
                       steps: int, warmup: int) -> None:
    """One contestant's process: build it, take the first step (its loss) and the warm-up, then
    time `steps` steps whenever the parent says "run" and answer (seconds, minor page faults per step)."""
    if threads:
        torch.set_num_threads(threads)
    allocator = configure_host_allocator("auto" if keep_memory else "system", "cpu")
    c = build_contestant(name, loss_mode, dtype)
    data = batches(steps, seed=1)
    first_loss = float(c.step(*data[0]))  # same weights, same first batch: must agree across contestants
    run(c, batches(warmup, seed=2))
    conn.send((first_loss, allocator.mode, torch.get_num_threads()))
    while conn.recv() == "run":
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = run(c, data)
        conn.send((seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps))


class Contender:
    """The parent's handle on a contestant process: its tokens/s and page faults per step, per round."""

    def __init__(self, name: str, args: argparse.Namespace, dtype: str):
        self.name = name
        self.rates: list[float] = []
        self.faults: list[float] = []
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=contestant_process, daemon=True, args=(
            child, name, args.loss, dtype, args.threads, name in ALLOCATORS[args.allocator], args.steps, args.warmup))
        self.process.start()

    def ready(self) -> None:
        self.first_loss, self.allocator, self.threads = self.conn.recv()

    def time_round(self, tokens: int) -> None:
        self.conn.send("run")
        seconds, faults = self.conn.recv()
        self.rates.append(tokens / seconds)
        self.faults.append(faults)

    def close(self) -> None:
        self.conn.send("stop")
        self.process.join(timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="training steps per model per round")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (models alternate each round)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd lmforge (reported separately)")
    ap.add_argument("--loss", choices=["same", "library"], default="library",
                    help="library (default): each library's own loss; same: one loss function for both (model vs model)")
    ap.add_argument("--allocator", choices=list(ALLOCATORS), default="library",
                    help="library (default): lmforge keeps freed memory as its trainer does, HF runs malloc as "
                         "started; kept: both keep it; system: neither (model vs model)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="fp32 (no autocast) or bf16 (autocast, fp32 master weights); default: what lmforge's "
                         f"`auto` precision picks on this CPU ({default_dtype()} here)")
    ap.add_argument("--min-ratio", type=float, default=TARGET_RATIO,
                    help=f"exit 1 if lmforge/hf is below this (default: the target, {TARGET_RATIO})")
    args = ap.parse_args(argv)
    dtype = args.dtype or default_dtype()

    contestants = [Contender(name, args, dtype) for name in NAMES[:3 if args.compile else 2]]
    try:
        for c in contestants:
            c.ready()
        tokens = args.steps * BATCH * SEQ
        for r in range(args.rounds):
            for c in contestants if r % 2 == 0 else contestants[::-1]:
                c.time_round(tokens)
            print(f"round {r + 1:>2}/{args.rounds}: " + "  ".join(f"{c.name} {c.rates[-1]:,.0f}" for c in contestants),
                  file=sys.stderr, flush=True)
    finally:
        for c in contestants:
            if c.process.is_alive():
                c.close()

    if args.threads:
        torch.set_num_threads(args.threads)
    flops_tok = training_flops_per_token(MODEL, SEQ)
    peak = peak_flops(DTYPES[dtype])
    print(f"\nmodel: {MODEL.n_layers} layers, dim {MODEL.dim}, {MODEL.n_heads} heads (kv {MODEL.kv_heads}), "
          f"ffn {MODEL.ffn_hidden_size}, vocab {MODEL.vocab_size}, untied; batch {BATCH} x seq {SEQ}; "
          f"{'bf16 autocast, fp32 master weights' if dtype == 'bf16' else 'fp32, no autocast'}, "
          f"loss: {args.loss}, AdamW {optimizer_impl()}; torch {torch.__version__}, "
          f"{contestants[0].threads} threads, one process per model")
    print(f"allocator: {args.allocator} (" + ", ".join(f"{c.name} {c.allocator}" for c in contestants) + ")")
    print(f"training FLOPs/token {flops_tok / 1e6:.1f} M; peak (measured {dtype} matmul) {peak / 1e9:.0f} GFLOP/s; "
          f"{args.rounds} rounds x {args.steps} steps, medians\n")
    print(f"{'model':<16} {'tokens/s':>9} {'min':>8} {'max':>8} {'MFU':>6} {'faults/step':>12} {'first loss':>11}")
    med = {}
    for c in contestants:
        med[c.name] = statistics.median(c.rates)
        print(f"{c.name:<16} {med[c.name]:>9,.0f} {min(c.rates):>8,.0f} {max(c.rates):>8,.0f} "
              f"{med[c.name] * flops_tok / peak:>6.1%} {statistics.median(c.faults):>12,.0f} {c.first_loss:>11.4f}")
    warning = stale_peak_warning(max(med.values()) * flops_tok / peak, peak)
    if warning:
        print(warning)
    paired = statistics.median(a / b for a, b in zip(contestants[0].rates, contestants[1].rates))
    ratio = med["lmforge"] / med["hf"]
    print(f"\nmedian of per-round ratios lmforge/hf = {paired:.2f}x")
    if args.compile:
        print(f"ratio lmforge+compile/hf = {med['lmforge+compile'] / med['hf']:.2f}x")
    print(f"ratio lmforge/hf = {ratio:.2f}x")
    if ratio < args.min_ratio:
        print(f"FAIL: ratio {ratio:.2f} < --min-ratio {args.min_ratio}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

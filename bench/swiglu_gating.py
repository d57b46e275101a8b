"""SwiGLU's gating in the whole model: lmforge's `silu_mul` against autograd's silu(gate) * up.

`models/common/mlp.py: silu_mul` keeps gate and up for backward and recomputes silu(gate) there;
autograd's graph of `F.silu(gate) * up` (the named baseline) keeps silu(gate) as well. Two copies
of bench/train_throughput.py's model (6 layers, width 384, SwiGLU hidden 1024, batch 8 x 256),
the same weights and batches, differ only in the gating.

- Memory: the bytes autograd saves over one training forward (lmforge's ActivationMeter, what the
  trainer reports), baseline / silu_mul. The verdict: at least `--min-ratio` (default 1.05;
  measured 1.11x in bf16 and 1.13x in fp32 on a Zen 4: each block keeps one (tokens x 1024)
  tensor fewer, while the logits and the rest of the block stay).
- Speed: the models take turns (A B, B A, ...) for `--rounds` rounds of `--steps` steps; the median
  of the per-round ratios silu_mul / baseline must be at least `--min-speed` (default 0.93: the
  gating is not meant to be faster; this catches a slowdown beyond this machine's noise, paired
  ratios of 0.97-1.02 measured).
- The final weights of both models must be equal bit for bit (the same kernels in the same order).

    PYTHONPATH=. python bench/swiglu_gating.py [--dtype bf16|fp32] [--rounds 12] [--steps 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.models.common.cross_entropy import cross_entropy
from lmforge.models.common.linear import fused_linear
from lmforge.models.common.mlp import SwiGLU
from lmforge.models.llama import build_model
from lmforge.observability.memory import ActivationMeter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402
from train_throughput import BATCH, MODEL, SEQ, Contestant, batches, default_dtype, model_then_loss, run  # noqa: E402

TARGET = 1.05  # activation bytes, autograd's gating / silu_mul
MIN_SPEED = 0.93  # step time ratio autograd / silu_mul (paired median): silu_mul at most ~7% slower


def autograd_gating(self: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU.forward with the gating left to autograd (the baseline)."""
    gate, up = fused_linear(x, (self.w1, self.w3), self.kernels)
    return self.w2(F.silu(gate) * up)


def contestant(name: str, dtype: str) -> Contestant:
    model = build_model(MODEL, seed=0).train()
    if name == "autograd":
        for m in model.modules():
            if isinstance(m, SwiGLU):
                m.forward = types.MethodType(autograd_gating, m)
    loss = model_then_loss(model, lambda logits, y: cross_entropy(logits, y, overwrite_logits=True), dtype)
    return Contestant(name, model, loss)


def saved_bytes(c: Contestant, x: torch.Tensor, y: torch.Tensor) -> int:
    meter = ActivationMeter([c.model])
    with meter.measure():
        loss = c.loss(x, y)
    loss.backward()
    c.model.zero_grad(set_to_none=True)
    return meter.bytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help=f"default: what lmforge's `auto` precision picks on this CPU ({default_dtype()} here)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--min-ratio", type=float, default=TARGET)
    ap.add_argument("--min-speed", type=float, default=MIN_SPEED)
    args = ap.parse_args(argv)
    dtype = args.dtype or default_dtype()
    base, ours = contestant("autograd", dtype), contestant("silu_mul", dtype)
    data = batches(args.steps, seed=1)
    memory = {c.name: saved_bytes(c, *data[0]) for c in (base, ours)}
    for c in (base, ours):  # warm-up: also the kernel choice of the fp32 layers
        run(c, batches(2, seed=2))
    times: dict[str, list[float]] = {"autograd": [], "silu_mul": []}
    for r in range(args.rounds):
        for c in ((base, ours) if r % 2 == 0 else (ours, base)):
            times[c.name].append(run(c, data))
    same = all(torch.equal(a, b) for a, b in zip(base.model.state_dict().values(), ours.model.state_dict().values()))
    tokens = args.steps * BATCH * SEQ
    print(f"SwiGLU gating, model {MODEL.n_layers} layers, dim {MODEL.dim}, ffn {MODEL.ffn_hidden_size}, "
          f"batch {BATCH} x {SEQ}, {dtype}, threads {torch.get_num_threads()}, {args.rounds} rounds x {args.steps} steps")
    for name in times:
        print(f"  {name:<9} saved for backward {memory[name] / 2**20:7.1f} MiB   "
              f"median {tokens / statistics.median(times[name]):8,.0f} tokens/s")
    print(f"  final weights equal bit for bit: {same}")
    speed = statistics.median(a / b for a, b in zip(times["autograd"], times["silu_mul"]))
    status = verdict("swiglu_gating_speed", "autograd's silu(gate) * up", f"step time, autograd / silu_mul ({dtype})",
                     speed, args.min_speed)
    status |= verdict("swiglu_gating", "autograd's silu(gate) * up",
                      f"activation bytes, autograd / silu_mul ({dtype})",
                      memory["autograd"] / memory["silu_mul"] if same else float("nan"), args.min_ratio)
    return status


if __name__ == "__main__":
    sys.exit(main())

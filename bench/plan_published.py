"""Published training figures reproduced by the planner's arithmetic (lmforge.plan.scaling,
failures, cost), each within 15%, with its inputs and where an efficiency was fitted, to what.

Points (sources and every assumption in docs/planner.md):
  A. torchtitan, Llama 3.1 8B, 8 x H100, FSDP, bf16, no compile: 5,762 tokens/s/GPU. The kernel
     efficiency is fitted to torchtitan's 128-GPU run of the same model (5,605), not to this point.
  B. Megatron-LM, GPT-3 175B on H100, strong scaling 96 -> 4,608 GPUs at 1,152 x 2,048 tokens:
     47% -> 42% MFU. The efficiency is fitted to the 47% point (so A's analogue is circular there,
     said so); the check is the 42% at 4,608 GPUs from the pipeline-bubble and traffic terms.
  C. MoE, DeepSeek-V3 on 1,024 H100 (Megatron-Bridge 25.09): 1,297 tokens/s/GPU at 338 model
     TFLOP/s/GPU: our MoE FLOP count (37B active, MLA attention) turns one into the other.
  D. Llama 3 405B reliability: 16,384 H100, 54 days, 419 unexpected interruptions, > 90%
     effective training time: the failure model's goodput with the paper's inputs.
Also written (no published counterpart): weak/strong scaling tables 8 -> 16,384 and their PNGs,
the checkpoint interval table (Young, Daly, simulated optimum) and a spot/reserved cost table.

    PYTHONPATH=. python bench/plan_published.py [--out docs/plan] [--runs 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmforge.plan.cost import Pricing, cheapest  # noqa: E402
from lmforge.plan.failures import (  # noqa: E402
    CheckpointTier,
    FailureModel,
    best_interval,
    daly_interval,
    reliability,
    simulate,
)
from lmforge.plan.scaling import (  # noqa: E402
    AnalyticStepModel,
    goodput_fn,
    markdown_table,
    strong_scaling,
    weak_scaling,
    write_scaling_plot,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402

TOLERANCE = 0.15
H100_BF16 = 989.4e12  # dense bf16 peak, SXM (the MFU denominator of all three sources)


def flops_per_token(params: float, layers: int, heads: int, qk_dim: int, v_dim: int, seq: int) -> float:
    """6 x non-embedding params + attention scores and values over the whole sequence (the
    non-causal count torchtitan's and Megatron's MFU use): 6 L s H (d_qk + d_v)."""
    return 6 * params + 6 * layers * seq * heads * (qk_dim + v_dim)


def point_a() -> tuple[float, float]:
    """torchtitan Llama 3.1 8B: fit at 128 GPUs, predict 8."""
    n = 8.03e9 - 128_256 * 4096  # non-embedding (torchtitan counts 6N without the embedding)
    fpt = flops_per_token(n, 32, 32, 128, 128, 8192)
    tokens_per_gpu = 2 * 8192  # local batch 2
    fitted_mfu = 5605 * fpt / H100_BF16
    model = AnalyticStepModel(flops_per_token=fpt, params=8.03e9, peak_flops=H100_BF16, efficiency=fitted_mfu,
                              seq_len=8192, micro_batch=2, grad_bytes=2.0, dp_volume=4.0,  # bf16 AG x2 + fp32 RS
                              overlap=1.0)
    pred = tokens_per_gpu / model.step_s(8, 8 * tokens_per_gpu)
    print(f"A torchtitan 8B: flops/token {fpt:.3g}, efficiency fitted at 128 GPUs {fitted_mfu:.3f}; "
          f"predicted at 8 GPUs {pred:,.0f} tokens/s/GPU vs published 5,762")
    return pred, 5762.0


def megatron_model(vpp: int) -> AnalyticStepModel:
    n = 175e9
    fpt = flops_per_token(n, 96, 96, 128, 128, 2048)
    return AnalyticStepModel(flops_per_token=fpt, params=n, peak_flops=H100_BF16, efficiency=1.0, seq_len=2048,
                             micro_batch=1, tp=8, pp=12, vpp=vpp, grad_bytes=2.0, dp_volume=2.0, overlap=1.0)


def point_b(vpp: int = 2) -> tuple[float, float]:
    """Megatron GPT-3 175B strong scaling: fit at 96 GPUs (47%), predict 4,608 (42%)."""
    tokens = 1152 * 2048
    raw = megatron_model(vpp)
    eff = 0.47 / raw.mfu(96, tokens)
    fitted = AnalyticStepModel(**{**raw.__dict__, "efficiency": eff})
    print("B Megatron 175B: layout assumed tp 8 x pp 12 (96 GPUs = one replica), interleaved vpp; MFU at 4,608:")
    for v in (1, 2, 4, 8):
        m = AnalyticStepModel(**{**fitted.__dict__, "vpp": v})
        print(f"    vpp {v}: {m.mfu(4608, tokens):.3f}{'  <- used' if v == vpp else ''}")
    pred = fitted.mfu(4608, tokens)
    print(f"  efficiency fitted at 96 GPUs {eff:.3f}; predicted MFU at 4,608 GPUs {pred:.3f} vs published 0.42")
    return pred, 0.42


def point_c() -> tuple[float, float]:
    """DeepSeek-V3 (671B, 37B active, MLA: 128 heads, qk 192, v 128; 61 layers; seq 4096)."""
    active = 37e9 - 129_280 * 7168  # less the input embedding (a lookup)
    fpt = flops_per_token(active, 61, 128, 192, 128, 4096)
    pred = 338e12 / fpt
    print(f"C DeepSeek-V3: flops/token {fpt:.3g}; 338 model TFLOP/s/GPU -> {pred:,.0f} tokens/s/GPU vs published 1,297")
    # Not gated: the same stack's efficiency carried to DeepSeek's own H800 run (180K GPU-hours per
    # trillion tokens = 1,543 tokens/s/GPU, FP8, DualPipe) misses by more than 15%.
    transfer = 1297 / (1e12 / (180e3 * 3600))
    print(f"  (info) Megatron-Bridge H100 throughput / DeepSeek's own H800 figure: {transfer:.2f}")
    return pred, 1297.0


LLAMA3_WINDOW_H = 54 * 24
STATE_BYTES = 405e9 * 14  # bf16 weights + fp32 master weights + two fp32 Adam moments
STORAGE_BPS = 2e12  # Tectonic's sustained 2 TB/s (Llama 3 paper, 3.3.1)


def point_d(runs: int, restart_min: float = 10.0) -> tuple[float, float]:
    """Llama 3 405B: goodput over the 54-day window with the paper's interruption count."""
    write = STATE_BYTES / STORAGE_BPS
    disk = CheckpointTier("storage", write_s=write, restore_s=write, survives_node_loss=True)
    fm = FailureModel.from_observed(16_384, 419, LLAMA3_WINDOW_H, restart_s=restart_min * 60)
    r = reliability(fm, 0.9 * LLAMA3_WINDOW_H * 3600, disk, runs=runs, seed=0)
    planned = 47 * fm.restart_s / (LLAMA3_WINDOW_H * 3600)  # 47 planned restarts: no lost work
    good = r.sim_best.goodput - planned
    print(f"D Llama 3 405B: job MTBF {r.job_mtbf_h:.2f} h, checkpoint write {write:.1f} s, restart {restart_min:g} min "
          f"(assumed); Young {r.young_s:.0f} s, Daly {r.daly_s:.0f} s, simulated optimum {r.sim_best.interval_s:.0f} s; "
          f"goodput Daly closed form {r.daly_goodput:.3f}, simulated at Daly {r.sim_at_daly.goodput:.3f}, "
          f"best {r.sim_best.goodput:.3f}, less planned restarts {good:.3f} vs published > 0.90 "
          f"({r.sim_best.interruptions:.0f} interruptions per simulated run)")
    for minutes in (5, 20, 30):
        fm2 = FailureModel.from_observed(16_384, 419, LLAMA3_WINDOW_H, restart_s=minutes * 60)
        g = simulate(fm2, 0.9 * LLAMA3_WINDOW_H * 3600, daly_interval(write, fm2.job_mtbf_s), disk, runs=4).goodput
        print(f"    sensitivity: restart {minutes} min -> goodput {g - 47 * minutes * 60 / (LLAMA3_WINDOW_H * 3600):.3f}")
    return good, 0.90


def tables(out: Path, runs: int) -> None:
    """Scaling 8 -> 16,384 for Llama 3 405B-like and 8B-like jobs on H100, with the Llama 3 fleet's
    failure rates; the checkpoint interval table; a cost table."""
    write = STATE_BYTES / STORAGE_BPS
    disk = CheckpointTier("storage", write, write, True)
    fm = FailureModel.from_observed(16_384, 419, LLAMA3_WINDOW_H, restart_s=600)
    big = AnalyticStepModel(flops_per_token=flops_per_token(405e9, 126, 128, 128, 128, 8192), params=405e9,
                            peak_flops=H100_BF16, efficiency=0.40, seq_len=8192, tp=8, pp=8, vpp=4, overlap=1.0)
    weak = weak_scaling(big.weak(16 * 8192 / 64), 16 * 8192 / 64, sizes=[2**i for i in range(6, 15)],
                        goodput=goodput_fn(fm, disk))
    strong = strong_scaling(big.strong(2048 * 8192), 2048 * 8192, sizes=[2**i for i in range(8, 15)],
                            goodput=goodput_fn(fm, disk))
    small = AnalyticStepModel(flops_per_token=flops_per_token(7.5e9, 32, 32, 128, 128, 8192), params=8e9,
                              peak_flops=H100_BF16, efficiency=0.36, seq_len=8192, micro_batch=2, dp_volume=4.0)
    weak8 = weak_scaling(small.weak(2 * 8192), 2 * 8192, goodput=goodput_fn(fm, disk))
    print("\nweak scaling, 8B-like FSDP (2 x 8192 tokens per GPU):\n" + markdown_table(weak8))
    print("\nweak scaling, 405B-like tp8 pp8 vpp4 (16 sequences of 8192 per 64-GPU replica):\n"
          + markdown_table(weak))
    print("\nstrong scaling, 405B-like, 2048 x 8192 tokens per step:\n" + markdown_table(strong))
    out.mkdir(parents=True, exist_ok=True)
    write_scaling_plot({"8B FSDP weak": weak8, "405B weak": weak, "405B strong": strong}, out / "scaling.png",
                       "H100 (analytic model), Llama 3 failure rates; dashed: x goodput")
    print(f"\nwrote {out / 'scaling.png'}")
    print("\ncheckpoint interval (405B state, 2 TB/s storage, 10 min restart):")
    print("| devices | job MTBF h | Young s | Daly s | simulated best s | goodput Daly (closed) | simulated best |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    rel = []
    for n in (1024, 4096, 16_384):
        r = reliability(fm.at(n), 30 * 24 * 3600, disk, runs=max(2, runs // 4), seed=0)
        rel.append(r)
        print(f"| {n:,} | {r.job_mtbf_h:.1f} | {r.young_s:.0f} | {r.daly_s:.0f} | {r.sim_best.interval_s:.0f} | "
              f"{r.daly_goodput:.4f} | {r.sim_best.goodput:.4f} |")
    # the two tiers: a slower shared filesystem (200 GB/s: 28 s per save) alone, or with a host-memory
    # snapshot (1 s stall, 10 s restore) that survives the 22% of interruptions not attributed to
    # hardware in the Llama 3 paper, the disk save every 8th
    slow = CheckpointTier("disk 200 GB/s", STATE_BYTES / 200e9, STATE_BYTES / 200e9, True)
    mem = CheckpointTier("memory", 1.0, 10.0, False)
    tiered = FailureModel.from_observed(16_384, 419, LLAMA3_WINDOW_H, restart_s=600, software_fraction=0.22)
    alone = reliability(tiered, 30 * 24 * 3600, slow, runs=max(2, runs // 4)).sim_best
    print(f"\n16,384 GPUs, 28 s disk saves, 22% of interruptions software: disk alone best {alone.interval_s:.0f} s"
          f" -> goodput {alone.goodput:.4f}")
    for k in (2, 4, 8):
        both = best_interval(tiered, 30 * 24 * 3600, slow, mem, disk_every=k, runs=max(2, runs // 4))
        print(f"  memory snapshot every {both.interval_s:.0f} s + disk every {k}th save -> {both.goodput:.4f}")
    soft = FailureModel.from_observed(16_384, 419, LLAMA3_WINDOW_H, restart_s=600, software_fraction=0.8)
    alone = reliability(soft, 30 * 24 * 3600, slow, runs=max(2, runs // 4)).sim_best
    both = best_interval(soft, 30 * 24 * 3600, slow, mem, disk_every=8, runs=max(2, runs // 4))
    print(f"  (if 80% were software: disk alone {alone.goodput:.4f}, memory every {both.interval_s:.0f} s + disk every"
          f" 8th {both.goodput:.4f})")
    _interval_plot(fm, disk, out / "goodput_interval.png")
    print(f"wrote {out / 'goodput_interval.png'}")
    price = Pricing(on_demand_per_device_h=4.0, reserved_per_device_h=2.5, spot_per_device_h=1.6,
                    spot_preemptions_per_node_h=0.005)
    best, rows = cheapest(15e12, 24 * 90, lambda n: n * 5600.0, (1024, 2048, 4096), price,
                          fm, CheckpointTier("storage", 5.0, 5.0, True))
    print("\ncost: 15T tokens of an 8B-like model in 90 days (illustrative prices, see docs/planner.md):")
    print("| devices | base | spot share | interruptions/h | goodput | days | cost | per M tokens | deadline |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in sorted(rows, key=lambda r: (r.devices, r.base, r.spot_fraction)):
        print(f"| {r.devices:,} | {r.base} | {r.spot_fraction:.2f} | {r.interruptions_per_h:.2f} | {r.goodput:.3f} | "
              f"{r.wall_h / 24:.1f} | {r.cost:,.0f} | {r.cost_per_million_tokens:.3f} | {'yes' if r.meets_deadline else 'no'} |")
    if best is not None:
        print(f"cheapest within the deadline: {best.devices} devices, {best.base} + {best.spot_fraction:.0%} spot nodes, "
              f"{best.cost:,.0f} ({best.cost_per_million_tokens:.3f} per M tokens)")


def _interval_plot(fm: FailureModel, disk: CheckpointTier, out: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lmforge.plan.failures import daly_goodput
    from lmforge.storage.atomic import atomic_open

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for n in (1024, 4096, 16_384):
        m = fm.at(n).job_mtbf_s
        xs = np.geomspace(5, 20_000, 60)
        ax.plot(xs, [daly_goodput(x, disk.write_s, fm.restart_s + disk.restore_s, m) for x in xs], label=f"{n:,} GPUs")
        d = daly_interval(disk.write_s, m)
        ax.axvline(d, linestyle=":", color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("checkpoint interval (s of training)")
    ax.set_ylabel("goodput (Daly, closed form)")
    ax.set_title("goodput vs checkpoint interval (dotted: Daly's optimum)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/plan"))
    ap.add_argument("--runs", type=int, default=16, help="simulated runs per interval (default 16)")
    ap.add_argument("--no-tables", action="store_true", help="only the published points")
    args = ap.parse_args()
    points = {"A torchtitan 8B 8xH100 tokens/s/GPU": point_a(), "B Megatron 175B MFU at 4,608 H100": point_b(),
              "C DeepSeek-V3 tokens/s/GPU": point_c(), "D Llama 3 405B effective training time": point_d(args.runs)}
    if not args.no_tables:
        tables(args.out, args.runs)
    print("\n| point | predicted | published | error |\n|---|---:|---:|---:|")
    worst = 0.0
    for name, (pred, pub) in points.items():
        err = pred / pub - 1
        worst = max(worst, abs(err))
        print(f"| {name} | {pred:,.3f} | {pub:,.3f} | {err:+.1%} |")
    return verdict("plan_published", "published figures (4 points)", "1 - worst |error| (>= 0.85: all within 15%)",
                   1 - worst, 1 - TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())

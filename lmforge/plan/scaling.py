"""Weak and strong scaling tables from 8 to 16,384 devices, with the goodput that failures leave.

Why a step-time *function*: the planner core (`plan/` time model) predicts one step for a layout;
this module only asks it for many world sizes and turns the answers into a table and a plot, so
any model can be plugged in: `StepTimeFn(world_size) -> seconds per optimizer step`. Weak scaling
keeps the tokens per device per step fixed (the global batch grows); strong scaling keeps the
global batch fixed (each device gets less).

Which model each table uses: `lmforge plan --scaling` passes the core's time model (timing.py via
predict.py) for the fastest layout `sweep.best_at` finds at each size, the model that ranks layouts.
`AnalyticStepModel` is a small stand-in with the terms that decide scaling (compute at a stated,
fitted efficiency, pipeline bubble, data-parallel traffic not hidden under compute): only
bench/plan_published.py's tables and this module's tests use it, because reproducing published
figures needs an efficiency fitted to those runs, which the core's datasheet presets do not have.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.config.checks import require
from lmforge.plan.failures import CheckpointTier, FailureModel, daly_goodput, daly_interval
from lmforge.storage.atomic import atomic_open

__all__ = ["StepTimeFn", "GoodputFn", "DEFAULT_SIZES", "AnalyticStepModel", "ScalingRow", "weak_scaling",
           "strong_scaling", "goodput_fn", "markdown_table", "write_scaling_plot"]

StepTimeFn = Callable[[int], float]  # world size -> seconds per optimizer step
GoodputFn = Callable[[int], float]  # world size -> training time / wall time under failures
DEFAULT_SIZES: tuple[int, ...] = tuple(2**i for i in range(3, 15))  # 8 .. 16,384


@dataclass(frozen=True)
class AnalyticStepModel:
    """One optimizer step of a transformer on `devices` accelerators, by arithmetic.

    compute = tokens per replica x `flops_per_token` / (tp x pp x peak x `efficiency`), where
    `efficiency` is what the kernels reach of the peak (a measured or fitted number: say where it
    comes from); bubble = compute x (pp - 1) / (vpp x microbatches) (interleaved 1F1B);
    data-parallel traffic = `dp_volume` x params x `grad_bytes` / (tp x pp) x (dp - 1) / dp over the
    per-device bandwidth (inside a node while one replica group fits in it, else between nodes),
    of which `overlap` x compute is hidden."""

    flops_per_token: float
    params: float
    peak_flops: float
    efficiency: float
    seq_len: int
    micro_batch: int = 1
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    devices_per_node: int = 8
    intra_node_bw: float = 450e9  # bytes/s per device (NVLink 4, one direction)
    inter_node_bw: float = 50e9  # bytes/s per device (400 Gb/s NIC per GPU)
    link_latency_s: float = 10e-6
    grad_bytes: float = 2.0  # bf16 reduce
    dp_volume: float = 2.0  # all-reduce (2); FSDP with reshard: all-gather x2 + reduce-scatter (3)
    overlap: float = 1.0

    def validate(self) -> None:
        for name in ("flops_per_token", "params", "peak_flops", "efficiency", "seq_len", "micro_batch", "tp", "pp",
                     "vpp", "devices_per_node", "intra_node_bw", "inter_node_bw"):
            require(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        require(self.efficiency <= 1, "efficiency", self.efficiency, "must be <= 1")

    def step_s(self, devices: int, tokens_per_step: float) -> float:
        self.validate()
        model_parallel = self.tp * self.pp
        require(devices % model_parallel == 0, "devices", devices, f"must be a multiple of tp x pp = {model_parallel}")
        dp = devices // model_parallel
        per_replica = tokens_per_step / dp
        compute = self.flops_per_token * per_replica / (model_parallel * self.peak_flops * self.efficiency)
        microbatches = max(1.0, per_replica / (self.seq_len * self.micro_batch))
        bubble = compute * (self.pp - 1) / (self.vpp * microbatches)
        bw = self.intra_node_bw if devices <= self.devices_per_node else self.inter_node_bw
        volume = self.dp_volume * self.params * self.grad_bytes / model_parallel
        comm = volume * (dp - 1) / dp / bw + 2 * (dp - 1) * self.link_latency_s if dp > 1 else 0.0
        return compute + bubble + max(0.0, comm - self.overlap * compute)

    def mfu(self, devices: int, tokens_per_step: float) -> float:
        step = self.step_s(devices, tokens_per_step)
        return self.flops_per_token * tokens_per_step / (step * devices * self.peak_flops)

    def weak(self, tokens_per_device: float) -> StepTimeFn:
        return lambda n: self.step_s(n, tokens_per_device * n)

    def strong(self, global_tokens: float) -> StepTimeFn:
        return lambda n: self.step_s(n, global_tokens)


def goodput_fn(fm: FailureModel, disk: CheckpointTier) -> GoodputFn:
    """Goodput at Daly's interval for the fleet at each size (closed form: a table of thousands of
    sizes cannot afford a simulation per row; failures.simulate checks the form per point)."""
    def g(n: int) -> float:
        m = fm.at(n).job_mtbf_s
        return daly_goodput(daly_interval(disk.write_s, m), disk.write_s, fm.restart_s + disk.restore_s, m)
    return g


@dataclass(frozen=True)
class ScalingRow:
    devices: int
    step_s: float
    tokens_per_s: float
    tokens_per_s_per_device: float
    efficiency: float  # per-device throughput over the smallest size's
    goodput: float
    effective_tokens_per_s: float  # tokens/s x goodput


def _rows(step_time: StepTimeFn, tokens: Callable[[int], float], sizes: Sequence[int],
          goodput: GoodputFn | None) -> list[ScalingRow]:
    require(len(sizes) > 0, "sizes", sizes, "must name at least one world size")
    rows: list[ScalingRow] = []
    base = None
    for n in sizes:
        step = step_time(n)
        require(step > 0 and math.isfinite(step), f"step time at {n} devices", step, "must be finite and > 0")
        tps = tokens(n) / step
        per_dev = tps / n
        base = per_dev if base is None else base
        g = goodput(n) if goodput else 1.0
        rows.append(ScalingRow(n, step, tps, per_dev, per_dev / base, g, tps * g))
    return rows


def weak_scaling(step_time: StepTimeFn, tokens_per_device: float, sizes: Sequence[int] = DEFAULT_SIZES,
                 goodput: GoodputFn | None = None) -> list[ScalingRow]:
    """`step_time(n)` for a global batch of n x `tokens_per_device` tokens."""
    return _rows(step_time, lambda n: tokens_per_device * n, sizes, goodput)


def strong_scaling(step_time: StepTimeFn, global_tokens: float, sizes: Sequence[int] = DEFAULT_SIZES,
                   goodput: GoodputFn | None = None) -> list[ScalingRow]:
    """`step_time(n)` for the same `global_tokens` per step at every size."""
    return _rows(step_time, lambda n: global_tokens, sizes, goodput)


def markdown_table(rows: Sequence[ScalingRow]) -> str:
    head = ("| devices | step s | tokens/s | tokens/s/device | scaling eff. | goodput | effective tokens/s |\n"
            "|---:|---:|---:|---:|---:|---:|---:|")
    body = [f"| {r.devices:,} | {r.step_s:.3g} | {r.tokens_per_s:,.0f} | {r.tokens_per_s_per_device:,.0f} | "
            f"{r.efficiency:.3f} | {r.goodput:.3f} | {r.effective_tokens_per_s:,.0f} |" for r in rows]
    return "\n".join([head, *body])


def write_scaling_plot(series: dict[str, Sequence[ScalingRow]], out_png: Path | str, title: str = "scaling") -> Path:
    """Scaling efficiency (per-device throughput over the smallest size's; dashed: times goodput)
    against devices, one line pair per series, so jobs of any size share one axis; written
    atomically (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, rows in series.items():
        xs = [r.devices for r in rows]
        line, = ax.plot(xs, [r.efficiency for r in rows], marker="o", label=f"{name}")
        ax.plot(xs, [r.efficiency * r.goodput for r in rows], linestyle="--", color=line.get_color(),
                label=f"{name} x goodput")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices")
    ax.set_ylabel("tokens/s per device / at the smallest size")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png")
    return out

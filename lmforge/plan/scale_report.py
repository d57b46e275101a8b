"""What `lmforge plan --scaling / --cost` prints: the scaling tables (one row per world size, with
the layout the sweep chose there), the checkpoint interval table, the cost table and the energy
line. Lines of text only; the numbers come from sweep.py, scaling.py, fleet.py and cost.py."""

from __future__ import annotations

import math
from collections.abc import Sequence

from lmforge.observability.energy import EnergyEstimate
from lmforge.plan.cluster import Cluster
from lmforge.plan.cost import CostEstimate
from lmforge.plan.failures import CheckpointTier
from lmforge.plan.fleet import CHECKPOINT_BYTES_PER_PARAM, SIM_MTBFS, SIM_RUNS, IntervalRow
from lmforge.plan.report import layout_name
from lmforge.plan.scaling import ScalingRow
from lmforge.plan.sweep import SizeResult

__all__ = ["format_scaling", "format_failures", "format_intervals", "format_cost", "format_energy", "mix_name",
           "money", "count"]

TIME_MODEL = ("step times: the planner's time model (lmforge/plan/timing.py) for the fastest layout a pruned "
              "search finds at each size (lmforge/plan/sweep.py)")


def _num(x: float, fmt: str) -> str:
    return "inf" if math.isinf(x) else format(x, fmt)


def format_scaling(title: str, results: Sequence[SizeResult], rows: Sequence[ScalingRow]) -> list[str]:
    """`rows` for the sizes of `results` that have a layout, in the same order."""
    lines = [title,
             f"{'devices':>8} {'batch':>9} {'layout':<40} {'step s':>9} {'tokens/s':>14} {'tok/s/device':>12} "
             f"{'scaling eff':>11} {'goodput':>8} {'effective tok/s':>15}"]
    by_size = {r.devices: r for r in rows}
    for res in results:
        if res.best is None:
            lines.append(f"{res.world_size:>8,} {res.global_batch:>9,} {res.why}")
            continue
        r = by_size[res.world_size]
        lines.append(f"{r.devices:>8,} {res.global_batch:>9,} {layout_name(res.best.job):<40} {r.step_s:>9.4g} "
                     f"{r.tokens_per_s:>14,.0f} {r.tokens_per_s_per_device:>12,.0f} {r.efficiency:>11.3f} "
                     f"{r.goodput:>8.4f} {r.effective_tokens_per_s:>15,.0f}")
    return lines


def format_failures(cluster: Cluster, disk: CheckpointTier, params: int) -> str:
    f = cluster.failures
    node = "" if math.isinf(f.node_mtbf_h) else f", {f.node_mtbf_h:,.0f} h per node"
    return (f"failures ([failures] of the cluster file): MTBF {f.device_mtbf_h:,.0f} h per device{node}, restart "
            f"{f.restart_s:g} s; checkpoint {CHECKPOINT_BYTES_PER_PARAM * params / 1e9:,.3g} GB "
            f"({CHECKPOINT_BYTES_PER_PARAM} B x {count(params)} parameters: fp32 weights and AdamW moments) at "
            f"{f.storage_bytes_per_s / 1e9:g} GB/s = {disk.write_s:.3g} s per save and per restore; goodput: "
            "training time / wall time at Daly's interval (Daly's closed form)")


def format_intervals(rows: Sequence[IntervalRow]) -> list[str]:
    lines = [f"checkpoint interval (seconds of training between saves): Young, Daly, and the simulated optimum "
             f"(the best of 15 intervals from Daly's / 4 to x 4, {SIM_RUNS} seeded runs of {SIM_MTBFS} job MTBFs each)",
             f"{'devices':>8} {'job MTBF h':>11} {'Young s':>10} {'Daly s':>10} {'simulated s':>12} "
             f"{'goodput Daly':>12} {'goodput sim.':>12}"]
    for r in rows:
        lines.append(f"{r.devices:>8,} {_num(r.job_mtbf_h, ',.1f'):>11} {_num(r.young_s, '.1f'):>10} "
                     f"{_num(r.daly_s, '.1f'):>10} {_num(r.sim_best_s, '.1f'):>12} {r.daly_goodput:>12.4f} "
                     f"{r.sim_best_goodput:>12.4f}")
    return lines


def mix_name(e: CostEstimate) -> str:
    """The instance mix as it comes out in whole nodes (a quarter of one node is none or all of it)."""
    base = e.base.replace("_", "-")
    if e.spot_devices == 0:
        return f"all {base}"
    if e.spot_devices == e.devices:
        return "all spot"
    return f"{base} + {e.spot_devices / e.devices:.0%} spot"


def money(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.4g}"


def count(n: float) -> str:
    """8.03e9 -> '8.03B', 4.9e6 -> '4.9M'."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def format_cost(results: Sequence[SizeResult], options: Sequence[CostEstimate], deadline_h: float) -> list[str]:
    """Per size: all on-demand, and the cheapest mix at that size (one that meets the deadline where
    any does); the rows the cheapest option overall is chosen from."""
    lines = [f"{'devices':>8} {'layout':<40} {'tokens/s':>14} {'on-demand h':>12} {'on-demand cost':>15}  "
             f"{'cheapest mix':<22} {'intr./h':>8} {'goodput':>8} {'hours':>10} {'cost':>14} {'per 1M tok':>11} "
             f"{'in time':>7}"]
    layouts = {r.world_size: layout_name(r.best.job) for r in results if r.best is not None}
    for res in results:
        n = res.world_size
        mine = [o for o in options if o.devices == n]
        if not mine:
            lines.append(f"{n:>8,} {res.why}")
            continue
        plain = next(o for o in mine if o.base == "on_demand" and o.spot_fraction == 0)
        ok = [o for o in mine if o.meets_deadline]
        pick = min(ok or mine, key=lambda o: o.cost)
        lines.append(f"{n:>8,} {layouts[n]:<40} {plain.tokens_per_s:>14,.0f} {plain.wall_h:>12,.4g} "
                     f"{money(plain.cost):>15}  "
                     f"{mix_name(pick):<22} {pick.interruptions_per_h:>8.3f} {pick.goodput:>8.4f} "
                     f"{pick.wall_h:>10,.4g} {money(pick.cost):>14} {pick.cost_per_million_tokens:>11.4g} "
                     f"{'yes' if pick.meets_deadline else 'no':>7}")
    return lines


def format_energy(e: EnergyEstimate, steps: int, step_s: float, devices: int, watts: float, carbon: float) -> str:
    return (f"energy (pre-flight, best layout): {steps:,} steps x {step_s:.4g} s x {devices:,} devices x {watts:g} W = "
            f"{e.kwh:.4g} kWh, {e.co2e_kg:.4g} kg CO2e at {carbon:g} g CO2e/kWh (train.steps; W: "
            "energy.watts_per_device or the cluster's power_w; grid: energy.carbon_g_per_kwh)")

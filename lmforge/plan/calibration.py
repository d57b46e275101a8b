"""A cluster file for this machine from measurements (`lmforge bench cluster`), by arithmetic only:
the measurements come from lmforge/observability/machine.py and from short probe trainings run by
the CLI; this module fits the time model's constants to them and writes the file.

What is fitted, in this order (each probe is a micro model, not a model the planner is checked on):
1. the matmul peak and efficiency curve from one-thread matmul rates by size
   (rate = peak x max x W / (W + half): 1 / rate is linear in 1 / W), and the attention kernel's
   curve the same way from its own rates (`attention_max` relative to the matmul peak);
2. the memory bandwidth and the collective table are measured directly;
3. the costs no FLOP count shows (`FITS`), each fit the constants that make the time model's
   predictions of its probes equal their measured steps (the prediction is linear in each):
   `op_overhead_us`, `forward_us` and `activation_passes` (one rank, dense, 1 and 5 blocks, and
   1 block at 4x the tokens: the memory passes over activations and the logits grow with
   tokens, the per-forward cost does not), `moe_layer_us` (one rank,
   MoE), `tp_block_us` and `tp_forward_us` (tp = 2, 1 and 5 blocks: far apart, so
   that the noise of two measured steps moves the per-block cost little), `fsdp_unit_us` (FSDP over 2),
   `ep_layer_us` (MoE, FSDP and ep over 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any

import numpy as np

from lmforge.config import JobConfig
from lmforge.plan.cluster import COLLECTIVE_KINDS, FIXED_COSTS, Cluster, CollectiveTable, Efficiency
from lmforge.plan.timing import predict_step_time


def micro(layers: int) -> tuple[str, ...]:
    """The probes' model: width 64 (4 heads), `layers` blocks; small enough that the fixed costs
    dominate its step, so they are what its measured time fixes."""
    return ("--model.dim", "64", "--model.n_layers", str(layers), "--model.n_heads", "4", "--model.n_kv_heads", "4",
            "--model.multiple_of", "32")


TP2 = ("--parallel.tp", "2", "--parallel.dp_shard", "1")
FSDP2 = ("--parallel.dp_shard", "2", "--train.micro_batch_size", "4")
EP2 = ("--parallel.dp_shard", "2", "--parallel.ep", "2", "--train.micro_batch_size", "4")


@dataclass(frozen=True)
class Probe:
    """A short training run of a micro model whose measured step time the time model must match."""

    name: str
    recipe: str  # recipes/<recipe>.toml
    ranks: int
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Fit:
    """Constants of `Efficiency` fixed by probes: as many probes as constants (two depths separate a
    per-block cost from a per-forward one)."""

    constants: tuple[str, ...]
    probes: tuple[Probe, ...]


LONG = ("--train.seq_len", "512", "--model.max_seq_len", "512")  # 4x the tokens of the other probes

FITS = (
    Fit(("op_overhead_s", "forward_s", "activation_passes"), (Probe("dense-1", "tiny-dense", 1, micro(1)),
                                                              Probe("dense-5", "tiny-dense", 1, micro(5)),
                                                              Probe("dense-1-long", "tiny-dense", 1,
                                                                    (*micro(1), *LONG)))),
    Fit(("moe_layer_s",), (Probe("moe", "tiny-moe", 1, micro(2)),)),
    Fit(("tp_block_s", "tp_forward_s"), (Probe("tp2-1", "tiny-dense", 2, (*micro(1), *TP2)),
                                         Probe("tp2-5", "tiny-dense", 2, (*micro(5), *TP2)))),
    Fit(("fsdp_unit_s",), (Probe("fsdp2", "tiny-dense", 2, (*micro(3), *FSDP2)),)),
    Fit(("ep_layer_s",), (Probe("ep2", "tiny-moe", 2, (*micro(2), *EP2)),)),
)


def fit_efficiency(rates: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(peak FLOP/s, max, half FLOPs) of rate(W) = peak x max x W / (W + half) through measured
    (W, rate) points: the peak is the best rate measured, max the curve's limit over it (at most 1)."""
    limit, half = _saturating_fit(rates)
    peak = max(r for _, r in rates)
    return peak, min(1.0, limit / peak), half


def _saturating_fit(rates: list[tuple[float, float]]) -> tuple[float, float]:
    """(limit, half) of rate(W) = limit x W / (W + half): 1 / rate = a + b / W fitted by least
    squares on relative error (each point weighted by rate^2); limit = 1 / a, half = b / a."""
    if len(rates) < 2:
        raise ValueError("fit_efficiency: need at least two (FLOPs, rate) points")
    peak = max(r for _, r in rates)
    xs, ys, ws = [1.0 / w for w, _ in rates], [1.0 / r for _, r in rates], [r * r for _, r in rates]
    sw = sum(ws)
    mx, my = sum(w * x for w, x in zip(ws, xs)) / sw, sum(w * y for w, y in zip(ws, ys)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    b = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / sxx if sxx > 0 else 0.0
    b = max(b, 0.0)
    a = my - b * mx
    if a <= 0:  # rates still rising at the largest size: no saturation seen, take the best as the limit
        a, b = 1.0 / peak, 0.0
    return 1.0 / a, b / a


def fit_attention(rates: list[tuple[float, float]], matmul_peak: float) -> tuple[float, float]:
    """(attention_max relative to `matmul_peak`, half FLOPs) of the attention kernel's curve through
    its measured (W, rate) points (`fit_efficiency`'s fit; the time model scales the matmul peak)."""
    limit, half = _saturating_fit(rates)
    return min(1.0, limit / matmul_peak), half


def _predict(job: JobConfig, cluster: Cluster, world_size: int, precision: str) -> float:
    return predict_step_time(job, cluster, world_size, precision, on_cpu=cluster.shared_host_memory).total


def fit_constants(runs: list[tuple[JobConfig, int, float]], cluster: Cluster, fields: tuple[str, ...],
                  precision: str = "fp32") -> dict[str, float]:
    """Values (seconds, >= 0) of the `Efficiency` `fields` at which the predicted steps of the
    (job, world size, measured seconds) `runs` match their measurements, by least squares (exact
    when there are as many runs as fields): every prediction is linear in each field. A field the
    fit would make negative is held at 0 and the rest refitted."""
    def at(job: JobConfig, world: int, values: dict[str, float]) -> float:
        c = replace(cluster, efficiency=replace(cluster.efficiency, **values))
        return _predict(job, c, world, precision)

    zero = dict.fromkeys(fields, 0.0)
    base = [at(job, world, zero) for job, world, _ in runs]
    slope = [[(at(job, world, {**zero, f: 1e-3}) - b) / 1e-3 for f in fields] for (job, world, _), b in zip(runs, base)]
    target = [m - b for (_, _, m), b in zip(runs, base)]
    best: dict[str, float] | None = None
    best_err = math.inf
    for size in range(len(fields), 0, -1):  # all fields free first, then with some held at 0
        for free in combinations(range(len(fields)), size):
            values = _least_squares([[row[j] for j in free] for row in slope], target)
            if values is None or any(v < 0 for v in values):
                continue
            err = sum((sum(row[j] * v for j, v in zip(free, values)) - t) ** 2 for row, t in zip(slope, target))
            if err < best_err - 1e-18:
                best, best_err = {fields[j]: v for j, v in zip(free, values)}, err
        if best is not None:
            break
    return {**zero, **(best or {})}


def _least_squares(a: list[list[float]], b: list[float]) -> list[float] | None:
    """x minimising |a x - b| (numpy's lstsq on unit-norm columns: the fields differ by orders of
    magnitude); None when the columns are dependent (the probes cannot tell the fields apart)."""
    m = np.asarray(a, dtype=float)
    scale = np.linalg.norm(m, axis=0)
    scale[scale == 0] = 1.0
    x, _, rank, _ = np.linalg.lstsq(m / scale, np.asarray(b, dtype=float), rcond=None)
    return None if rank < m.shape[1] else [float(v) for v in x / scale]


def with_constants(cluster: Cluster, **constants: float) -> Cluster:
    return replace(cluster, efficiency=replace(cluster.efficiency, **constants))


def collective_table(times: dict[str, list[tuple[int, float]]], ranks: int) -> CollectiveTable:
    return CollectiveTable(ranks=ranks, points={k: tuple(sorted((float(b), t) for b, t in times[k]))
                                                for k in COLLECTIVE_KINDS if times.get(k)})


def cluster_dict(base: dict[str, Any], *, name: str, accelerator_name: str, peak_fp32: float, peak_bf16: float,
                 hbm_bytes_per_s: float, devices: int, efficiency: Efficiency,
                 collectives: CollectiveTable | None, description: str) -> dict[str, Any]:
    """A cluster file's contents: `base` (a preset's parsed TOML: power, failures, price) with every
    measured or fitted value replaced. The link model stays for groups the table does not cover."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    data.update(name=name, description=description, devices_per_node=devices, nodes=1, shared_host_memory=True)
    data["accelerator"] = {**data.get("accelerator", {}), "name": accelerator_name,
                           "peak_fp32_tflops": round(peak_fp32 / 1e12, 6), "peak_bf16_tflops": round(peak_bf16 / 1e12, 6),
                           "hbm_gbps": round(hbm_bytes_per_s / 1e9, 3)}
    for link in ("intra_node", "inter_node"):
        data[link] = {**data.get(link, {}), "call_overhead_us": 0.0}
    e = efficiency
    data["efficiency"] = {"max": round(e.max, 4), "half_gflop": round(e.half_flops / 1e9, 6),
                          "op_overhead_us": round(e.op_overhead_s * 1e6, 2), "comm_overlap": e.comm_overlap,
                          **{f"{k}_us": round(getattr(e, f"{k}_s") * 1e6, 1) for k in FIXED_COSTS},
                          "activation_passes": round(e.activation_passes, 3)}
    if e.attention_max is not None:
        data["efficiency"].update(attention_max=round(e.attention_max, 4),
                                  attention_half_gflop=round(e.attention_half_flops / 1e9, 6))
    if collectives is not None:
        data["collectives"] = {"ranks": collectives.ranks,
                               **{k: [[int(b), round(t * 1e6, 1)] for b, t in pts]
                                  for k, pts in collectives.points.items()}}
    return data


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"not a finite number: {v}")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def to_toml(data: dict[str, Any], header: str = "") -> str:
    """TOML text of a cluster dict (top-level scalars, then one table per section)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]", *(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items())]
    return "\n".join(lines) + "\n"

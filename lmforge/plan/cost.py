"""Cost of a training run: price per device-hour (on-demand, reserved, spot with its preemption
rate), cost per trained token, and the cheapest layout and instance mix that meets a deadline.

Why preemptions are counted as failures: a synchronous job stops whenever any of its machines is
reclaimed, so spot capacity adds `spot nodes x preemption rate` interruptions per hour on top of
the hardware's, each paying a restart, a restore and the work since the last checkpoint
(failures.py: Daly's closed form at Daly's interval). Spot is cheaper per hour but stretches the
wall time; past some size the restarts cost more than the discount saves. The instance mix that
"spot plus reserved" advice names is one of the candidates compared here, not an assumption.
Assumed: a reclaimed node is replaced within the restart time (a warm pool), prices are per
device-hour of the whole machine, and reserved capacity is billed only for the run's hours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lmforge.config.checks import require
from lmforge.plan.failures import CheckpointTier, FailureModel, daly_goodput, daly_interval

__all__ = ["Pricing", "CostEstimate", "estimate", "cheapest", "DEFAULT_SPOT_FRACTIONS"]

DEFAULT_SPOT_FRACTIONS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Pricing:
    """The `[price]` table of a cluster file, in currency units per device-hour.
    `spot_preemptions_per_node_h`: how often one spot machine is reclaimed (0.01: once per 100 h)."""

    on_demand_per_device_h: float
    spot_per_device_h: float | None = None
    spot_preemptions_per_node_h: float = 0.0
    reserved_per_device_h: float | None = None

    def validate(self) -> None:
        require(self.on_demand_per_device_h > 0, "price.on_demand_per_device_h", self.on_demand_per_device_h,
                "must be > 0")
        for key in ("spot_per_device_h", "reserved_per_device_h"):
            v = getattr(self, key)
            require(v is None or v > 0, f"price.{key}", v, "must be > 0 (or left out)")
        require(self.spot_preemptions_per_node_h >= 0, "price.spot_preemptions_per_node_h",
                self.spot_preemptions_per_node_h, "must be >= 0")

    @staticmethod
    def from_mapping(table: Mapping[str, Any]) -> Pricing:
        """From a parsed TOML table; an unknown key or a bad value is one ConfigError line."""
        known = set(Pricing.__dataclass_fields__)
        for key in table:
            require(key in known, f"price.{key}", table[key], f"is not a price key; known: {sorted(known)}")
        p = Pricing(**{k: float(v) for k, v in table.items()})
        p.validate()
        return p

    def base_price(self, base: str) -> float | None:
        return self.on_demand_per_device_h if base == "on_demand" else self.reserved_per_device_h


@dataclass(frozen=True)
class CostEstimate:
    devices: int
    base: str  # what the non-spot devices are: "on_demand" or "reserved"
    spot_fraction: float  # of the nodes
    tokens_per_s: float  # without failures
    interruptions_per_h: float
    goodput: float
    wall_h: float
    device_hours: float
    cost: float
    cost_per_million_tokens: float
    meets_deadline: bool
    spot_devices: int = 0  # what `spot_fraction` comes to in whole spot nodes


def estimate(total_tokens: float, devices: int, tokens_per_s: float, pricing: Pricing, fm: FailureModel,
             disk: CheckpointTier, spot_fraction: float = 0.0, base: str = "on_demand",
             deadline_h: float = math.inf) -> CostEstimate:
    """Cost of training `total_tokens` on `devices` running at `tokens_per_s` when nothing fails,
    with `spot_fraction` of the nodes on spot capacity and the rest on `base` capacity."""
    pricing.validate()
    require(0.0 <= spot_fraction <= 1.0, "spot_fraction", spot_fraction, "must be in [0, 1]")
    require(tokens_per_s > 0, "tokens_per_s", tokens_per_s, "must be > 0")
    base_price = pricing.base_price(base)
    require(base_price is not None, "base", base, "has no price in the cluster file")
    require(spot_fraction == 0 or pricing.spot_per_device_h is not None, "price.spot_per_device_h", None,
            "is needed for a spot fraction > 0")
    sized = fm.at(devices)
    spot_nodes = round(sized.nodes * spot_fraction)
    spot_devices = min(devices, spot_nodes * sized.devices_per_node)
    fleet = replace(sized, extra_per_hour=sized.extra_per_hour + spot_nodes * pricing.spot_preemptions_per_node_h)
    m = fleet.job_mtbf_s
    g = daly_goodput(daly_interval(disk.write_s, m), disk.write_s, fleet.restart_s + disk.restore_s, m)
    wall_h = total_tokens / (tokens_per_s * g) / 3600.0
    per_h = (devices - spot_devices) * base_price + spot_devices * (pricing.spot_per_device_h or 0.0)
    cost = wall_h * per_h
    return CostEstimate(devices, base, spot_fraction, tokens_per_s, fleet.interruptions_per_hour, g, wall_h,
                        wall_h * devices, cost, cost / total_tokens * 1e6, wall_h <= deadline_h, spot_devices)


def cheapest(total_tokens: float, deadline_h: float, throughput: Callable[[int], float], sizes: Sequence[int],
             pricing: Pricing, fm: FailureModel, disk: CheckpointTier,
             spot_fractions: Sequence[float] = DEFAULT_SPOT_FRACTIONS) -> tuple[CostEstimate | None, list[CostEstimate]]:
    """Every (size, base, spot fraction) candidate, cheapest first, and the cheapest that meets the
    deadline (None when none does). `throughput(n)`: tokens/s at n devices without failures (from
    the step-time model: global tokens per step / step time)."""
    bases = ["on_demand"] + (["reserved"] if pricing.reserved_per_device_h is not None else [])
    fractions = spot_fractions if pricing.spot_per_device_h is not None else (0.0,)
    rows = [estimate(total_tokens, n, throughput(n), pricing, fm, disk, s, b, deadline_h)
            for n in sizes for b in bases for s in fractions if not (s == 1.0 and b == "reserved")]
    rows.sort(key=lambda r: r.cost)
    return next((r for r in rows if r.meets_deadline), None), rows

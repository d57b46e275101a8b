"""Scaling tables from a step-time function, the analytic step model, and the cost planner."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmforge.config.loader import ConfigError
from lmforge.plan.cost import Pricing, cheapest, estimate
from lmforge.plan.failures import CheckpointTier, FailureModel
from lmforge.plan.scaling import (
    DEFAULT_SIZES,
    AnalyticStepModel,
    goodput_fn,
    markdown_table,
    strong_scaling,
    weak_scaling,
    write_scaling_plot,
)

DISK = CheckpointTier("disk", 30.0, 60.0, True)
FM = FailureModel(devices=8, device_mtbf_h=50_000, restart_s=600)
MODEL = AnalyticStepModel(flops_per_token=6 * 8e9, params=8e9, peak_flops=1e15, efficiency=0.4, seq_len=8192,
                          micro_batch=2, dp_volume=3.0, overlap=0.0)


def test_sizes_and_ideal_weak_scaling() -> None:
    assert DEFAULT_SIZES[0] == 8 and DEFAULT_SIZES[-1] == 16_384
    rows = weak_scaling(lambda n: 2.0, tokens_per_device=1000, sizes=(8, 64, 512))
    assert [r.tokens_per_s for r in rows] == [4000, 32_000, 256_000]
    assert all(r.efficiency == 1.0 and r.goodput == 1.0 for r in rows)


def test_analytic_model_terms() -> None:
    one = MODEL.step_s(1, 16_384)
    assert one == pytest.approx(6 * 8e9 * 16_384 / (1e15 * 0.4))  # compute only
    assert MODEL.mfu(1, 16_384) == pytest.approx(0.4)
    # FSDP traffic over NVLink inside a node, over the NIC past it (nothing hidden: overlap 0)
    inside = MODEL.step_s(8, 8 * 16_384) - one
    assert inside == pytest.approx(3 * 8e9 * 2 * 7 / 8 / 450e9 + 14 * 10e-6)
    assert MODEL.step_s(16, 16 * 16_384) - one == pytest.approx(3 * 8e9 * 2 * 15 / 16 / 50e9 + 30 * 10e-6)
    # pipeline bubble (p - 1) / (v m) of the compute
    pp = AnalyticStepModel(flops_per_token=1e9, params=1e9, peak_flops=1e15, efficiency=0.5, seq_len=1000,
                           pp=4, vpp=2, overlap=1.0)
    compute = 1e9 * 8000 / (4 * 1e15 * 0.5)
    assert pp.step_s(4, 8000) == pytest.approx(compute * (1 + 3 / (2 * 8)))
    with pytest.raises(ConfigError, match="multiple of tp x pp"):
        pp.step_s(6, 8000)


def test_strong_scaling_loses_efficiency_and_failures_cost_goodput() -> None:
    hidden = AnalyticStepModel(**{**MODEL.__dict__, "overlap": 1.0, "pp": 8, "vpp": 1})
    rows = strong_scaling(hidden.strong(1024 * 8192), 1024 * 8192, sizes=(64, 512, 8192),
                          goodput=goodput_fn(FM, DISK))
    eff = [r.efficiency for r in rows]
    assert eff[0] == 1.0 and eff[0] > eff[1] > eff[2]  # fewer microbatches per pipeline: a bigger bubble
    good = [r.goodput for r in rows]
    assert 1.0 > good[0] > good[1] > good[2]
    assert rows[2].effective_tokens_per_s == pytest.approx(rows[2].tokens_per_s * good[2])
    table = markdown_table(rows)
    assert table.count("\n") == 4 and "| 8,192 |" in table


def test_scaling_plot_is_a_png(tmp_path: Path) -> None:
    rows = weak_scaling(MODEL.weak(16_384), 16_384, sizes=(8, 16, 32), goodput=goodput_fn(FM, DISK))
    out = write_scaling_plot({"8B": rows}, tmp_path / "weak.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tmp_path.iterdir()) == [out]  # no temp file left


PRICE = Pricing(on_demand_per_device_h=4.0, spot_per_device_h=1.5, spot_preemptions_per_node_h=0.02,
                reserved_per_device_h=2.5)


def test_cost_without_failures_is_hours_times_price() -> None:
    never = FailureModel(devices=8, device_mtbf_h=math.inf, restart_s=0)
    e = estimate(1e12, 64, 1e6, PRICE, never, CheckpointTier("disk", 0.0, 0.0, True))
    hours = 1e12 / 1e6 / 3600
    assert e.goodput == 1.0 and e.wall_h == pytest.approx(hours)
    assert e.cost == pytest.approx(hours * 64 * 4.0)
    assert e.cost_per_million_tokens == pytest.approx(e.cost / 1e6)


def test_spot_preemptions_add_interruptions_and_can_lose_to_on_demand() -> None:
    calm = estimate(1e12, 1024, 1e7, PRICE, FM, DISK, spot_fraction=1.0)
    on_demand = estimate(1e12, 1024, 1e7, PRICE, FM, DISK)
    assert calm.interruptions_per_h == pytest.approx(on_demand.interruptions_per_h + 128 * 0.02)
    assert calm.goodput < on_demand.goodput and calm.cost < on_demand.cost  # cheap enough to win
    stormy = Pricing(on_demand_per_device_h=4.0, spot_per_device_h=3.0, spot_preemptions_per_node_h=1.0)
    assert estimate(1e12, 1024, 1e7, stormy, FM, DISK, 1.0).cost > on_demand.cost


def test_cheapest_meets_the_deadline_or_says_none() -> None:
    def tps(n: int) -> float:
        return 5000.0 * n
    best, rows = cheapest(1e12, 24 * 30, tps, (256, 1024, 4096), PRICE, FM, DISK)
    assert best is not None and best.meets_deadline and best.wall_h <= 24 * 30
    assert best == min((r for r in rows if r.meets_deadline), key=lambda r: r.cost)
    assert len(rows) == 3 * (5 + 4)  # on-demand with 5 spot fractions, reserved with 4 (not all spot)
    none, _ = cheapest(1e12, 1.0, tps, (256,), PRICE, FM, DISK)
    assert none is None


def test_pricing_from_the_cluster_file() -> None:
    p = Pricing.from_mapping({"on_demand_per_device_h": 3, "spot_per_device_h": 1})
    assert p.spot_per_device_h == 1.0 and p.reserved_per_device_h is None
    with pytest.raises(ConfigError, match="price.spot_per_hour"):
        Pricing.from_mapping({"on_demand_per_device_h": 3, "spot_per_hour": 1})
    with pytest.raises(ConfigError, match="on_demand_per_device_h"):
        Pricing.from_mapping({"on_demand_per_device_h": 0})

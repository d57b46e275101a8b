"""The planner core at many sizes (lmforge/plan/sweep.py) and the fleet arithmetic around it
(lmforge/plan/fleet.py, the cluster file's [failures] and [price] tables): the pruned search finds
what the full search finds where that is affordable, the scaling step times are the core's
predictions, sizes without a layout say why, checkpoint intervals and energy are the closed forms
of the inputs."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from lmforge.cli_plan import load_base_job
from lmforge.config.loader import ConfigError
from lmforge.plan.cluster import ClusterError, load_cluster, preset_names
from lmforge.plan.failures import daly_goodput, daly_interval, young_interval
from lmforge.plan.fleet import checkpoint_tier, energy_preflight, failure_model, intervals
from lmforge.plan.params import total_params
from lmforge.plan.predict import predict
from lmforge.plan.scaling import DEFAULT_SIZES
from lmforge.plan.search import search
from lmforge.plan.sweep import best_at, sweep, weak_batch

REPO = Path(__file__).resolve().parents[2]


def _base(model: str, gbs: int, seq: int):  # noqa: ANN202
    return load_base_job(model, [("train.global_batch_size", str(gbs)), ("train.seq_len", str(seq))])


@pytest.mark.parametrize("model, cluster, gbs, seq, n", [
    ("recipes/tiny-dense.toml", "cpu", 8, 256, 2),
    ("recipes/tiny-dense.toml", "cpu", 8, 256, 4),
    ("recipes/tiny-moe.toml", "cpu", 8, 256, 4),
    ("recipes/tiny-moe.toml", "h100", 32, 256, 8),
    ("8B", "h100", 8, 256, 8),  # the full search's best is a zbv pipeline here
    ("1B", "h100", 64, 2048, 16),
])
def test_pruned_search_finds_the_full_search_best(model: str, cluster: str, gbs: int, seq: int, n: int) -> None:
    base, c = _base(model, gbs, seq), load_cluster(cluster)
    full, _ = search(base, c, n)
    res = best_at(base, c, n)
    assert res.best is not None
    assert res.best.prediction.tokens_per_s == pytest.approx(full[0].prediction.tokens_per_s, rel=1e-9)
    assert res.predicted < len(full) / 4  # and it predicted a fraction of the layouts


def test_step_times_are_the_core_prediction_of_the_chosen_layout() -> None:
    base, c = _base("8B", 1024, 8192), load_cluster("h100")
    results = sweep(base, c, (8, 64, 2048))
    for r in results:
        assert r.best is not None and r.global_batch == 1024
        job = r.best.job
        assert job.parallel.tp * job.parallel.pp * job.parallel.dp_replicate * job.parallel.dp_shard == r.world_size
        assert r.step_s == predict(job, c, r.world_size).step_time.total
    # strong scaling: a fixed batch over more devices takes less time per step, less than linearly
    assert results[0].step_s > results[1].step_s > results[2].step_s
    assert results[0].step_s / results[2].step_s < 2048 / 8


def test_every_default_size_is_a_bounded_search() -> None:
    """12 sizes of an 8B model stay quick: a bounded number of timings and predictions per size
    (the wall time is not asserted on this shared machine; the count is what keeps it down)."""
    base, c = _base("8B", 1024, 8192), load_cluster("h100")
    results = sweep(base, c, DEFAULT_SIZES)
    assert [r.world_size for r in results] == list(DEFAULT_SIZES)
    assert all(r.best is not None and r.predicted <= 60 for r in results[:-1]), [r.predicted for r in results]
    assert results[-1].best is None  # a pipeline needs >= pp sequences per replica: 1,024 x tp 8 < 16,384 ranks


def test_sizes_without_a_layout_say_why() -> None:
    base = _base("recipes/tiny-dense.toml", 8, 256)
    cpu = load_cluster("cpu")  # tp <= 2 (a node), pp <= 4 layers, dp <= 8 sequences: at most 64 ranks
    r = best_at(base, cpu, 128)
    assert r.best is None and math.isinf(r.step_s) and "no valid layout" in r.why and "8 sequences" in r.why
    huge = best_at(_base("70B", 8, 256), load_cluster("h100"), 8)  # 70B x 16 bytes does not fit 8 x 80 GiB
    assert huge.best is None and "no layout fits 80 GiB" in huge.why


def test_weak_batch_keeps_sequences_per_device() -> None:
    assert [weak_batch(8, n, 8) for n in (8, 16, 1024)] == [8, 16, 1024]
    assert weak_batch(8, 6, 2) == 24
    with pytest.raises(ConfigError, match="whole number of sequences"):
        weak_batch(8, 12, 64)


def test_checkpoint_intervals_are_young_and_daly_of_the_fleet() -> None:
    base, h100 = _base("8B", 8, 256), load_cluster("h100")
    disk = checkpoint_tier(base, h100)
    assert disk.write_s == pytest.approx(12 * total_params(base.model) / 100e9)  # preset: 100 GB/s
    rows = intervals(base, h100, (8, 1024, 16_384), runs=2)
    for r in rows:
        mtbf = 3600 * 50_700 / r.devices  # the preset's per-device MTBF, no separate node failures
        assert r.job_mtbf_h == pytest.approx(mtbf / 3600)
        assert r.daly_s == pytest.approx(daly_interval(disk.write_s, mtbf))
        assert r.young_s == pytest.approx(young_interval(disk.write_s, mtbf))
        assert r.daly_goodput == pytest.approx(daly_goodput(r.daly_s, disk.write_s, 600 + disk.write_s, mtbf))
        assert r.daly_s / 4 <= r.sim_best_s <= r.daly_s * 4  # the simulated optimum's search range
    assert rows[0].daly_goodput > rows[1].daly_goodput > rows[2].daly_goodput
    safe = replace(h100, failures=replace(h100.failures, device_mtbf_h=math.inf))
    (never,) = intervals(base, safe, (64,))
    assert math.isinf(never.daly_s) and never.daly_goodput == 1.0 and never.sim_best_goodput == 1.0
    assert failure_model(h100, 64).nodes == 8


def test_energy_preflight_is_steps_times_step_times_power() -> None:
    base, h100 = _base("8B", 8, 256), load_cluster("h100")
    e = energy_preflight(base, h100, step_s=2.0, devices=16)
    assert e.kwh == pytest.approx(base.train.steps * 2.0 * 16 * 700 / 3.6e6)
    assert e.co2e_kg == pytest.approx(e.kwh * 0.480)
    own = replace(base, energy=replace(base.energy, watts_per_device=350.0, carbon_g_per_kwh=50.0))
    assert energy_preflight(own, h100, 2.0, 16).co2e_kg == pytest.approx(e.kwh / 2 * 0.050)


def test_presets_carry_failures_and_prices() -> None:
    for name in preset_names():
        c = load_cluster(name)
        assert c.price is not None and c.price.on_demand_per_device_h > 0
        assert c.price.spot_per_device_h < c.price.reserved_per_device_h < c.price.on_demand_per_device_h
        assert c.failures.device_mtbf_h == 50_700


@pytest.mark.parametrize("table, message", [
    ("[price]\nspot_per_device_h = 1.0\n", "price.on_demand_per_device_h: missing"),
    ("[price]\non_demand_per_device_h = 0\n", "price.on_demand_per_device_h = 0.0: must be a finite number > 0"),
    ("[price]\non_demand_per_device_h = 2\nspot_per_hour = 1\n", "unknown key 'price.spot_per_hour'"),
    ("[failures]\ndevice_mtbf_h = -5\n", "failures.device_mtbf_h = -5.0: must be a finite number > 0"),
    ("[failures]\nstorage_gbps = 'fast'\n", "failures.storage_gbps = 'fast': must be a float"),
])
def test_bad_price_and_failure_tables_are_one_line(tmp_path: Path, table: str, message: str) -> None:
    text = (REPO / "lmforge/plan/presets/cpu.toml").read_text()
    text = text[:text.index("[failures]")] + table  # the preset's own tables replaced
    (tmp_path / "c.toml").write_text(text)
    with pytest.raises(ClusterError) as err:
        load_cluster(str(tmp_path / "c.toml"))
    assert message in str(err.value) and str(tmp_path / "c.toml") in str(err.value) and "\n" not in str(err.value)


def test_cluster_file_without_the_optional_tables() -> None:
    text = (REPO / "lmforge/plan/presets/h100.toml").read_text()
    import tomllib

    from lmforge.plan.cluster import cluster_from_dict

    data = tomllib.loads(text)
    del data["price"], data["failures"]
    c = cluster_from_dict(data)
    assert c.price is None and c.failures.device_mtbf_h == 50_700 and c.failures.restart_s == 600
    assert c.failures.node_mtbf_h == math.inf and c.failures.storage_bytes_per_s == 100e9

"""`lmforge plan --scaling / --cost` and the energy line: the printed tables hold the values the
planner's own functions give (the core's step times, Daly's interval for each size's failure rate,
the cheapest option that meets the deadline), and every bad flag value is one line, exit 2, before
any search runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import REPO

TINY = ["plan", "--model", "recipes/tiny-dense.toml", "--cluster", "cpu", "--top", "1"]
SIZES = ["--sizes", "1,2,4,8,16"]


def _main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    from lmforge.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _rows(out: str, title: str) -> dict[int, list[str]]:
    """The rows of the table whose title line starts with `title`: devices -> fields."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(title))
    rows = {}
    for ln in lines[start + 2:]:
        if not ln.strip() or not ln.split()[0].replace(",", "").isdigit():
            break
        fields = ln.split()
        rows[int(_num(fields[0]))] = fields
    return rows


def _base(model: str = "recipes/tiny-dense.toml", gbs: int | None = None):  # noqa: ANN202
    from lmforge.cli_plan import load_base_job

    return load_base_job(model, [] if gbs is None else [("train.global_batch_size", str(gbs))])


def test_scaling_tables_are_the_core_time_model(capsys: pytest.CaptureFixture) -> None:
    from lmforge.plan.cluster import load_cluster
    from lmforge.plan.sweep import sweep

    code, out, err = _main([*TINY, "--scaling", *SIZES], capsys)
    assert code == 0, err
    strong, weak = _rows(out, "strong scaling"), _rows(out, "weak scaling")
    assert sorted(strong) == sorted(weak) == [1, 2, 4, 8, 16]
    step = {n: _num(f[-6]) for n, f in strong.items()}
    # a fixed batch over more ranks: each step is shorter until communication dominates (16 ranks:
    # past one node of 2, tensor parallel on the critical path) and the step is longer again
    assert step[1] > step[2] > step[4] > step[8] and step[16] > step[8]
    expected = {r.world_size: r.step_s for r in sweep(_base(), load_cluster("cpu"), [1, 2, 4, 8, 16])}
    assert all(step[n] == pytest.approx(expected[n], rel=1e-3) for n in step)
    assert "tp2" in " ".join(strong[16]) and "tp1" in " ".join(strong[8])
    # weak: 8 sequences per rank at every size: the job's tokens/s grows, per rank it cannot
    tps = [_num(weak[n][-5]) for n in (1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(tps, tps[1:]))
    assert all(_num(weak[n][-4]) <= _num(weak[1][-4]) for n in weak)
    assert [_num(weak[n][1]) for n in (1, 2, 4, 8, 16)] == [8, 16, 32, 64, 128]


def test_checkpoint_interval_is_daly_for_each_size_failure_rate(capsys: pytest.CaptureFixture) -> None:
    from lmforge.plan.cluster import load_cluster
    from lmforge.plan.failures import daly_goodput, daly_interval, young_interval
    from lmforge.plan.fleet import checkpoint_tier

    code, out, err = _main([*TINY, "--scaling", "--sizes", "2,64,4096"], capsys)
    assert code == 0, err
    cpu = load_cluster("cpu")
    disk = checkpoint_tier(_base(), cpu)
    rows, strong = _rows(out, "checkpoint interval"), _rows(out, "strong scaling")
    assert sorted(rows) == [2, 64, 4096]
    for n, f in rows.items():
        mtbf = 3600 * 50_700 / n  # the cpu preset's per-device MTBF, no node failures
        assert _num(f[1]) == pytest.approx(mtbf / 3600, abs=0.05)
        assert _num(f[2]) == pytest.approx(young_interval(disk.write_s, mtbf), abs=0.05)
        assert _num(f[3]) == pytest.approx(daly_interval(disk.write_s, mtbf), abs=0.05)
        good = daly_goodput(daly_interval(disk.write_s, mtbf), disk.write_s, 30 + disk.restore_s, mtbf)
        assert _num(f[5]) == pytest.approx(good, abs=1e-4)
        assert _num(f[3]) / 4 <= _num(f[4]) <= _num(f[3]) * 4
        if n in strong and "no" not in strong[n]:
            assert _num(strong[n][-2]) == pytest.approx(good, abs=1e-4)  # the scaling table's goodput
    assert _num(rows[2][3]) > _num(rows[64][3]) > _num(rows[4096][3])  # more devices: checkpoint more often


def _cost_rows(out: str) -> dict[int, list[str]]:
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("cost of "))
    rows = {}
    for ln in lines[start + 2:]:
        f = ln.split()
        if not f or not f[0].replace(",", "").isdigit() or "no" in f[1:3]:
            break
        rows[int(_num(f[0]))] = f
    return rows


def test_cheapest_for_the_deadline_is_the_least_cost_that_meets_it(capsys: pytest.CaptureFixture) -> None:
    from lmforge.plan.cluster import load_cluster
    from lmforge.plan.fleet import cost_options
    from lmforge.plan.sweep import sweep

    code, out, err = _main([*TINY, *SIZES, "--tokens", "1e9", "--deadline-hours", "60"], capsys)
    assert code == 0, err
    rows = _cost_rows(out)
    assert sorted(rows) == [1, 2, 4, 8, 16]
    in_time = {n: f for n, f in rows.items() if f[-1] == "yes"}
    late = {n: f for n, f in rows.items() if f[-1] == "no"}
    assert in_time and late  # the deadline decides something: 1 rank needs ~120 h
    m = re.search(r"^cheapest within 60 h: (\d+) devices .*: cost ([\d.,e+-]+) ", out, re.MULTILINE)
    assert m, out
    assert int(m[1]) == min(in_time, key=lambda n: _num(in_time[n][-3]))
    assert _num(m[2]) == min(_num(f[-3]) for f in in_time.values())
    assert all(_num(f[-4]) <= 60 for f in in_time.values()) and all(_num(f[-4]) > 60 for f in late.values())
    # the same answer from the library, over every size x base x spot share
    cpu = load_cluster("cpu")
    strong = {r.world_size: r for r in sweep(_base(), cpu, [1, 2, 4, 8, 16])}
    best, options = cost_options(_base(), cpu, 1e9, 60, lambda n: strong[n].best.prediction.tokens_per_s,
                                 [1, 2, 4, 8, 16])
    assert best is not None and best.devices == int(m[1])
    assert best.cost == min(o.cost for o in options if o.meets_deadline)
    assert _num(m[2]) == pytest.approx(best.cost, rel=1e-3)
    assert any(o.spot_devices for o in options) and any(o.base == "reserved" for o in options)


def test_an_impossible_deadline_is_one_line(capsys: pytest.CaptureFixture) -> None:
    code, out, err = _main([*TINY, *SIZES, "--tokens", "1e9", "--deadline-hours", "1"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--deadline-hours 1: no size and instance mix trains 1e+09 tokens" in lines[0], err
    assert "the fastest, 8 devices" in lines[0] and "needs" in lines[0]
    assert "cost of 1e+09 tokens" in out  # the table that shows why came first


@pytest.mark.parametrize("extra, needle", [
    (["--scaling", "--sizes", "8,x"], "--sizes '8,x': 'x' is not a whole number"),
    (["--scaling", "--sizes", "0,8"], "0 is out of range; each size must be 1 to 1,048,576 devices"),
    (["--scaling", "--sizes", ",".join(str(i) for i in range(1, 30))], "at most 24"),
    (["--scaling", "--sizes", "3,4"], "no whole number of sequences at 4 devices"),
    (["--sizes", "8,16"], "sets the world sizes of --scaling and --cost; add one of them"),
    (["--cost", "--deadline-hours", "-3"], "--deadline-hours '-3': must be a finite number > 0"),
    (["--deadline-hours", "soon"], "--deadline-hours 'soon': must be a finite number > 0"),
    (["--tokens", "0"], "--tokens '0': must be a finite number > 0"),
    (["--tokens", "inf"], "--tokens 'inf': must be a finite number > 0"),
    (["--plot", "scaling.jpg"], "--plot scaling.jpg: the scaling plot is a PNG"),
])
def test_bad_flag_values_are_one_line_before_any_search(capsys: pytest.CaptureFixture, extra: list[str],
                                                         needle: str) -> None:
    code, out, err = _main([*TINY, *extra], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_cost_needs_prices_in_the_cluster_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = (REPO / "lmforge/plan/presets/cpu.toml").read_text()
    (tmp_path / "c.toml").write_text(text[:text.index("[price]")])
    code, out, err = _main(["plan", "--model", "recipes/tiny-dense.toml", "--cluster", str(tmp_path / "c.toml"),
                            "--cost"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "has no [price] table" in err, err
    (tmp_path / "c.toml").write_text(text.replace("on_demand_per_device_h = 0.05", "on_demand_per_device_h = -1"))
    code, out, err = _main(["plan", "--model", "recipes/tiny-dense.toml", "--cluster", str(tmp_path / "c.toml")],
                           capsys)
    assert code == 2 and "price.on_demand_per_device_h = -1.0: must be a finite number > 0" in err, err


def test_plot_is_written_and_implies_scaling(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    png = tmp_path / "scaling.png"
    code, out, err = _main([*TINY, "--sizes", "1,2,4", "--plot", str(png)], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in out
    assert "weak scaling" in out and "strong scaling" in out and "cost of" not in out


def test_energy_preflight_line_is_steps_times_step_time_times_power(capsys: pytest.CaptureFixture) -> None:
    from lmforge.plan.cluster import load_cluster
    from lmforge.plan.search import search

    code, out, err = _main(TINY, capsys)
    assert code == 0, err
    m = re.search(r"^energy \(pre-flight, best layout\): 480 steps x ([\d.]+) s x 2 devices x 15 W = ([\d.e-]+) kWh, "
                  r"([\d.e-]+) kg CO2e at 480 g CO2e/kWh", out, re.MULTILINE)
    assert m, out
    best = search(_base(), load_cluster("cpu"), 2)[0][0]
    step = best.prediction.step_time.total
    assert float(m[1]) == pytest.approx(step, rel=1e-3)
    assert float(m[2]) == pytest.approx(480 * step * 2 * 15 / 3.6e6, rel=1e-3)
    assert float(m[3]) == pytest.approx(float(m[2]) * 0.480, rel=1e-3)


def test_a_named_size_on_h100_over_the_default_sizes(capsys: pytest.CaptureFixture) -> None:
    """The issue's example: 8 to 16,384 GPUs. With 8 sequences per step a pipeline needs at least pp
    sequences per replica, so strong scaling ends at 8 x tp 8 = 64 GPUs; weak scaling goes on."""
    code, out, err = _main(["plan", "--model", "8B", "--cluster", "h100", "--top", "1", "--scaling"], capsys)
    assert code == 0, err
    strong, weak, rows = _rows(out, "strong scaling"), _rows(out, "weak scaling"), _rows(out, "checkpoint interval")
    sizes = [2**i for i in range(3, 15)]
    assert sorted(strong) == sorted(weak) == sorted(rows) == sizes
    assert all("no valid layout" in " ".join(strong[n]) for n in sizes if n > 64)
    assert all("no" not in weak[n][2:4] for n in sizes)
    daly = [_num(rows[n][3]) for n in sizes]
    assert all(a > b for a, b in zip(daly, daly[1:]))
    good = [_num(weak[n][-2]) for n in sizes]
    assert all(a >= b for a, b in zip(good, good[1:])) and good[-1] < 0.99


def test_impossible_deadline_in_a_real_process() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lmforge", *TINY, "--sizes", "1,2", "--tokens", "1e12",
                           "--deadline-hours", "24"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("lmforge plan: --deadline-hours 24: no size and instance mix"), proc.stderr
    assert "cost of 1e+12 tokens" in proc.stdout


def test_the_cpu_preset_says_it_is_not_a_measurement_of_this_machine(capsys, tmp_path) -> None:
    """The `cpu` preset was measured on a Zen 3 (AVX2 only); on another CPU its figures are not this
    machine's, so the plan says so and names the command that measures this one. A cluster file
    (here the preset's own text, copied) is the user's own claim: no such line."""
    from lmforge.plan.cluster import PRESETS_DIR

    code, out, _ = _main(TINY, capsys)
    assert code == 0
    assert "on cpu (2 x AMD EPYC Zen 3 (2 cores, AVX2 only), 10 GiB each)" in out.splitlines()[0]
    assert out.splitlines()[1] == ("cluster cpu: a preset measured on a 2-core AVX2-only Zen 3; "
                                   "`lmforge bench cluster --out HERE.toml` measures this machine")
    mine = tmp_path / "mine.toml"
    mine.write_text((PRESETS_DIR / "cpu.toml").read_text())
    code, out, _ = _main([*TINY[:4], str(mine), *TINY[5:]], capsys)
    assert code == 0 and "bench cluster" not in out

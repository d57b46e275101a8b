"""`lmforge bench cluster`: this machine measured into a cluster file that `lmforge plan` loads (the
probe fits are tested in tests/unit/test_plan_calibration.py and run in bench/plan_accuracy.py);
bad arguments are one line and exit 2 before anything is measured."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lmforge.plan.cluster import COLLECTIVE_KINDS, load_cluster
from tests.helpers.cli import REPO

PY = [sys.executable, "-m", "lmforge"]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*PY, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.mark.timed
def test_measured_file_loads_and_plans(tmp_path: Path) -> None:
    out = tmp_path / "here.toml"
    proc = _run("bench", "cluster", "--out", str(out), "--no-probes")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = tomllib.loads(out.read_text())
    cluster = load_cluster(str(out))
    assert cluster.accelerator.peak_flops("fp32") > 1e9  # any CPU we meet does > 1 GFLOP/s on one core
    assert 0 < cluster.efficiency.max <= 1 and cluster.accelerator.hbm_bytes_per_s > 1e8
    assert cluster.collectives is not None and set(cluster.collectives.points) == set(COLLECTIVE_KINDS)
    for kind, pts in cluster.collectives.points.items():
        assert len(pts) == 7 and all(t > 0 for _, t in pts), kind
        # a 16 MiB collective costs more than a 4 KiB one on any host
        assert pts[-1][1] > pts[0][1], kind
    assert data["efficiency"]["tp_block_us"] == 0.0  # --no-probes: the fixed costs are not fitted
    assert "measured by `lmforge bench cluster`" in data["description"]
    plan = _run("plan", "--model", "recipes/tiny-dense.toml", "--cluster", str(out), "--seq-len", "128",
                "--global-batch", "8")
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "layouts fit" in plan.stdout and "on cpu-calibrated" in plan.stdout


@pytest.mark.parametrize("args, needle", [
    (["--out", "{tmp}/x.json"], "give a path ending in .toml"),
    (["--out", "{tmp}/exists.toml"], "exists; pass --overwrite"),
    (["--out", "{tmp}/x.toml", "--ranks", "1"], "--ranks 1: must be 2 to"),
    (["--out", "{tmp}/x.toml", "--probe-steps", "2"], "--probe-steps 2: must be >= 5"),
    (["--out", "{tmp}/x.toml", "--probe-rounds", "0"], "--probe-rounds 0: must be >= 1"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "exists.toml").write_text("kept")
    proc = _run("bench", "cluster", *[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert (tmp_path / "exists.toml").read_text() == "kept"
    assert not (tmp_path / "x.toml").exists()


def test_probes_run_in_interleaved_rounds_and_pool_their_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every probe once per round, round after round (noise lands on one run of each), and each
    probe's time is the lower quartile of all its steps (the probe undisturbed), not of one run."""
    from lmforge import cli_bench
    from lmforge.plan.calibration import FITS

    calls: list[tuple[str, int]] = []
    fake = {0: [1.0, 1.0, 9.0], 1: [2.0, 2.0, 2.0], 2: [3.0, 1.5, 1.5]}

    def steps(probe, steps: int, work: Path, round_: int):  # noqa: ANN001, ANN202
        calls.append((probe.name, round_))
        return [t * (1 + probe.ranks) for t in fake[round_]], work / f"{probe.name}-{round_}"

    monkeypatch.setattr(cli_bench, "_probe_steps", steps)
    probes = [p for fit in FITS for p in fit.probes]
    out = cli_bench.measure_probes(probes, 14, 3, tmp_path)
    names = [p.name for p in probes]
    assert calls == [(n, r) for r in range(3) for n in names]
    for p in probes:  # pooled steps 1, 1, 1.5, 1.5, 2, 2, 2, 3, 9: lower quartile 1.5 (the median: 2)
        assert out[p.name] == (1.5 * (1 + p.ranks), tmp_path / f"{p.name}-2")

"""Pre-flight energy estimate vs the energy of the run: tiny-dense for 30 steps on this machine.

The run is measured with lmforge.observability.energy.EnergyMeter (RAPL when readable, else the stated
TDP estimate: `CPU_WATTS_PER_THREAD` per busy thread x process CPU time), one record per optimizer step
(the meter wraps Trainer.train_step here). The pre-flight estimate is made before the run from
the recipe and a cluster file alone, with the arithmetic of `lmforge plan`'s energy line: the
planner's predicted step time (lmforge.plan.predict) on one device of the cluster x steps x watts,
here the meter's own watts (`lmforge plan` takes the cluster's `power_w`, 15 W per device in the
`cpu` preset). The cluster is this machine calibrated first (`lmforge bench cluster`,
~4 min; `--cluster FILE` takes a file as it is): a CPU device of the planner is one core, so the run
trains on one thread. With no energy counter both sides use the same watts, so the check is then a
check of the step-time prediction; said in the output. Also checks that the run's total equals the
sum of its per-step records.

    PYTHONPATH=. python bench/energy_preflight.py [--steps 30] [--cluster calibrate|FILE]
        [--data-dir /tmp/lmforge-energy-data]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmforge.config import load_job_config, parse_override_args  # noqa: E402
from lmforge.config.energy import EnergyConfig  # noqa: E402
from lmforge.observability.energy import EnergyMeter, open_source, preflight_estimate, tdp_watts  # noqa: E402
from lmforge.plan.cluster import load_cluster  # noqa: E402
from lmforge.plan.predict import predict  # noqa: E402
from lmforge.train.trainer import Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402
from plan_accuracy import calibrate  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-dense.toml"
TOLERANCE = 0.25


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "lmforge-energy-data")
    ap.add_argument("--carbon", type=float, default=EnergyConfig().carbon_g_per_kwh, help="g CO2e per kWh")
    ap.add_argument("--cluster", default="calibrate",
                    help="'calibrate' (measure this machine first, the default), a preset name or a cluster file")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the planner's CPU device is one core
    with tempfile.TemporaryDirectory() as tmp:
        cluster_path = args.cluster
        if cluster_path == "calibrate":
            cluster_path = str(Path(tmp) / "here.toml")
            calibrate(Path(cluster_path))
        overrides = ["--data.dir", str(args.data_dir), "--train.output_dir", str(Path(tmp) / "run"),
                     "--train.mixed_precision", "fp32", "--train.stop_at", str(args.steps),
                     "--train.eval_interval", "0", "--checkpoint.enabled", "false", "--metrics.progress", "none",
                     "--metrics.tensorboard", "false", "--metrics.plot", "false", "--metrics.peak_flops", "1e11"]
        cfg = load_job_config(str(RECIPE), parse_override_args(overrides))
        predicted_step_s = predict(cfg, load_cluster(cluster_path), 1).step_time.total
        watts = tdp_watts(None, cpu_threads=1)
        est = preflight_estimate(predicted_step_s, args.steps, watts, carbon_g_per_kwh=args.carbon)
        print(f"pre-flight (one core of {cluster_path if args.cluster != 'calibrate' else 'this machine, calibrated'}):"
              f" {predicted_step_s:.3f} s/step predicted x {args.steps} steps x {watts:g} W = {est.joules:.0f} J "
              f"({est.kwh * 1000:.3f} Wh, {est.co2e_kg * 1000:.3f} g CO2e at {args.carbon:g} g/kWh)")
        trainer = Trainer(cfg, echo=False)
        meter = EnergyMeter(open_source(EnergyConfig()), carbon_g_per_kwh=args.carbon)
        inner = trainer.train_step

        def metered_step():  # the 3 lines the trainer gets: one record per optimizer step
            result = inner()
            meter.step()
            return result

        trainer.train_step = metered_step  # type: ignore[method-assign]
        try:
            meter.start()
            t0 = time.perf_counter()
            trainer.fit()
            wall = time.perf_counter() - t0
        finally:
            trainer.close()
    s = meter.summary()
    print(f"run: {len(meter.records)} steps in {wall:.1f} s ({wall / len(meter.records):.3f} s/step), "
          f"source: {s['energy_source']}; measured: {s['energy_measured']}")
    print(f"run total {meter.total():.1f} J = {s['energy_kwh'] * 1000:.3f} Wh, {s['co2e_kg'] * 1000:.3f} g CO2e; "
          f"sum of per-step records {math.fsum(meter.records):.1f} J")
    if not s["energy_measured"]:
        print("no energy counter readable here: both sides are watts x time, so this compares the predicted "
              "step time with the measured one")
    assert len(meter.records) == args.steps and meter.total() == math.fsum(meter.records)
    ratio = est.joules / meter.total()
    print(f"pre-flight / run energy: {ratio:.3f} (within {TOLERANCE:.0%}: {abs(ratio - 1) <= TOLERANCE})")
    return verdict("energy_preflight", "the run's metered energy", "1 - |pre-flight / run - 1|",
                   1 - abs(ratio - 1), 1 - TOLERANCE)


if __name__ == "__main__":
    sys.exit(main())

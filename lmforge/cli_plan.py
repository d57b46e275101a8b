"""`lmforge plan`: rank the parallel layouts of a model on a cluster and write the best as a
recipe. The work is in lmforge/plan/ (arithmetic only); this module parses, loads and prints."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

__all__ = ["add_plan_command"]


def load_base_job(model: str, overrides: list[tuple[str, str]]):  # noqa: ANN201 (JobConfig, imported late)
    """A recipe TOML or a named size (`lmforge sizes`) -> a JobConfig with its layout reset (the
    search chooses it), validated on one rank so a bad model or train section is one line."""
    from lmforge.config import ConfigError, JobConfig, ParallelConfig
    from lmforge.config.loader import apply_override, build_dataclass, load_toml
    from lmforge.models.registry import FAMILIES

    sizes = {n: c for fam in FAMILIES.values() for n, c in fam.sizes.items()}
    if model in sizes and not Path(model).exists():
        cfg = JobConfig(model=replace(sizes[model]))
        cfg.tokenizer.vocab_size = min(cfg.tokenizer.vocab_size, cfg.model.vocab_size)
        cfg.train.seq_len = min(cfg.train.seq_len, cfg.model.max_seq_len)
    elif model.endswith(".toml") or Path(model).exists():
        cfg = build_dataclass(JobConfig, load_toml(model), where=model)
    else:
        raise ConfigError("--model", model, f"a recipe .toml file or a size: {', '.join(sizes)}", "command line")
    for key, value in overrides:
        apply_override(cfg, key, value)
    cfg.parallel = ParallelConfig(backend=cfg.parallel.backend, sequence_parallel=cfg.parallel.sequence_parallel,
                                  loss_parallel=cfg.parallel.loss_parallel)
    cfg.train = replace(cfg.train, micro_batch_size=min(cfg.train.micro_batch_size, cfg.train.global_batch_size))
    if cfg.train.global_batch_size % cfg.train.micro_batch_size:
        cfg.train.micro_batch_size = 1
    cfg.scheduler.warmup_steps = min(cfg.scheduler.warmup_steps, cfg.train.steps)
    cfg.validate(1)
    return cfg


MAX_SIZES = 24  # each size is a layout search (lmforge/plan/sweep.py): keep the tables quick
MAX_WORLD = 2**20


def parse_sizes(text: str) -> list[int]:
    """`--sizes 8,16,64` -> sorted distinct world sizes; anything else is one UserError line."""
    from lmforge.cli_errors import UserError

    sizes = set()
    for part in text.split(","):
        try:
            n = int(part.strip())
        except ValueError:
            raise UserError(f"--sizes {text!r}: {part.strip()!r} is not a whole number; give world sizes "
                            "separated by commas, e.g. 8,64,512") from None
        if not 1 <= n <= MAX_WORLD:
            raise UserError(f"--sizes {text!r}: {n} is out of range; each size must be 1 to {MAX_WORLD:,} devices")
        sizes.add(n)
    if len(sizes) > MAX_SIZES:
        raise UserError(f"--sizes {text!r}: {len(sizes)} sizes; at most {MAX_SIZES} (each is a layout search)")
    return sorted(sizes)


def parse_positive(text: str, flag: str, example: str) -> float:
    """A finite number > 0 (`1e12` allowed), or one UserError line."""
    from lmforge.cli_errors import UserError

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{flag} {text!r}: must be a finite number > 0, e.g. {example}")
    return value


def _sections(args: argparse.Namespace, cluster, base  # noqa: ANN001 (Cluster, JobConfig: imported late)
              ) -> tuple[bool, bool, list[int], float, float | None]:
    """Which of --scaling / --cost to print, their sizes, the deadline and tokens, every flag
    checked before any search runs (a bad value costs no waiting)."""
    from lmforge.cli_errors import UserError
    from lmforge.plan.scaling import DEFAULT_SIZES

    scaling = args.scaling or args.plot is not None
    cost = args.cost or args.deadline_hours is not None or args.tokens is not None
    if args.sizes is not None and not (scaling or cost):
        raise UserError(f"--sizes {args.sizes}: sets the world sizes of --scaling and --cost; add one of them")
    sizes = parse_sizes(args.sizes) if args.sizes is not None else list(DEFAULT_SIZES)
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise UserError(f"--plot {args.plot}: the scaling plot is a PNG; give a path ending in .png")
    deadline = math.inf
    if args.deadline_hours is not None:
        deadline = parse_positive(args.deadline_hours, "--deadline-hours", "720")
    tokens = parse_positive(args.tokens, "--tokens", "1.5e12") if args.tokens is not None else None
    if cost and cluster.price is None:
        raise UserError(f"--cost: cluster {args.cluster} has no [price] table; add one with on_demand_per_device_h "
                        "(and optionally reserved_per_device_h, spot_per_device_h, spot_preemptions_per_node_h; "
                        "see lmforge/plan/cluster.py)")
    gbs = base.train.global_batch_size
    if scaling and any(gbs * n % sizes[0] for n in sizes):
        bad = next(n for n in sizes if gbs * n % sizes[0])
        raise UserError(f"--sizes {','.join(map(str, sizes))}: weak scaling keeps {gbs} sequences per {sizes[0]} "
                        f"devices, which is no whole number of sequences at {bad} devices; use sizes that are "
                        "multiples of the smallest")
    return scaling, cost, sizes, deadline, tokens


def print_scaling(args: argparse.Namespace, cluster, base, sizes: list[int], strong) -> None:  # noqa: ANN001
    """Weak and strong scaling tables with goodput, the checkpoint interval per size, the plot."""
    from lmforge.plan.fleet import checkpoint_tier, failure_model, intervals
    from lmforge.plan.params import total_params
    from lmforge.plan.scale_report import TIME_MODEL, format_failures, format_intervals, format_scaling
    from lmforge.plan.scaling import goodput_fn, strong_scaling, weak_scaling, write_scaling_plot
    from lmforge.plan.sweep import sweep, weak_batch

    gbs, seq, ref = base.train.global_batch_size, base.train.seq_len, sizes[0]
    disk = checkpoint_tier(base, cluster)
    goodput = goodput_fn(failure_model(cluster, ref), disk)
    weak = sweep(base, cluster, sizes, lambda n: weak_batch(gbs, n, ref))
    print()
    print(format_failures(cluster, disk, total_params(base.model)))
    series = {}
    for name, results, fn in (("weak", weak, weak_scaling), ("strong", strong, strong_scaling)):
        ok = [r for r in results if r.best is not None]
        step = {r.world_size: r.step_s for r in ok}
        per = gbs * seq / ref if name == "weak" else gbs * seq
        rows = fn(step.__getitem__, per, [r.world_size for r in ok], goodput) if ok else []
        series[name] = rows
        what = (f"{gbs} sequences x {seq} tokens per step at {ref:,} device{'s' * (ref > 1)}, grown with the devices"
                if name == "weak"
                else f"{gbs} sequences x {seq} tokens per step at every size")
        print()
        for line in format_scaling(f"{name} scaling ({what}); {TIME_MODEL}; scaling eff: tokens/s per device over "
                                   f"the first row's", results, rows):
            print(line)
    print()
    for line in format_intervals(intervals(base, cluster, sizes)):
        print(line)
    if args.plot is not None:
        drawn = {k: v for k, v in series.items() if v}
        out = write_scaling_plot(drawn, args.plot, f"{args.model} on {cluster.name}: planner time model, "
                                                   "dashed: x goodput")
        print(f"wrote {out}")


def print_cost(cluster, base, strong, deadline: float, tokens: float | None) -> None:  # noqa: ANN001
    """Cost per trained token per size and the cheapest size and instance mix within the deadline."""
    from lmforge.cli_errors import UserError
    from lmforge.plan.fleet import cost_options
    from lmforge.plan.report import layout_name
    from lmforge.plan.scale_report import format_cost, mix_name, money

    gbs, seq, steps = base.train.global_batch_size, base.train.seq_len, base.train.steps
    total = tokens if tokens is not None else float(steps * gbs * seq)
    ok = {r.world_size: r for r in strong if r.best is not None}
    p = cluster.price
    prices = f"on-demand {p.on_demand_per_device_h:g}"
    if p.reserved_per_device_h is not None:
        prices += f", reserved {p.reserved_per_device_h:g}"
    if p.spot_per_device_h is not None:
        prices += (f", spot {p.spot_per_device_h:g} (a spot node reclaimed {p.spot_preemptions_per_node_h:g} times "
                   "an hour: each stops the whole job)")
    source = "--tokens" if tokens is not None else f"train.steps {steps:,} x {gbs} x {seq} tokens"
    within = f"within {deadline:,.4g} h" if math.isfinite(deadline) else "with no deadline"
    print()
    print(f"cost of {total:.4g} tokens ({source}) {within}; per device-hour from the cluster file's [price]: {prices}; "
          f"{gbs} sequences per step at every size (the strong-scaling layouts), restarts after failures and "
          "preemptions counted (Daly's interval)")
    if not ok:
        raise UserError(f"--cost: no size of {', '.join(f'{r.world_size:,}' for r in strong)} has a layout "
                        f"({strong[-1].why}); change --sizes or --global-batch")
    best, options = cost_options(base, cluster, total, deadline, lambda n: ok[n].best.prediction.tokens_per_s,
                                 sorted(ok))
    for line in format_cost(strong, options, deadline):
        print(line)
    if best is None:
        fastest = min(options, key=lambda o: o.wall_h)
        raise UserError(f"--deadline-hours {deadline:g}: no size and instance mix trains {total:.4g} tokens in time; "
                        f"the fastest, {fastest.devices:,} devices {mix_name(fastest)}, needs {fastest.wall_h:,.4g} h; "
                        "allow more hours, add larger --sizes or train fewer --tokens")
    print(f"cheapest {within}: {best.devices:,} devices ({layout_name(ok[best.devices].best.job)}), {mix_name(best)}: "
          f"cost {money(best.cost)} ({best.cost_per_million_tokens:.4g} per 1M tokens), {best.wall_h:,.4g} h, goodput "
          f"{best.goodput:.4f}, {best.interruptions_per_h:.3g} interruptions/h")


def cmd_plan(args: argparse.Namespace) -> int:
    from lmforge.cli_errors import UserError
    from lmforge.plan.cluster import ClusterError, load_cluster
    from lmforge.plan.fleet import energy_preflight
    from lmforge.plan.report import format_ranking, layout_name, write_recipe
    from lmforge.plan.scale_report import format_energy
    from lmforge.plan.search import search
    from lmforge.plan.sweep import sweep

    try:
        cluster = load_cluster(args.cluster, nodes=args.nodes)
    except ClusterError as e:
        raise UserError(str(e)) from None
    overrides = []
    if args.global_batch is not None:
        overrides.append(("train.global_batch_size", str(args.global_batch)))
    if args.seq_len is not None:
        overrides.append(("train.seq_len", str(args.seq_len)))
    for flag, value in (("--world-size", args.world_size), ("--top", args.top)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    if args.out:
        from lmforge.storage.guard import check_output_file

        check_output_file(Path(args.out), args.overwrite, {"--model": args.model, "--cluster": args.cluster})
    base = load_base_job(args.model, overrides)
    scaling, cost, sizes, deadline, tokens = _sections(args, cluster, base)
    ws = cluster.world_size if args.world_size is None else args.world_size
    cands, dropped = search(base, cluster, ws)
    print(f"plan: {args.model} on {cluster.name} ({ws} x {cluster.accelerator.name}, "
          f"{cluster.accelerator.memory_bytes / 2**30:.0f} GiB each), global batch {base.train.global_batch_size} x "
          f"seq {base.train.seq_len}")
    if args.cluster == "cpu" and not Path(args.cluster).exists():
        print("cluster cpu: a preset measured on a 2-core AVX2-only Zen 3; `lmforge bench cluster --out HERE.toml` "
              "measures this machine")
    for line in format_ranking(cands, dropped, args.top):
        print(line)
    if cands:
        best = cands[0]
        step_s = best.prediction.step_time.total
        e = energy_preflight(best.job, cluster, step_s, ws)
        print(format_energy(e, best.job.train.steps, step_s, ws,
                            best.job.energy.watts_per_device or cluster.accelerator.power_w,
                            best.job.energy.carbon_g_per_kwh))
    if cands and args.out:
        best = cands[0]
        job = replace(best.job, train=replace(best.job.train, output_dir=args.run_dir or best.job.train.output_dir))
        header = [f"lmforge plan --model {args.model} --cluster {args.cluster}: {layout_name(job)}",
                  f"predicted {best.prediction.tokens_per_s:,.0f} tokens/s, {best.prediction.step_time.total:.3g} s/step, "
                  f"{best.prediction.memory.total / 2**30:.2f} GiB per rank; run with --nproc {ws}"]
        print(f"wrote {write_recipe(args.out, job, header)} (lmforge train {args.out} --nproc {ws})")
    strong = sweep(base, cluster, sizes) if (scaling or cost) else []
    if scaling:
        print_scaling(args, cluster, base, sizes, strong)
    if cost:
        print_cost(cluster, base, strong, deadline, tokens)
    if not cands:
        raise UserError(f"no layout of {args.model} fits {ws} x {cluster.accelerator.memory_bytes / 2**30:.0f} GiB "
                        f"({dropped} valid layouts predicted over memory); use more nodes or a smaller batch")
    return 0


def add_plan_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="rank parallel layouts of a model on a cluster by predicted tokens/s; optionally "
                                    "scaling, checkpoint interval and cost tables at many sizes")
    p.add_argument("--model", required=True, help="recipe .toml or a named size (lmforge sizes)")
    p.add_argument("--cluster", required=True, help="cluster .toml or a preset: cpu, a100, h100, h200, b200")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--nodes", type=int, default=None, help="nodes to use (default: the cluster file's)")
    p.add_argument("--world-size", type=int, default=None, help="ranks (default: nodes x devices per node)")
    p.add_argument("--top", type=int, default=5, help="layouts to print")
    p.add_argument("--out", default=None, help="write the best layout as a recipe here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--run-dir", default=None, help="train.output_dir of the written recipe")
    at = p.add_argument_group("at scale (the fastest layout at each of --sizes, by the same time model)")
    at.add_argument("--scaling", action="store_true",
                    help="print weak and strong scaling tables (tokens/s, scaling efficiency, goodput under the "
                         "cluster's [failures]) and the best checkpoint interval per size (Young, Daly, simulated)")
    at.add_argument("--sizes", default=None, metavar="N,N,...",
                    help="world sizes of --scaling and --cost (default 8,16,...,16384); weak scaling keeps the "
                         "global batch per device of the smallest")
    at.add_argument("--plot", default=None, metavar="PATH.png", help="also write the scaling plot (implies --scaling)")
    at.add_argument("--cost", action="store_true",
                    help="print cost per trained token per size and the cheapest size and instance mix (on-demand, "
                         "reserved, spot share; preemption restarts counted), prices from the cluster's [price]")
    at.add_argument("--deadline-hours", default=None, metavar="H",
                    help="wall-clock hours the run must finish in (implies --cost; default: no deadline)")
    at.add_argument("--tokens", default=None, metavar="N",
                    help="tokens to train for --cost, e.g. 1.5e12 (implies --cost; default: train.steps x global "
                         "batch x seq len)")
    p.set_defaults(func=cmd_plan)

"""`lmforge plan`: rank the parallel layouts of a model on a cluster and write the best as a
recipe. The work is in lmforge/plan/ (arithmetic only); this module parses, loads and prints."""

from __future__ import annotations

import argparse
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


def cmd_plan(args: argparse.Namespace) -> int:
    from lmforge.cli_errors import UserError
    from lmforge.plan.cluster import ClusterError, load_cluster
    from lmforge.plan.report import format_ranking, layout_name, write_recipe
    from lmforge.plan.search import search

    try:
        cluster = load_cluster(args.cluster, nodes=args.nodes)
    except ClusterError as e:
        raise UserError(str(e)) from None
    overrides = []
    if args.global_batch is not None:
        overrides.append(("train.global_batch_size", str(args.global_batch)))
    if args.seq_len is not None:
        overrides.append(("train.seq_len", str(args.seq_len)))
    base = load_base_job(args.model, overrides)
    ws = args.world_size or cluster.world_size
    cands, dropped = search(base, cluster, ws)
    print(f"plan: {args.model} on {cluster.name} ({ws} x {cluster.accelerator.name}, "
          f"{cluster.accelerator.memory_bytes / 2**30:.0f} GiB each), global batch {base.train.global_batch_size} x "
          f"seq {base.train.seq_len}")
    for line in format_ranking(cands, dropped, args.top):
        print(line)
    if not cands:
        raise UserError(f"no layout of {args.model} fits {ws} x {cluster.accelerator.memory_bytes / 2**30:.0f} GiB "
                        f"({dropped} valid layouts predicted over memory); use more nodes or a smaller batch")
    if args.out:
        best = cands[0]
        job = replace(best.job, train=replace(best.job.train, output_dir=args.run_dir or best.job.train.output_dir))
        header = [f"lmforge plan --model {args.model} --cluster {args.cluster}: {layout_name(job)}",
                  f"predicted {best.prediction.tokens_per_s:,.0f} tokens/s, {best.prediction.step_time.total:.3g} s/step, "
                  f"{best.prediction.memory.total / 2**30:.2f} GiB per rank; run with --nproc {ws}"]
        print(f"wrote {write_recipe(args.out, job, header)} (lmforge train {args.out} --nproc {ws})")
    return 0


def add_plan_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="rank parallel layouts of a model on a cluster by predicted tokens/s")
    p.add_argument("--model", required=True, help="recipe .toml or a named size (lmforge sizes)")
    p.add_argument("--cluster", required=True, help="cluster .toml or a preset: cpu, a100, h100, h200, b200")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--nodes", type=int, default=None, help="nodes to use (default: the cluster file's)")
    p.add_argument("--world-size", type=int, default=None, help="ranks (default: nodes x devices per node)")
    p.add_argument("--top", type=int, default=5, help="layouts to print")
    p.add_argument("--out", default=None, help="write the best layout as a recipe here")
    p.add_argument("--run-dir", default=None, help="train.output_dir of the written recipe")
    p.set_defaults(func=cmd_plan)

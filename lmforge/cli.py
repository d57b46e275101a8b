"""`lmforge <command>`: each command reads files and writes files, and can be rerun alone.

User-caused errors (config, data, checkpoint, paths) print one line and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lmforge.config import ConfigError, load_job_config, parse_override_args


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception classes whose message is a complete one-line explanation for the user."""
    from lmforge.checkpoint.manager import CheckpointError
    from lmforge.data.errors import DataError
    from lmforge.models.llama.hf import HFFormatError
    from lmforge.observability.errors import ObservabilityError
    from lmforge.serve.generate import GenerationError

    return (ConfigError, CheckpointError, DataError, HFFormatError, GenerationError, ObservabilityError,
            FileNotFoundError)


def _job_config(args: argparse.Namespace):
    from lmforge.parallel.mesh import world_size_from_env

    overrides = parse_override_args(args.overrides)
    return load_job_config(args.recipe, overrides, world_size=world_size_from_env())


def _pop_nproc(overrides: list[str]) -> tuple[int, list[str]]:
    """Take `--nproc N` (or `--nproc=N`) out of the override list."""
    rest, nproc, i = [], 1, 0
    while i < len(overrides):
        arg = overrides[i]
        if arg == "--nproc" or arg.startswith("--nproc="):
            value = arg.split("=", 1)[1] if "=" in arg else (overrides[i + 1] if i + 1 < len(overrides) else "")
            if not value.isdigit() or int(value) < 1:
                raise ConfigError("--nproc", value, "must be a positive integer (processes on this machine)",
                                  "command line")
            nproc = int(value)
            i += 1 if "=" in arg else 2
            continue
        rest.append(arg)
        i += 1
    return nproc, rest


def _launch_torchrun(nproc: int, args: argparse.Namespace) -> int:
    """Re-run this command under torchrun with `nproc` local processes (validated first)."""
    import subprocess

    load_job_config(args.recipe, parse_override_args(args.overrides), world_size=nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lmforge", "train", *([args.recipe] if args.recipe else []), *args.overrides]
    return subprocess.call(cmd)


def cmd_train(args: argparse.Namespace) -> int:
    nproc, args.overrides = _pop_nproc(args.overrides)
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_torchrun(nproc, args)
    cfg = _job_config(args)  # validated before any process group starts
    from lmforge.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        losses = trainer.fit()
        if trainer.is_main and losses:
            print(f"done: step {trainer.state.step}, logged loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
                  f"outputs in {cfg.train.output_dir}", flush=True)
    finally:
        trainer.close()
    if trainer.info.world_size > 1:
        # gloo worker teardown aborts now and then after destroy_process_group (PYTORCH_ON_CPU.md):
        # everything is saved and flushed, so leave without running interpreter finalisers.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    cfg = _job_config(args)
    from lmforge.data.pack import prepare_data

    out = prepare_data(cfg.data, cfg.tokenizer, log=print)
    print(f"data ready in {out}")
    return 0


def cmd_sizes(args: argparse.Namespace) -> int:
    from lmforge.models.llama import SIZES, count_params
    from lmforge.observability.flops import training_flops_per_token

    # `active`: parameters one token uses (MoE: router + top_k + shared experts); = params when dense.
    w = max(len(n) for n in SIZES)
    print(f"{'size':>{w}} {'params':>17} {'active':>17} {'non-embedding':>17} {'layers':>6} {'dim':>6} "
          f"{'heads':>5} {'kv':>3} {'experts':>9} {'train GFLOP/token @2048':>24}")
    for name, cfg in SIZES.items():
        c = count_params(cfg)
        seq = min(2048, cfg.max_seq_len)
        flops = training_flops_per_token(cfg, seq) / 1e9
        experts = f"{cfg.moe.top_k}/{cfg.moe.n_experts}" if cfg.moe.n_experts else "-"
        print(f"{name:>{w}} {c['total']:>17,} {c.get('active', c['total']):>17,} {c['non_embedding']:>17,} "
              f"{cfg.n_layers:>6} {cfg.dim:>6} {cfg.n_heads:>5} {cfg.kv_heads:>3} {experts:>9} {flops:>24.3f}")
    return 0


def cmd_bench_peak(args: argparse.Namespace) -> int:
    from lmforge.observability.peak import run_peak_benchmark

    results = run_peak_benchmark(dtypes=args.dtypes.split(","), n=args.n, force=args.force)
    for key, value in results.items():
        print(f"{key}: {value / 1e9:,.1f} GFLOP/s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lmforge.models.llama.hf import export_hf
    from lmforge.serve.generate import load_for_generation
    from lmforge.train.precision import DTYPES

    model, cfg, tokenizer_json = load_for_generation(Path(args.source))
    export_hf(model, cfg, Path(args.out), tokenizer_json=tokenizer_json, dtype=DTYPES[args.dtype],
              overwrite=args.overwrite, max_shard_bytes=args.max_shard_size)
    print(f"exported {args.source} -> {args.out} (config.json, model.safetensors"
          f"{', tokenizer' if tokenizer_json else ''})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from lmforge.serve.hf_import import import_to_run

    step_dir = import_to_run(Path(args.hf_dir), Path(args.out))
    print(f"imported {args.hf_dir} -> {step_dir}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.serve.generate import generate, load_for_generation

    model, cfg, tokenizer_json = load_for_generation(Path(args.source), device=args.device)
    if tokenizer_json is None:
        raise FileNotFoundError(f"no tokenizer.json found with {args.source}; generation needs one")
    tok = TextTokenizer.from_file(tokenizer_json)
    ids = tok.encode(args.prompt) or [tok.eos_id]
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache,
                   eos_id=tok.eos_id)
    print(args.prompt + tok.decode(out[0]))
    return 0


def _byte_size(text: str) -> int:
    """'5GB', '500MB', '64KB' (powers of 1000, like save_pretrained's max_shard_size) or bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    unit = next((u for u in units if t.endswith(u)), "B")
    try:
        n = float(t[: len(t) - len(unit)] if t.endswith(unit) else t)
    except ValueError:
        n = -1.0
    if not n > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive size such as 5GB, 500MB or 64KB")
    return int(n * units[unit])


RECIPE_USAGE = "[RECIPE.toml] [--section.key value ...]"


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    # Recipe and overrides are split off by `_split_recipe_args` (argparse would mistake
    # `--section.key` for its own options); these entries only document them in --help.
    p.usage = f"%(prog)s {RECIPE_USAGE}"


def _split_recipe_args(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """`train r.toml --a.b 1` -> (['train'], 'r.toml', ['--a.b', '1'])."""
    for prefix in (["train"], ["data", "prepare"]):
        n = len(prefix)
        if argv[:n] == prefix and not any(a in ("-h", "--help") for a in argv[n:]):
            rest = argv[n:]
            recipe = rest[0] if rest and not rest[0].startswith("--") else None
            return prefix, recipe, rest[1:] if recipe is not None else rest
    return argv, None, []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a recipe (torchrun for data parallel)")
    _add_recipe_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="data pipeline")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("prepare", help="build corpus, train tokenizer, pack token shards")
    _add_recipe_args(q)
    q.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("sizes", help="named model sizes with parameter counts and FLOPs")
    p.set_defaults(func=cmd_sizes)

    p = sub.add_parser("bench", help="micro-benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    q = bsub.add_parser("peak", help="measure (and cache) this machine's matmul peak for MFU")
    q.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp16, fp32")
    q.add_argument("--n", type=int, default=2048, help="matrix size")
    q.add_argument("--force", action="store_true", help="re-measure even if cached")
    q.set_defaults(func=cmd_bench_peak)

    p = sub.add_parser("export", help="write a Hugging Face directory from a run or checkpoint")
    p.add_argument("source", help="run dir, checkpoint step dir")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights dtype on disk")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--max-shard-size", type=_byte_size, default=None, metavar="SIZE",
                   help="split the weights into safetensors shards of at most SIZE (e.g. 5GB, 500MB) + an index")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="turn a Hugging Face Llama, Mixtral or Qwen2-MoE directory into an lmforge run")
    p.add_argument("hf_dir")
    p.add_argument("out", help="run directory to create")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("generate", help="generate text from a run, checkpoint or HF directory")
    p.add_argument("source")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LMFORGE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    head, recipe, overrides = _split_recipe_args(argv)
    args = build_parser().parse_args(head)
    args.recipe, args.overrides = recipe, overrides
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _user_errors() as e:
        print(f"lmforge {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


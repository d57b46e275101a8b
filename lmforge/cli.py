"""`lmforge <command>`: each command reads files and writes files, and can be rerun alone.

User-caused errors (config, data, checkpoint, paths, full or read-only disks) print one line and
exit 2; anything else prints one line and exits 1. Tracebacks only with `--debug`. No command
replaces existing data unless told to (`--overwrite`), and none ever writes over what it reads.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from lmforge.cli_bench import add_bench_command
from lmforge.cli_ckpt import add_ckpt_commands
from lmforge.cli_compress import add_compress_command
from lmforge.cli_data import add_data_commands
from lmforge.cli_distill import add_distill_command, check_teacher_path, load_teacher
from lmforge.cli_errors import UserError, check_device, check_text_arg, explain, resolve_device
from lmforge.cli_eval import add_eval_command
from lmforge.cli_exit_gates import add_exit_gates_command
from lmforge.cli_export import add_export_command
from lmforge.cli_plan import add_plan_command
from lmforge.cli_safety import add_generate_safety_args, add_safety_commands, generation_guards
from lmforge.cli_serve import add_serve_command
from lmforge.config import ConfigError, JobConfig, load_job_config, parse_override_args
from lmforge.config.parallel import world_size_from_env
from lmforge.storage.guard import resolved
from lmforge.storage.lock import LOCK_ENV, RunLock
from lmforge.storage.model_dir import model_dir_kind, require_hf_dir
from lmforge.storage.rundir import check_data_dir, check_output_dir, prepare_run_dir
from lmforge.train.start_points import check_init_from_path, check_resume_path


def _load_config(args: argparse.Namespace, world_size: int):
    return load_job_config(args.recipe, parse_override_args(args.overrides), world_size=world_size)


def _job_config(args: argparse.Namespace):
    cfg = _load_config(args, world_size_from_env())
    args.output = cfg.train.output_dir if args.command in ("train", "distill") else cfg.data.dir
    return cfg


def _check_before_torch(cfg: JobConfig) -> None:
    """The device string and the paths a training job starts from (init_from, a resume path, a
    distillation teacher), from marker files alone: one line for a mistake, before torch loads."""
    check_device(cfg.train.device, "--train.device")
    check_init_from_path(cfg.train.init_from, cfg.train.output_dir)
    check_resume_path(cfg.checkpoint.resume)
    check_teacher_path(cfg)


def _pop_flag(overrides: list[str], flag: str) -> bool:
    """Remove every standalone `flag` from the override list; whether there was one."""
    found = flag in overrides
    overrides[:] = [a for a in overrides if a != flag]
    return found


# torchrun options `lmforge train` passes through (value-taking; `--nproc` is --nproc-per-node).
LAUNCHER_OPTIONS = ("--nproc", "--max-restarts", "--nnodes", "--rdzv-endpoint", "--rdzv-id")


def _pop_launcher_args(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """Take the launcher options (`--opt V` or `--opt=V`) out of the override list, checked."""
    rest, found, i = [], {}, 0
    while i < len(overrides):
        arg = overrides[i]
        name = arg.split("=", 1)[0]
        if name in LAUNCHER_OPTIONS:
            value = arg.split("=", 1)[1] if "=" in arg else (overrides[i + 1] if i + 1 < len(overrides) else "")
            found[name] = value
            i += 1 if "=" in arg else 2
            continue
        rest.append(arg)
        i += 1
    for name, what in (("--nproc", "a positive integer (processes on this machine)"),
                       ("--max-restarts", "an integer >= 0 (worker-group restarts after a failure)")):
        v = found.get(name)
        if v is not None and (not re.fullmatch(r"[0-9]+", v) or (name == "--nproc" and int(v) < 1)):
            raise ConfigError(name, v, f"must be {what}", "command line")
    nnodes = found.get("--nnodes")
    if nnodes is not None:
        parts = nnodes.split(":")
        if not (1 <= len(parts) <= 2 and all(re.fullmatch(r"[0-9]+", p) and int(p) >= 1 for p in parts)
                and int(parts[0]) <= int(parts[-1])):
            raise ConfigError("--nnodes", nnodes, "must be N or MIN:MAX with 1 <= MIN <= MAX (torchrun's elastic range)",
                              "command line")
    return found, rest


def torchrun_command(launcher: dict[str, str], recipe: str | None, overrides: list[str]) -> list[str]:
    """The torchrun command line for `lmforge train` with these launcher options. One node and no
    rendezvous endpoint: `--standalone`; otherwise a c10d rendezvous at --rdzv-endpoint, with
    --nnodes MIN:MAX for an elastic job (torchrun admits nodes joining or leaving within the range
    and restarts the workers on membership changes, up to --max-restarts times)."""
    nproc = int(launcher.get("--nproc", "1"))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if "--rdzv-endpoint" in launcher:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launcher['--rdzv-endpoint']}",
                f"--rdzv-id={launcher.get('--rdzv-id', 'lmforge')}", f"--nnodes={launcher.get('--nnodes', '1')}"]
    else:
        if launcher.get("--nnodes", "1") not in ("1", "1:1"):
            raise ConfigError("--nnodes", launcher["--nnodes"], "needs --rdzv-endpoint HOST:PORT (one node can run "
                              "standalone; several need a rendezvous)", "command line")
        cmd.append("--standalone")
    if "--max-restarts" in launcher:
        cmd.append(f"--max-restarts={launcher['--max-restarts']}")
    return [*cmd, "-m", "lmforge", "train", *([recipe] if recipe else []), *overrides]


def _launch_torchrun(launcher: dict[str, str], args: argparse.Namespace, overwrite: bool) -> int:
    """Re-run this command under torchrun (validated first). Restarted workers resume from the
    newest valid checkpoint (Trainer._resume); the shared rendezvous store is disabled, which makes
    torchrun's restarts reliable on CPU/gloo (docs/architecture.md). One node: this launcher takes the run
    directory's lock and applies its rules, and passes the lock on to torchrun; several nodes:
    global rank 0 does (each node has a launcher). No process outlives the launcher (launcher.py)."""
    from lmforge.launcher import run_supervised

    nproc = int(launcher.get("--nproc", "1"))
    min_nodes = int(launcher.get("--nnodes", "1").split(":")[0])
    cfg = _load_config(args, nproc * min_nodes)
    args.output = cfg.train.output_dir
    _check_before_torch(cfg)
    from lmforge.train.preflight import preflight

    preflight(cfg, nproc * min_nodes, local_ranks=nproc)  # device and memory, before torchrun starts
    load_teacher(cfg)  # distill.teacher: loadable and fitting the student, before torchrun starts
    env = {**os.environ}
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if "--rdzv-endpoint" in launcher:
        return run_supervised(torchrun_command(launcher, args.recipe, [*args.overrides, *(
            ["--overwrite"] if overwrite else [])]), env)
    with _run_dir_guard(cfg, overwrite, worker=False) as lock:
        assert lock is not None
        env[LOCK_ENV] = str(resolved(cfg.train.output_dir))
        return run_supervised(torchrun_command(launcher, args.recipe, args.overrides), env,
                              pass_fds=(lock.inheritable_fd(),))


@contextlib.contextmanager
def _run_dir_guard(cfg, overwrite: bool, worker: bool) -> Iterator[RunLock | None]:
    """Hold the run directory's lock for the job's life and apply the run-directory rules
    (lmforge.storage.rundir) once per job: in one process, in the `--nproc` launcher, or in global
    rank 0 of a torchrun job started directly. A worker whose launcher holds the lock does neither."""
    run_dir = Path(cfg.train.output_dir)
    if worker and (os.environ.get(LOCK_ENV) == str(resolved(run_dir)) or int(os.environ.get("RANK", "0")) != 0):
        yield None
        return
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    check_output_dir(run_dir, cfg.checkpoint.folder, overwrite, Path(cfg.data.dir), restarted)
    with RunLock(run_dir) as lock:
        check_data_dir(Path(cfg.data.dir), cfg.data.corpus, overwrite=False)
        note = prepare_run_dir(run_dir, cfg.checkpoint.folder, cfg.checkpoint.resume, overwrite, Path(cfg.data.dir),
                               restarted)
        if note:
            print(note, flush=True)
        yield lock


def cmd_train(args: argparse.Namespace) -> int:
    launcher, args.overrides = _pop_launcher_args(args.overrides)
    overwrite = _pop_flag(args.overrides, "--overwrite")
    worker = "LOCAL_RANK" in os.environ
    if worker:
        from lmforge.launcher import guard_worker

        guard_worker()  # never outlive torchrun
    if not worker and (int(launcher.get("--nproc", "1")) > 1 or set(launcher) - {"--nproc"}):
        return _launch_torchrun(launcher, args, overwrite)
    cfg = _job_config(args)  # validated before any process group starts, and before torch is imported
    _check_before_torch(cfg)
    from lmforge.train.preflight import preflight

    preflight(cfg, world_size_from_env(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    teacher = load_teacher(cfg)  # None unless distill.teacher is set (lmforge distill)
    with _run_dir_guard(cfg, overwrite, worker):
        return _train(cfg, teacher)


def _train(cfg, teacher=None) -> int:
    from lmforge.train.trainer import Trainer

    trainer = Trainer(cfg, teacher=teacher)
    finished = False
    try:
        losses = trainer.fit()
        if trainer.is_main and losses:
            print(f"done: step {trainer.state.step}, logged loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
                  f"outputs in {cfg.train.output_dir}", flush=True)
        finished = True
    finally:
        trainer.close(clean=finished)
    if trainer.info.world_size > 1:
        _exit_worker(0)  # everything is saved
    return 0


def _exit_worker(code: int) -> None:
    """Leave a torchrun worker without running interpreter finalisers: gloo's teardown aborts now
    and then after destroy_process_group on CPU ("terminate called without an active exception",
    signal 6), which would replace the exit code, 0 after a finished run or 2 after a user error."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    overwrite = _pop_flag(args.overrides, "--overwrite")
    cfg = _job_config(args)
    check_data_dir(Path(cfg.data.dir), cfg.data.corpus, overwrite)
    from lmforge.data.pack import prepare_data

    out = prepare_data(cfg.data, cfg.tokenizer, log=print)
    print(f"data ready in {out}")
    return 0


def cmd_sizes(args: argparse.Namespace) -> int:
    from lmforge.models.registry import FAMILIES
    from lmforge.observability.flops import training_flops_per_token

    # `active`: parameters one token uses (MoE: router + top_k + shared experts); = params when dense.
    sizes = {name: (fam, cfg) for fam in FAMILIES.values() for name, cfg in fam.sizes.items()}
    w = max(len(n) for n in sizes)
    print(f"{'size':>{w}} {'params':>17} {'active':>17} {'non-embedding':>17} {'layers':>6} {'dim':>6} "
          f"{'heads':>5} {'kv':>3} {'experts':>9} {'attention':>12} {'train GFLOP/token @2048':>24}")
    for name, (fam, cfg) in sizes.items():
        c = fam.count_params(cfg)
        seq = min(2048, cfg.max_seq_len)
        flops = training_flops_per_token(cfg, seq) / 1e9
        experts = f"{cfg.moe.top_k}/{cfg.moe.n_experts}" if cfg.moe.n_experts else "-"
        attn = ",".join(k if k == "full" else f"{k}{cfg.attention.window}" for k in cfg.attention.layers)
        print(f"{name:>{w}} {c['total']:>17,} {c.get('active', c['total']):>17,} {c['non_embedding']:>17,} "
              f"{cfg.n_layers:>6} {cfg.dim:>6} {cfg.n_heads:>5} {cfg.kv_heads:>3} {experts:>9} {attn:>12} {flops:>24.3f}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    require_hf_dir(args.hf_dir)  # missing, or no Hugging Face directory: answered before torch loads
    from lmforge.interop.hf.importer import import_to_run

    args.output = args.out
    step_dir = import_to_run(Path(args.hf_dir), Path(args.out), overwrite=args.overwrite)
    print(f"imported {args.hf_dir} -> {step_dir}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.serve.generate import GenerationError, context_note, generate, load_for_generation

    check_text_arg(args.prompt, "--prompt")
    args.device = resolve_device(args.device, "--device")
    guards = generation_guards(args)  # watermark key and safety filter, checked before the model loads
    refusal = guards.refusal(args.prompt)  # the prompt gate: a refused prompt never reaches a model
    if refusal is not None:
        print(refusal)
        return 0
    model, cfg, tokenizer_json = load_for_generation(Path(args.source), device=args.device)
    if tokenizer_json is None:
        raise GenerationError(f"{args.source}: no tokenizer.json found with it; generation needs one")
    tok = TextTokenizer.from_file(tokenizer_json)
    ids = tok.encode(args.prompt) or [tok.eos_id]
    note = context_note(args.max_new_tokens, len(ids), cfg.max_seq_len)
    if note:
        print(note, file=sys.stderr)
    processor = guards.processor(tok.vocab_size)
    if args.self_speculative:  # the full model's greedy output, drafted from an early exit
        from lmforge.serve.speculative import SpeculationStats, self_speculative_generate

        if args.temperature != 0 or processor is not None or args.early_exit_threshold is not None:
            raise UserError("--self-speculative is greedy decoding of the full model: use --temperature 0, and no "
                            "--watermark-key-file or --early-exit-threshold with it")
        stats = SpeculationStats()
        row = self_speculative_generate(model, ids, args.max_new_tokens, args.draft_layer, args.draft_tokens,
                                        tok.eos_id, stats)
        print(f"self-speculation: {stats.accepted}/{stats.drafted} drafts accepted in {stats.rounds} rounds",
              file=sys.stderr)
        print(args.prompt + guards.output(tok, row))
        return 0
    policy, depths = None, []
    if args.early_exit_threshold is not None:
        from lmforge.serve.early_exit import ExitPolicy

        gates = None
        if args.early_exit_measure == "learned":
            from lmforge.serve.exit_gate import GATES_FILE, ExitGates

            gates = ExitGates.load(Path(args.exit_gates) if args.exit_gates else Path(args.source) / GATES_FILE)
        policy = ExitPolicy(args.early_exit_threshold, args.early_exit_measure, gates=gates)
    out = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, use_cache=not args.no_cache,
                   eos_id=tok.eos_id, logits_processor=processor, early_exit=policy, exit_depths=depths)
    if depths:
        shares = ", ".join(f"{k}: {depths.count(k)}" for k in sorted(set(depths)))
        print(f"early exit: {len(depths)} decode steps, mean depth {sum(depths) / len(depths):.2f} of {cfg.n_layers} "
              f"blocks (steps per depth: {shares})", file=sys.stderr)
    print(args.prompt + guards.output(tok, out[0]))
    return 0


RECIPE_USAGE = "[RECIPE.toml] [--section.key value ...]"


RECIPE_HELP = """RECIPE.toml: a recipe (recipes/); without one, the defaults. --section.key value: any
config key (lmforge/config/), e.g. --train.steps 100 --optimizer.lr 1e-3.
--overwrite: start over in a run or data directory that holds one (the earlier run is moved aside
to <dir>.old-<time>; data prepare writes into a directory holding other files)."""
LAUNCHER_HELP = """--nproc N: train on N local processes (torchrun under the hood; --nproc 1 is the default).
--max-restarts N: restart the workers after a failure, resuming from the latest checkpoint.
--nnodes N|MIN:MAX --rdzv-endpoint HOST:PORT [--rdzv-id ID]: several nodes (torchrun's rendezvous).
Under plain torchrun (`torchrun ... -m lmforge train RECIPE`) these are torchrun's own."""


def _add_recipe_args(p: argparse.ArgumentParser, launcher: bool = False) -> None:
    # Recipe and overrides are split off by `_split_recipe_args` (argparse would mistake
    # `--section.key` for its own options); the usage and epilog only document them in --help.
    p.usage = f"%(prog)s {RECIPE_USAGE}"
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = RECIPE_HELP + ("\n" + LAUNCHER_HELP if launcher else "")


def _split_recipe_args(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """`train r.toml --a.b 1` -> (['train'], 'r.toml', ['--a.b', '1'])."""
    for prefix in (["train"], ["distill"], ["data", "prepare"]):
        n = len(prefix)
        if argv[:n] == prefix and not any(a in ("-h", "--help") for a in argv[n:]):
            rest = argv[n:]
            recipe = rest[0] if rest and not rest[0].startswith("--") else None
            return prefix, recipe, rest[1:] if recipe is not None else rest
    return argv, None, []


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a wrong argument is one line (exit 2), as every other user error: its usage
    block (up to 30 lines for `serve`) is what --help is for. Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="lmforge", description=__doc__,
                                epilog="--debug (anywhere): show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a recipe (torchrun for data parallel)")
    _add_recipe_args(p, launcher=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="data pipeline")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("prepare", help="build corpus, train tokenizer, pack token shards")
    _add_recipe_args(q)
    q.set_defaults(func=cmd_data_prepare)
    add_data_commands(dsub)
    add_compress_command(sub)

    p = sub.add_parser("sizes", help="named model sizes with parameter counts and FLOPs")
    p.set_defaults(func=cmd_sizes)

    add_bench_command(sub)

    add_export_command(sub)

    p = sub.add_parser("import", help="turn a Hugging Face Llama, Mistral, Qwen2, Mixtral or Qwen2-MoE "
                           "directory into an lmforge run")
    p.add_argument("hf_dir", help="a Hugging Face model directory (config.json + safetensors)")
    p.add_argument("out", help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("generate", help="generate text from a run, checkpoint or HF directory")
    p.add_argument("source", help="run dir (its newest checkpoint), checkpoint step dir, Hugging Face dir or "
                                  "quantized dir")
    p.add_argument("--prompt", default="", help="text to continue (empty: from the end-of-text token)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens at most (default 64); stops at end-of-text")
    p.add_argument("--temperature", type=float, default=0.8, help="default 0.8; 0: greedy (argmax)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set holding this probability")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0): the same seed, the same text")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (cuda when there is one)")
    p.add_argument("--early-exit-threshold", type=float, default=None,
                   help="adaptive depth: a token leaves at the first early exit whose confidence >= this "
                        "(model.early_exit; 0: always the first exit, >= 1: never)")
    p.add_argument("--early-exit-measure", default="max_prob", choices=("max_prob", "margin", "learned"),
                   help="an exit's confidence: top probability, top-1 minus top-2, or its learned gate (--exit-gates)")
    p.add_argument("--exit-gates", default=None, metavar="FILE",
                   help="gates for --early-exit-measure learned (default: SOURCE/exit_gates.safetensors, written by "
                        "lmforge exit-gates fit)")
    p.add_argument("--self-speculative", action="store_true",
                   help="greedy output of the full model, drafted by an early exit and verified in one forward")
    p.add_argument("--draft-layer", type=int, default=None, help="the exit that drafts (default: the first)")
    p.add_argument("--draft-tokens", type=int, default=4, help="draft tokens per verification")
    add_generate_safety_args(p)
    p.set_defaults(func=cmd_generate)

    add_ckpt_commands(sub)
    add_eval_command(sub)
    add_exit_gates_command(sub)
    add_plan_command(sub)
    add_distill_command(sub, cmd_train)
    add_serve_command(sub)
    add_safety_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("LMFORGE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    if not faulthandler.is_enabled():  # a crash in native code (torch, gloo, oneDNN) then names the Python
        faulthandler.enable()  # line each thread was on, where torchrun alone reports "signal SIGSEGV"
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _pop_flag(argv, "--debug") or os.environ.get("LMFORGE_DEBUG", "") not in ("", "0")
    head, recipe, overrides = _split_recipe_args(argv)
    args = build_parser().parse_args(head)
    args.recipe, args.overrides, args.output = recipe, overrides, None
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        if isinstance(getattr(args, "source", None), str):  # every verb that reads a model directory:
            model_dir_kind(args.source)  # a path that is none is answered before torch and the model code load
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 (the one user-error handler; DCP's errors are BaseExceptions)
        code, line = explain(e, args.output)
        if debug:
            traceback.print_exc()
        name = " ".join([args.command, *(v for k, v in vars(args).items() if k.endswith("_command") and v)])
        sys.stderr.write(f"lmforge {name}: {line}\n")  # one write: ranks' lines never interleave
        sys.stderr.flush()
        if "LOCAL_RANK" in os.environ and world_size_from_env() > 1:
            _exit_worker(code)
        return code


if __name__ == "__main__":
    sys.exit(main())


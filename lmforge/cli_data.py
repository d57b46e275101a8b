"""The `lmforge data` verbs that work on files alone (no recipe): run a document pipeline, verify
or repair packed data, trace packed tokens to their sources, write a report, sample passages from a
model for the pipeline's `synthetic` step. `data prepare`, which
reads a recipe, stays in cli.py with the other recipe verbs.

Why a module of its own: cli.py holds the recipe plumbing and the one error handler; each verb
here is a thin call into `lmforge.data`, imported when the verb runs (no heavy imports at start).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_data_commands"]


def cmd_data_run(args: argparse.Namespace) -> int:
    from lmforge.data.pipeline.executor import run_pipeline_file

    run_pipeline_file(args.pipeline, log=print)
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    """Deep check of packed data dirs; --repair rewrites bad erasure pieces; exit 1 if any is invalid.
    A path that does not exist is a wrong argument (exit 2, as `ckpt verify` says), not invalid data."""
    from lmforge.storage.explain import no_such_path

    for d in args.dirs:
        if not Path(d).exists():
            raise no_such_path(d)
    from lmforge.data.verify import verify_command

    return verify_command(args.dirs, repair=args.repair)


def cmd_data_trace(args: argparse.Namespace) -> int:
    from lmforge.data.trace import format_trace, trace_tokens

    for line in format_trace(trace_tokens(args.data_dir, args.offset, args.length, args.split)):
        print(line)
    return 0


def add_data_commands(dsub: argparse._SubParsersAction) -> None:
    """Add the file-only `data` verbs to the `data` verb's subparsers."""
    from lmforge.data.report import add_report_parser
    from lmforge.serve.sample import add_sample_parser

    q = dsub.add_parser("verify", help="full check of packed data: sha256 of every file, token ids, index, erasure "
                        "pieces; exit 1 if invalid")
    q.add_argument("dirs", nargs="+", help="packed data directories (data.dir)")
    q.add_argument("--repair", action="store_true",
                   help="rewrite missing or corrupt erasure pieces from the others, then check again")
    q.set_defaults(func=cmd_data_verify)
    q = dsub.add_parser("run", help="document pipeline (read, normalise, filter, dedup) from PIPELINE.toml, resumable")
    q.add_argument("pipeline", help="pipeline TOML: inputs, output_dir, workers, executor, [[steps]]")
    q.set_defaults(func=cmd_data_run)
    q = dsub.add_parser("trace", help="where packed tokens came from: documents, corpus lines, pipeline sources "
                        "and verdicts")
    q.add_argument("data_dir", help="packed data directory (data.dir)")
    q.add_argument("offset", type=int, help="token offset in the split")
    q.add_argument("--length", type=int, default=1, help="number of tokens from OFFSET (default 1)")
    q.add_argument("--split", choices=("train", "val"), default="train")
    q.set_defaults(func=cmd_data_trace)
    add_report_parser(dsub)
    add_sample_parser(dsub).set_defaults(func=cmd_data_sample)


def cmd_data_sample(args: argparse.Namespace) -> int:
    """`data sample` (lmforge/serve/sample.py), its --device checked first as every verb's is."""
    from lmforge.cli_errors import resolve_device
    from lmforge.serve.sample import cmd_data_sample as sample

    args.device = resolve_device(args.device, "--device")
    return sample(args)

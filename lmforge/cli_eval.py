"""`lmforge eval`: perplexity per domain on held-out data, a cloze task and generation speed of a
run, a checkpoint or a Hugging Face directory (suite "default"), and bias probes (suite "bias").
The work is in lmforge/eval/; this module parses, calls and prints."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_eval_command"]


def cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.cli_errors import check_device
    from lmforge.eval.report import print_results, write_results
    from lmforge.eval.runner import EvalOptions, evaluate, parse_suites
    from lmforge.storage.guard import check_output_file

    check_device(args.device, "--device")
    opts = EvalOptions(data_dir=Path(args.data_dir) if args.data_dir else None, max_batches=args.max_batches,
                       seq_len=args.seq_len, items=args.items, speed=not args.no_speed, device=args.device,
                       suites=parse_suites(args.suite), early_exit=tuple(args.early_exit),
                       early_exit_measure=args.early_exit_measure,
                       exit_gates=Path(args.exit_gates) if args.exit_gates else None)
    opts.check()
    if args.out:
        args.output = args.out
        check_output_file(Path(args.out), args.overwrite, {"source": args.source, "--data-dir": args.data_dir})
    results = evaluate(Path(args.source), opts, say=lambda line: print(line, file=sys.stderr))
    print_results(results)
    if args.out:
        write_results(Path(args.out), results)
        print(f"wrote {args.out}")
    return 0


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers, e.g. 0.8,0.9") from None


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity per domain, a cloze task and generation speed (suite default), "
                                    "bias probes (suite bias) of a run, checkpoint or HF directory")
    p.add_argument("source", help="run dir (newest checkpoint), checkpoint step dir or Hugging Face dir")
    p.add_argument("--suite", default="default",
                   help="default (perplexity, cloze, speed), bias (stereotype-preference rate per dimension: gender, "
                        "race / nationality, religion, age; needs the eval extra), or a comma list: default,bias")
    p.add_argument("--data-dir", default=None, help="packed data dir (default: the run's data.dir)")
    p.add_argument("--max-batches", type=int, default=None,
                   help="global batches of the held-out split to read (default: all of it)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window (default: the run's train.seq_len; HF dir: min(256, max_seq_len))")
    p.add_argument("--items", type=int, default=200, help="cloze items (0: no cloze task)")
    p.add_argument("--no-speed", action="store_true", help="skip the generation speed measurement")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (cuda when there is one)")
    p.add_argument("--early-exit", type=_thresholds, default=(), metavar="T[,T...]",
                   help="also the perplexity under early exit at these thresholds (model.early_exit; >= 1: full depth)")
    p.add_argument("--early-exit-measure", default="max_prob", choices=("max_prob", "margin", "learned"),
                   help="an exit's confidence: top probability, top-1 minus top-2, or its learned gate (--exit-gates)")
    p.add_argument("--exit-gates", default=None, metavar="FILE",
                   help="gates for --early-exit-measure learned (default: SOURCE/exit_gates.safetensors, written by "
                        "lmforge exit-gates fit)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_eval)

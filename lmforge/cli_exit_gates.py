"""`lmforge exit-gates fit SOURCE [--out FILE]`: fit the learned early-exit confidence (one linear
gate per exit, lmforge/serve/exit_gate.py) on the model's own train windows and write it beside the
model, where `generate --early-exit-measure learned` and `eval --early-exit-measure learned` look.
This module checks the arguments and the destination before the model loads, calls and prints."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_exit_gates_command"]


def cmd_fit(args: argparse.Namespace) -> int:
    import numpy as np

    from lmforge.cli_errors import UserError
    from lmforge.data.loader import TokenDataset
    from lmforge.eval.heldout import check_tokenizer
    from lmforge.serve.exit_gate import GATES_FILE, fit_exit_gates
    from lmforge.serve.generate import load_source, resolve_source
    from lmforge.storage.guard import check_destination

    source = Path(args.source)
    if not source.exists():
        raise UserError(f"{args.source}: no such directory (give a run dir, a checkpoint step dir or a Hugging Face dir)")
    if args.windows < 1 or args.seq_len < 1:
        raise UserError(f"--windows {args.windows}, --seq-len {args.seq_len}: both must be >= 1")
    out = Path(args.out) if args.out else source / GATES_FILE
    args.output = out
    check_destination(out, args.overwrite, kind="file", flag="--out")
    src = resolve_source(source)
    data = src.run_config.get("data") if isinstance(src.run_config.get("data"), dict) else {}
    data_dir = Path(args.data_dir) if args.data_dir else Path(data["dir"]) if data.get("dir") else None
    if data_dir is None:
        raise UserError(f"{args.source}: names no data dir; pass --data-dir DIR (a packed data dir with the model's "
                        "tokenizer)")
    model, cfg, tokenizer_json = load_source(src)
    check_tokenizer(data_dir, cfg, tokenizer_json)
    train = TokenDataset(data_dir, "train")
    seq = min(args.seq_len, cfg.max_seq_len)
    n = train.n_windows(seq)
    if n < 1:
        raise UserError(f"data dir {data_dir}: the train split has {train.n_tokens} tokens, too few for a window of "
                        f"{seq + 1}")
    picked = np.sort(np.random.default_rng(args.seed).choice(n, size=min(args.windows, n), replace=False))
    gates = fit_exit_gates(model, [train.window(int(i), seq) for i in picked], alpha=args.alpha)
    gates.save(out)
    print(f"fitted gates for exits {list(gates.layers)} on {gates.windows} train windows of {seq} tokens "
          f"({data_dir}); wrote {out}")
    return 0


def add_exit_gates_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exit-gates", help="the learned early-exit confidence (one linear gate per exit)")
    gsub = p.add_subparsers(dest="exit_gates_command", required=True)
    q = gsub.add_parser("fit", help="fit the gates on the model's train windows and write them beside the model")
    q.add_argument("source", help="run dir (newest checkpoint), checkpoint step dir or Hugging Face dir, with exits")
    q.add_argument("--out", default=None, help="the gates file (default: SOURCE/exit_gates.safetensors)")
    q.add_argument("--data-dir", default=None, help="packed data dir (default: the run's data.dir)")
    q.add_argument("--windows", type=int, default=200, help="train windows to fit on (drawn at random)")
    q.add_argument("--seq-len", type=int, default=255, help="tokens per window (at most the model's max_seq_len)")
    q.add_argument("--alpha", type=float, default=1.0, help="ridge penalty")
    q.add_argument("--seed", type=int, default=0, help="which windows are drawn")
    q.add_argument("--overwrite", action="store_true", help="replace an existing gates file")
    q.set_defaults(func=cmd_fit)

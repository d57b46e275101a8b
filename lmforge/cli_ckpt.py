"""`lmforge ckpt ls|verify|inspect|convert`: list, verify, inspect and convert checkpoints (the work
is in lmforge/checkpoint/tools.py; `convert --to hf` is `lmforge export`). A path that is missing is
answered before torch loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.cli_errors import UserError
from lmforge.cli_export import cmd_export
from lmforge.storage.explain import no_such_path
from lmforge.storage.guard import check_destination

__all__ = ["add_ckpt_commands"]


def _existing(path: str) -> Path:
    """`path` when it exists; else the one-line "PATH: no such file or directory", before torch loads."""
    if not Path(path).exists():
        raise no_such_path(path)
    return Path(path)


def _latest_checkpoint(target: str) -> Path:
    """The checkpoint `target` names: itself when it is one, else the latest valid one of a run
    (either tier) or a checkpoint folder, said on stdout, as `generate` and `export` pick one."""
    from lmforge.checkpoint.tools import describe, find_checkpoints

    found = [describe(path, tier) for tier, path in find_checkpoints(Path(target))]
    if len(found) == 1 and found[0].path == Path(target):
        return Path(target)
    valid = [c for c in found if c.valid]
    if not found:
        raise UserError(f"{target}: no checkpoints in it; pass a run directory, a checkpoint folder or a step-N "
                        "directory")
    if not valid:
        raise UserError(f"{target}: none of its {len(found)} checkpoints is valid (`lmforge ckpt ls {target}` says why)")
    latest = max(valid, key=lambda c: (c.step, c.tier == "disk"))
    print(f"{target}: step {latest.step}, {latest.path} (the latest valid of {len(found)} checkpoints)")
    return latest.path


def cmd_ckpt_ls(args: argparse.Namespace) -> int:
    _existing(args.target)
    from lmforge.checkpoint.tools import describe, find_checkpoints

    rows = [describe(path, tier) for tier, path in find_checkpoints(Path(args.target))]
    print(f"{'step':>9} {'tier':<6} {'kind':<11} {'compress':<8} {'moments':<7} {'MiB':>9}  valid  path")
    for r in rows:
        print(f"{r.step:>9} {r.tier:<6} {r.kind:<11} {r.compression:<8} {r.optimizer_states:<7} "
              f"{r.bytes / 2**20:>9.2f}  {'yes' if r.valid else 'NO':<5}  {r.path}"
              f"{f' (base {r.base})' if r.base else ''}{'' if r.valid else f' -- {r.reason}'}")
    if not rows:
        print(f"no checkpoints under {args.target}")
    return 0


def cmd_ckpt_verify(args: argparse.Namespace) -> int:
    """Deep check (every file's sha256, an incremental one's base too) of each checkpoint a path
    names, as `ckpt ls` finds them: a run (both tiers), a checkpoint folder or one step-N directory.
    Every path is resolved before any check; exit 1 if any checkpoint is invalid."""
    for target in args.paths:
        _existing(target)
    from lmforge.checkpoint.tools import describe, find_checkpoints

    found = {target: list(find_checkpoints(Path(target))) for target in args.paths}
    for target, checkpoints in found.items():
        if not checkpoints:
            raise UserError(f"{target}: no checkpoints in it; pass a run directory, a checkpoint folder or a "
                            "step-N directory")
    bad = 0
    for tier, path in (c for checkpoints in found.values() for c in checkpoints):
        r = describe(path, tier, deep=True)
        where = f"{path}{' (memory tier)' if tier != 'disk' else ''}"
        if r.valid:
            print(f"{where}: ok (step {r.step}, {r.kind}, {r.bytes / 2**20:.2f} MiB)")
        else:
            bad += 1
            print(f"{where}: INVALID: {r.reason}", file=sys.stderr)
    return 1 if bad else 0


def cmd_ckpt_inspect(args: argparse.Namespace) -> int:
    _existing(args.path)
    from lmforge.checkpoint.tools import inspect_rows

    rows = inspect_rows(_latest_checkpoint(args.path))
    width = max((len(r[0]) for r in rows), default=10)
    for key, shape, dtype, nbytes, where in rows:
        print(f"{key:<{width}}  {shape:>14}  {dtype:<9} {nbytes:>12,}  {where}".rstrip())
    print(f"{len(rows)} entries, {sum(r[3] for r in rows) / 2**20:.2f} MiB of tensors")
    return 0


def cmd_ckpt_convert(args: argparse.Namespace) -> int:
    _existing(args.path)
    out = args.output = Path(args.out)
    if args.to == "torch":
        if args.dtype is not None:
            raise UserError(f"--dtype {args.dtype}: applies to --to hf only (--to torch keeps the stored dtypes)")
        from lmforge.checkpoint.tools import convert_to_torch

        check_destination(out, args.overwrite, kind="file", sources={"checkpoint": Path(args.path)})
        nested = convert_to_torch(_latest_checkpoint(args.path), out)
        print(f"wrote {out} ({', '.join(f'{k}: {len(v)}' for k, v in nested.items())} entries)")
        return 0
    args.source, args.dtype = args.path, args.dtype or "fp32"
    args.max_shard_size = None  # one safetensors file
    return cmd_export(args)


def add_ckpt_commands(sub: argparse._SubParsersAction) -> None:
    """Add the `ckpt` verb and its subcommands to the top-level subparsers."""
    p = sub.add_parser("ckpt", help="list, verify, inspect and convert checkpoints")
    csub = p.add_subparsers(dest="ckpt_command", required=True)
    q = csub.add_parser("ls", help="checkpoints of a run (both tiers) or a folder: step, tier, kind, size, valid")
    q.add_argument("target", help="run dir, checkpoint folder or one checkpoint")
    q.set_defaults(func=cmd_ckpt_ls)
    q = csub.add_parser("verify", help="deep checksum check of every checkpoint named; exit 1 if any is invalid")
    q.add_argument("paths", nargs="+", help="run dirs (both tiers), checkpoint folders or checkpoints (step-N)")
    q.set_defaults(func=cmd_ckpt_verify)
    q = csub.add_parser("inspect", help="tensor names, shapes, dtypes and sizes")
    q.add_argument("path", help="checkpoint directory (step-N), or a run or checkpoint folder: its latest valid one")
    q.set_defaults(func=cmd_ckpt_inspect)
    q = csub.add_parser("convert", help="to one torch.save file, or to a Hugging Face directory")
    q.add_argument("path", help="checkpoint directory (step-N), or a run or checkpoint folder: its latest valid one")
    q.add_argument("out", help="output file (torch) or directory (hf)")
    q.add_argument("--to", choices=["torch", "hf"], default="torch")
    q.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="hf: weights dtype on disk")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output file (torch) or "
                   "non-empty directory (hf)")
    q.set_defaults(func=cmd_ckpt_convert)

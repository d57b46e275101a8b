"""`lmforge compress prune SOURCE --method {magnitude,wanda} (--sparsity F | --pattern N:M) --out DIR`:
loads the source (a run, a checkpoint step dir or an HF dir, through lmforge.serve), checks every
option and the destination before any work, and hands the model to lmforge/compress/prune.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_prune_parser"]


def cmd_prune(args: argparse.Namespace) -> int:
    from lmforge.cli_errors import check_device
    from lmforge.compress.prune import PruneSource, check_data_named, prune_source
    from lmforge.compress.prune_options import PruneOptions, parse_pattern, parse_targets
    from lmforge.compress.prune_report import print_sparsity
    from lmforge.serve.generate import load_source, resolve_source
    from lmforge.storage.guard import check_destination, check_no_overlap
    from lmforge.storage.layout import step_of

    check_device(args.device, "--device")
    opts = PruneOptions(method=args.method, sparsity=args.sparsity,
                        pattern=parse_pattern(args.pattern) if args.pattern is not None else None,
                        targets=parse_targets(args.targets), calib_samples=args.calib_samples,
                        calib_seq_len=args.calib_seq_len, calib_seed=args.calib_seed,
                        recover_steps=args.recover_steps, recover_lr=args.recover_lr)
    opts.check()
    out = Path(args.out)
    args.output = out
    calib = Path(args.calib_data) if args.calib_data else None
    check_destination(out, args.overwrite, sources={"source": Path(args.source), "calibration data": calib},
                      flag="--out")
    ms = resolve_source(Path(args.source))
    if ms.run_dir is not None:
        check_no_overlap(out, {"source run": ms.run_dir}, flag="--out")
    data = ms.run_config.get("data") if isinstance(ms.run_config.get("data"), dict) else {}
    check_data_named(ms.kind, calib is not None or bool(data.get("dir")), opts)
    device = ("cuda" if _cuda() else "cpu") if args.device == "auto" else args.device
    model, cfg, tokenizer = load_source(ms, device)
    src = PruneSource(model=model, cfg=cfg, path=Path(args.source), kind=ms.kind, tokenizer=tokenizer,
                      step_dir=ms.step_dir, step=step_of(ms.step_dir) if ms.step_dir is not None else None,
                      run_config=ms.run_config if ms.kind != "hf" else None)
    report = prune_source(src, opts, out, calib_data=calib, overwrite=args.overwrite,
                          say=lambda line: print(line, file=sys.stderr))
    print_sparsity(report)
    print(f"wrote {out} (pruning.json: the table above, calibration and recovery; `lmforge eval {out}` "
          "measures it)")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def add_prune_parser(csub: argparse._SubParsersAction) -> None:
    """Register `compress prune` on the `compress` subparsers."""
    from lmforge.compress.prune_options import DEFAULT_CALIB_SAMPLES, DEFAULT_RECOVER_LR, METHODS, TARGETS

    p = csub.add_parser("prune", help="magnitude or Wanda pruning, unstructured or N:M, with an optional "
                                      "recovery fine-tune; writes a run dir that eval and generate load")
    p.add_argument("source", help="run dir (newest checkpoint), checkpoint step dir or Hugging Face dir")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="magnitude: |W| compared over each layer; wanda: |W| x input-feature norm over calibration "
                        "tokens, compared per output row, pruned block by block (sequential)")
    scheme = p.add_mutually_exclusive_group(required=True)
    scheme.add_argument("--sparsity", type=float, default=None,
                        help="unstructured: the fraction of each pruned layer's weights set to zero, in (0, 1)")
    scheme.add_argument("--pattern", default=None,
                        help="semi-structured N:M, e.g. 2:4: keep N of every M consecutive input weights of a row")
    p.add_argument("--out", required=True, help="the new model directory (an lmforge run dir + pruning.json)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="block linears to prune (default all): wq,wk,wv,wo (attention) and w1,w3,w2 (MLP gate, up, "
                        "down); embeddings and the output head are never pruned")
    p.add_argument("--calib-data", default=None,
                   help="packed data dir to calibrate (wanda) and fine-tune on (default: the run's data.dir; "
                        "required for an HF source)")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES,
                   help=f"calibration windows from the train split (default {DEFAULT_CALIB_SAMPLES})")
    p.add_argument("--calib-seq-len", type=int, default=None,
                   help="tokens per calibration window (default: the run's train.seq_len)")
    p.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration and recovery sampling")
    p.add_argument("--recover-steps", type=int, default=0,
                   help="AdamW steps of recovery fine-tuning with the masks held (default 0: none)")
    p.add_argument("--recover-lr", type=float, default=DEFAULT_RECOVER_LR,
                   help=f"recovery learning rate, constant (default {DEFAULT_RECOVER_LR:g})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (cuda when there is one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=cmd_prune)

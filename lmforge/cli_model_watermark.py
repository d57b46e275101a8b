"""`lmforge watermark embed-model SRC --key-file K --out DIR` and `lmforge watermark verify-model SRC
--key-file K`: the weight-space watermark (lmforge/safety/model_watermark.py). This module checks the
arguments, the key file and the destination before any model is loaded, loads models through
lmforge.serve (safety never imports serve), calls and prints. The key is never printed.

embed-model writes a new run directory (checkpoint/weights_run.py: the source run's config, its
tokenizer, the marked weights as a weights-only checkpoint) and never touches SRC. Nothing in it says
it is marked (no report file): a mark announced is a mark invited to be attacked; the embed report
is printed instead.
verify-model reads a run, a checkpoint step dir, a Hugging Face dir or a quantized dir (`lmforge
compress quantize`: its stored entries read as the fp32 numbers they stand for, q x scale, whatever
scheme and runtime it records).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_model_watermark_parsers"]


def _config(args: argparse.Namespace) -> Any:
    from lmforge.safety.model_watermark_config import ModelWatermarkConfig

    cfg = ModelWatermarkConfig(bits=args.bits, margin=getattr(args, "margin", ModelWatermarkConfig.margin),
                               dead_zone=getattr(args, "dead_zone", ModelWatermarkConfig.dead_zone),
                               alpha=getattr(args, "alpha", ModelWatermarkConfig.alpha))
    cfg.validate()
    return cfg


def _verdict(r: Any) -> str:
    flips = f"{r.errors}/{r.bits} bits wrong ({r.flipped} flipped, {r.erased} erased)"
    word = "DETECTED" if r.detected else "not detected"
    sign = "<" if r.detected else ">="
    return (f"bit error rate {r.bit_error_rate:.4f}: {flips}; p = {r.p_value:.3g}; watermark {word} "
            f"(p {sign} {r.alpha:g}); weakest bit z = {r.z_min:.2f}, median {r.z_median:.2f}")


def _existing(path_arg: str, what: str) -> Path:
    from lmforge.cli_errors import UserError

    path = Path(path_arg)
    if not path.exists():
        raise UserError(f"{path_arg}: no such directory (give {what})")
    return path


def cmd_embed_model(args: argparse.Namespace) -> int:
    from lmforge.checkpoint.weights_run import derived_run_config, write_weights_run
    from lmforge.cli_errors import UserError
    from lmforge.safety.model_watermark import embed_watermark, read_watermark
    from lmforge.safety.secret_key import read_key_file
    from lmforge.serve.generate import load_source, resolve_source
    from lmforge.storage.guard import check_destination, check_no_overlap

    cfg = _config(args)
    key = read_key_file(args.key_file)
    out, src_path = Path(args.out), _existing(args.source, "a run directory or a checkpoint step directory")
    args.output = out
    check_destination(out, args.overwrite, sources={"source": src_path, "key file": Path(args.key_file)}, flag="--out")
    src = resolve_source(src_path)
    if src.kind == "hf":
        raise UserError(f"{src_path}: a Hugging Face directory; import it first (lmforge import {src_path} RUN_DIR) "
                        "and mark the run")
    if src.kind == "quantized":
        raise UserError(f"{src_path}: a quantized directory; mark the full-precision run, then quantize the marked "
                        "run (the mark survives int8)")
    assert src.run_dir is not None
    check_no_overlap(out, {"source run": src.run_dir}, flag="--out")
    model, _, tokenizer = load_source(src)
    report = embed_watermark(model, key, cfg)
    step_dir = write_weights_run(out, model, derived_run_config(src.run_config, out), tokenizer, args.overwrite)
    reading = read_watermark(model.named_parameters(), key, cfg)
    if args.json:
        print(json.dumps({"embed": report.as_json(), "verify": reading.as_json(), "out": str(out)}, indent=1))
        return 0
    print(f"embedded {report.bits} bits in {report.weights} weights of {report.tensors} block matrices "
          f"(from {src.step_dir}): margin z >= {report.margin:g} (weakest bit before: {report.z_min_before:.2f}, "
          f"after: {report.z_min_after:.2f}; {report.bits_moved} bits moved)")
    print(f"change: ||delta|| / ||W|| = {report.relative_change:.4f} over those weights, largest |delta| "
          f"{report.max_abs_change:.3g}")
    print(_verdict(reading))
    print(f"wrote {out} ({step_dir.relative_to(out)}; `lmforge watermark verify-model {out} --key-file "
          f"{args.key_file}` reads it)")
    return 0


def _float_weights(path: Path) -> list[tuple[str, Any]]:
    """(name, fp32 weight) of the model at `path`; a quantized directory's stored entries read as the
    fp32 numbers they stand for (q x scale, int4 codes x scale), whatever scheme and runtime it has."""
    from lmforge.serve.generate import load_source, resolve_source

    src = resolve_source(path)
    if src.kind != "quantized":
        return [(n, t.detach()) for n, t in load_source(src)[0].named_parameters()]
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lmforge.cli_errors import UserError
    from lmforge.compress.artifact import TENSORS, read_quantized
    from lmforge.compress.runtime import dequantized

    q = read_quantized(src.path)
    try:
        tensors = load_file(str(q.path / TENSORS))
        return [(name, dequantized(name, fmt, tensors)) for name, fmt in q.meta["weights"].items()]
    except (SafetensorError, OSError, KeyError) as e:
        raise UserError(f"{q.path / TENSORS}: cannot read its weights ({e.__class__.__name__}: {e})") from None


def cmd_verify_model(args: argparse.Namespace) -> int:
    from lmforge.safety.model_watermark import read_watermark
    from lmforge.safety.secret_key import read_key_file

    cfg = _config(args)
    key = read_key_file(args.key_file)
    weights = _float_weights(_existing(args.source, "a run, checkpoint step, Hugging Face or quantized directory"))
    reading = read_watermark(weights, key, cfg)
    if args.json:
        print(json.dumps({"source": args.source, **reading.as_json()}, indent=1))
        return 0
    print(f"bits read ({reading.bits}, '?' = erased, |z| < {reading.dead_zone:g}):")
    for i in range(0, reading.bits, 64):
        print(f"  {reading.read[i:i + 64]}")
    print(_verdict(reading))
    return 0


def add_model_watermark_parsers(wsub: argparse._SubParsersAction) -> None:
    """Register `embed-model` and `verify-model` on the `watermark` subparsers (cli_safety.py)."""
    from lmforge.safety.model_watermark_config import ModelWatermarkConfig as C

    q = wsub.add_parser("embed-model", help="mark a model's weights with a key (spread-spectrum bits); writes a "
                                            "new run dir that eval, generate and train.init_from load")
    q.add_argument("source", help="run dir (newest checkpoint) or checkpoint step dir; only read")
    q.add_argument("--key-file", required=True, help="the secret key file (lmforge watermark keygen FILE)")
    q.add_argument("--out", required=True, help="the new run directory")
    q.add_argument("--bits", type=int, default=C.bits, help=f"message bits (default {C.bits}; the same to verify)")
    q.add_argument("--margin", type=float, default=C.margin,
                   help=f"each bit's projection z after embedding, in null standard deviations (default {C.margin:g}): "
                        "higher survives more fine-tuning and costs more perplexity")
    q.add_argument("--json", action="store_true", help="print the embed report and the check as JSON")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    q.set_defaults(func=cmd_embed_model)
    q = wsub.add_parser("verify-model", help="read a key's mark from a model's weights: bits, bit error rate, "
                                             "p-value, verdict")
    q.add_argument("source", help="run dir, checkpoint step dir, Hugging Face dir or quantized dir")
    q.add_argument("--key-file", required=True, help="the key file used to embed")
    q.add_argument("--bits", type=int, default=C.bits, help=f"message bits it was embedded with (default {C.bits})")
    q.add_argument("--dead-zone", type=float, default=C.dead_zone,
                   help=f"a bit with |z| below this reads as erased (an error; default {C.dead_zone:g})")
    q.add_argument("--alpha", type=float, default=C.alpha, help=f"detected when p < alpha (default {C.alpha:g})")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=cmd_verify_model)

"""`lmforge export`: a run, checkpoint (or, for ONNX, Hugging Face directory) written as a Hugging Face
directory (`--format hf`, interop/hf/exporter.py) or an ONNX decoder with its KV cache (`--format onnx`,
interop/onnx/export.py). Options are checked, then the destination, then the model kind, before any
work; `lmforge ckpt convert --to hf` runs `cmd_export` too."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.config import ConfigError
from lmforge.storage.guard import check_destination


def _dequantized_note(src, hint: str) -> str:
    """What an export of a quantized directory holds: its stored numbers as fp32 weights."""
    if src.kind != "quantized":
        return ""
    from lmforge.compress.artifact import read_quantized

    return f"; weights: the {read_quantized(src.path).scheme} model's stored numbers as fp32, {hint}"


def cmd_export(args: argparse.Namespace) -> int:
    from lmforge.serve.generate import load_source, resolve_source

    args.output = args.out
    fmt = getattr(args, "format", "hf")
    if fmt == "onnx":
        return _export_onnx(args)
    for flag, value in (("--int8", getattr(args, "int8", False) or None), ("--opset", getattr(args, "opset", None))):
        if value is not None:
            raise ConfigError(flag, value, "applies to --format onnx only", "command line")
    from lmforge.interop.hf.exporter import export_hf
    from lmforge.tensors.dtypes import DTYPES

    check_destination(Path(args.out), args.overwrite, sources={"source": Path(args.source)})
    src = resolve_source(Path(args.source))
    model, cfg, tokenizer_json = load_source(src, dequantize=True)
    export_hf(model, cfg, Path(args.out), tokenizer_json=tokenizer_json, dtype=DTYPES[args.dtype or "fp32"],
              overwrite=args.overwrite, max_shard_bytes=args.max_shard_size)
    shards = sorted(Path(args.out).glob("model*.safetensors"))
    weights = shards[0].name if len(shards) == 1 else f"{len(shards)} weight shards + model.safetensors.index.json"
    print(f"exported {args.source} -> {args.out} (config.json, {weights}"
          f"{', tokenizer' if tokenizer_json else ''}"
          f"{_dequantized_note(src, 'int8 Hugging Face weights: lmforge compress quantize --hf')})")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    """`export --format onnx`: every check (options, destination, model kind) before the export."""
    from lmforge.interop.onnx.errors import OnnxError
    from lmforge.interop.onnx.export import (
        DEFAULT_OPSET,
        check_opset,
        export_onnx,
        export_refusal,
        require_export_deps,
    )
    from lmforge.serve.generate import load_source, resolve_source

    if args.dtype not in (None, "fp32"):
        raise ConfigError("--dtype", args.dtype, "must be fp32 with --format onnx (use --int8 for int8 weights)",
                          "command line")
    if args.max_shard_size is not None:
        raise ConfigError("--max-shard-size", args.max_shard_size, "applies to --format hf only", "command line")
    opset = args.opset if args.opset is not None else DEFAULT_OPSET
    check_opset(opset)
    require_export_deps()
    check_destination(Path(args.out), args.overwrite, sources={"source": Path(args.source)})
    src = resolve_source(Path(args.source))
    model, cfg, tokenizer_json = load_source(src, dequantize=True)
    if (why := export_refusal(cfg)) is not None:
        raise OnnxError(why)
    source = {"path": str(Path(args.source).resolve()), "kind": src.kind,
              "checkpoint": str(src.step_dir.resolve()) if src.step_dir is not None else None}
    meta = export_onnx(model, cfg, Path(args.out), source=source, tokenizer_json=tokenizer_json, int8=args.int8,
                       opset=opset, overwrite=args.overwrite)
    print(f"exported {args.source} -> {args.out} ({meta['model_file']}: {meta['weights']} weights, "
          f"{meta['model_bytes'] / 2**20:.1f} MiB, opset {opset}, KV cache of {cfg.n_layers} layers; "
          f"onnx_export.json{', tokenizer' if tokenizer_json else ''}"
          f"{_dequantized_note(src, 'int8 for onnxruntime: --int8')})")
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
    if not 0 < n < float("inf"):  # NaN and inf too
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive size such as 5GB, 500MB or 64KB")
    return int(n * units[unit])


def add_export_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a Hugging Face directory (or an ONNX decoder) from a run or checkpoint")
    p.add_argument("source", help="run dir, checkpoint step dir, quantized dir (dequantized) or Hugging Face dir")
    p.add_argument("out", help="output directory")
    p.add_argument("--format", choices=["hf", "onnx"], default="hf",
                   help="hf: config.json + safetensors; onnx: model.onnx with KV-cache inputs/outputs")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="weights dtype on disk (hf; default fp32)")
    p.add_argument("--int8", action="store_true", help="onnx: int8 weights (onnxruntime dynamic quantization)")
    p.add_argument("--opset", type=int, default=None, help="onnx: the ONNX opset (18-21, default 18)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--max-shard-size", type=_byte_size, default=None, metavar="SIZE",
                   help="split the weights into safetensors shards of at most SIZE (e.g. 5GB, 500MB) + an index")
    p.set_defaults(func=cmd_export)

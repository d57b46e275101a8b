"""`lmforge compress quantize SOURCE --scheme ... --out DIR`: a run, checkpoint or HF directory in,
a quantized model directory out (lmforge/compress/artifact.py) that `lmforge eval` and `lmforge
generate` load as they are. The CLI loads the source (serve) and hands the model to compress."""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

__all__ = ["add_quantize_parser"]


def _run_config(src, cfg, data_dir: Path | None, calib_seq_len: int | None) -> dict:
    """The source run's config for eval (data.dir absolute); an HF source gets a minimal one."""
    rc = copy.deepcopy(src.run_config) if src.run_config else {"model": dataclasses.asdict(cfg)}
    if data_dir is not None:
        rc["data"] = {**(rc.get("data") if isinstance(rc.get("data"), dict) else {}), "dir": str(data_dir.resolve())}
    if "train" not in rc and calib_seq_len:
        rc["train"] = {"seq_len": calib_seq_len}
    return rc


def _data_dir(args: argparse.Namespace, src) -> Path | None:
    """--calib-data, else the run's data.dir: as given when it exists from here, else relative to the
    directory the run was started in (the run dir minus its relative train.output_dir)."""
    if args.calib_data:
        return Path(args.calib_data)
    data = src.run_config.get("data") if isinstance(src.run_config.get("data"), dict) else {}
    if not data.get("dir"):
        return None
    d = Path(data["dir"])
    train = src.run_config.get("train") if isinstance(src.run_config.get("train"), dict) else {}
    out = Path(str(train.get("output_dir", "")))
    if d.is_absolute() or d.is_dir() or out.is_absolute() or not out.parts or src.run_dir is None:
        return d
    run = src.run_dir.resolve()
    if run.parts[-len(out.parts):] == out.parts:
        started_in = Path(*run.parts[:-len(out.parts)])
        if (started_in / d).is_dir():
            return started_in / d
    return d


def cmd_quantize(args: argparse.Namespace) -> int:
    from lmforge.compress.artifact import write_quantized
    from lmforge.compress.errors import CompressError
    from lmforge.compress.hf_export import HF_SCHEMES, HF_UNSUPPORTED, export_hf_quantized
    from lmforge.compress.quantize import QuantizeOptions, check_quantizable, quantize_model
    from lmforge.compress.runtime import int8_runtime_problem
    from lmforge.compress.schemes import check_scheme, resolve_runtime
    from lmforge.compress.torchao_import import torchao_quantization
    from lmforge.compress.train_data import calibration_windows, open_train_data
    from lmforge.serve.generate import load_source, resolve_source
    from lmforge.storage.guard import check_destination
    from lmforge.storage.layout import step_of

    out, source = Path(args.out), Path(args.source)
    args.output = args.out
    check_scheme(args.scheme)
    torchao_quantization()  # a missing extra is said now, not after the model loads and GPTQ runs (~10 s)
    runtime = resolve_runtime(args.scheme, args.runtime)
    problem = int8_runtime_problem(args.scheme, runtime)
    if problem is not None:  # the directory may be run on another machine, so this one only says it
        print(f"note: {problem}; eval, generate and serve refuse this runtime on a CPU like this one")
    if args.hf and args.scheme not in HF_SCHEMES:
        raise CompressError(HF_UNSUPPORTED)
    int4 = args.scheme == "int4-weight"
    int4_only = [flag for flag, value in (("--group-size", args.group_size), ("--calibration", args.calibration),
                                          ("--calib-data", args.calib_data), ("--calib-samples", args.calib_samples),
                                          ("--calib-seq-len", args.calib_seq_len)) if value is not None]
    if not int4 and int4_only:
        raise CompressError(f"{' / '.join(int4_only)}: int4-weight only; {args.scheme} quantizes per row "
                            "without calibration")
    if args.calib_samples is not None and args.calib_samples < 1:
        raise CompressError(f"--calib-samples {args.calib_samples}: must be >= 1")
    opts = QuantizeOptions(args.scheme, 64 if args.group_size is None else args.group_size,
                           args.calibration or "gptq", 128 if args.calib_samples is None else args.calib_samples,
                           args.calib_seq_len)
    check_destination(out, args.overwrite, sources={"source": source})
    src = resolve_source(source)
    if src.kind == "quantized":
        from lmforge.compress.artifact import read_quantized

        raise CompressError(f"{source}: already quantized ({read_quantized(source).scheme}); quantize the fp32 run, "
                            "checkpoint or HF directory it came from")
    model, cfg, tokenizer_json = load_source(src)
    check_quantizable(model, cfg, opts, str(source))
    data_dir = _data_dir(args, src)
    calib = None
    if int4 and opts.calibration == "gptq":
        if data_dir is None:
            raise CompressError(f"{source}: names no data to calibrate on (a Hugging Face directory); pass --calib-data "
                                "DIR (a packed data dir with the model's tokenizer) or --calibration rtn")
        train = src.run_config.get("train") if isinstance(src.run_config.get("train"), dict) else {}
        seq_len = opts.calib_seq_len or min(int(train.get("seq_len", cfg.max_seq_len)), cfg.max_seq_len)
        if not 2 <= seq_len <= cfg.max_seq_len:
            raise CompressError(f"--calib-seq-len {seq_len}: must be in [2, {cfg.max_seq_len}] (the model's max_seq_len)")
        origin = "--calib-data" if args.calib_data else f"data.dir of {source}"
        data = open_train_data(data_dir, origin, cfg, tokenizer_json, src.run_config.get("data"))
        calib = calibration_windows(data, opts.calib_samples, seq_len, opts.seed)
        print(f"calibration: {opts.calib_samples} windows of {seq_len} tokens from {data_dir} "
              f"(train split, {calib.provenance['sampling']})")
    weights = quantize_model(model, cfg, opts, calib, say=print)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    q_bytes = sum(t.numel() * t.element_size() for t in weights.tensors.values())
    meta = {
        "scheme": args.scheme, "runtime": runtime,
        "group_size": opts.group_size if int4 else None,
        "calibration": ({"method": opts.calibration, **(calib.provenance if calib else {})} if int4 else None),
        "embedding": "int8_row",
        "source": {"path": str(source.resolve()), "kind": src.kind,
                   "checkpoint": str(src.step_dir.resolve()) if src.step_dir else None,
                   "step": step_of(src.step_dir) if src.step_dir else None},
        "sizes": {"fp32_parameter_bytes": fp32_bytes, "quantized_tensor_bytes": q_bytes,
                  "ratio": q_bytes / fp32_bytes},
    }
    run_config = _run_config(src, cfg, data_dir, opts.calib_seq_len)
    extra = None
    if args.hf:
        def extra(d: Path) -> None:
            export_hf_quantized(model, cfg, args.scheme, d / "hf", tokenizer_json)
    write_quantized(out, weights, meta, run_config, tokenizer_json, replace=args.overwrite, extra=extra)
    errs = [r["rel_error"] for r in weights.report]
    print(f"quantized {source} -> {out}: {args.scheme} (runtime {runtime}), {len(weights.report)} weights, "
          f"tensors {q_bytes / 2**20:.2f} MiB = {q_bytes / fp32_bytes:.3f} x fp32 ({fp32_bytes / 2**20:.2f} MiB), "
          f"relative weight error mean {sum(errs) / len(errs):.4f} max {max(errs):.4f}"
          f"{'; Hugging Face form in ' + str(out / 'hf') if args.hf else ''}")
    return 0


def add_quantize_parser(csub: argparse._SubParsersAction) -> None:
    """Register `compress quantize` on the `compress` subparsers."""
    from lmforge.compress.schemes import CALIBRATIONS, RUNTIMES, SCHEMES

    p = csub.add_parser("quantize", help="int8 weight-only, int8 dynamic or int4 weight-only (GPTQ) model directory")
    p.add_argument("source", help="run dir (newest checkpoint), checkpoint step dir or Hugging Face dir")
    p.add_argument("--scheme", required=True, choices=SCHEMES)
    p.add_argument("--out", required=True, help="the quantized model directory to create")
    p.add_argument("--group-size", type=int, default=None, help="int4: input columns per scale (default 64)")
    p.add_argument("--calibration", default=None, choices=CALIBRATIONS,
                   help="int4: gptq (default; needs calibration data) or rtn (round to nearest)")
    p.add_argument("--calib-data", default=None,
                   help="int4 gptq: packed data dir to calibrate on (default: the run's data.dir)")
    p.add_argument("--calib-samples", type=int, default=None, help="int4 gptq: windows of the train split (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=None,
                   help="int4 gptq: tokens per window (default: the run's train.seq_len)")
    runtimes = sorted({r for rs in RUNTIMES.values() for r in rs})
    p.add_argument("--runtime", default="auto", choices=["auto", *runtimes],
                   help="how eval/generate run it: auto (the scheme's fastest on CPU), " +
                        "; ".join(f"{s}: {', '.join(r)}" for s, r in RUNTIMES.items()))
    p.add_argument("--hf", action="store_true", help="also write the Hugging Face form in OUT/hf (int8 schemes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=cmd_quantize)

"""`lmforge export --format onnx`: an lmforge decoder as one ONNX graph with KV-cache inputs and
outputs (torch.onnx.export, dynamo=True: torch.export then onnxscript), optionally with its weights
quantized to int8 for onnxruntime (onnxruntime.quantization.quantize_dynamic).

The directory written, whole, temp-then-rename (storage/atomic.py: atomic_dir):

- `model.onnx`: inputs `input_ids` (batch, seq) int64, `doc_start` (batch, seq) int64 (each new
  token's document start; zeros for one document), `past_key_values.<i>.key|value` (batch,
  kv_heads, past, head_dim) float32 per layer; outputs `logits` (batch, seq, vocab) float32 and
  `present.<i>.key|value` (batch, kv_heads, past + seq, head_dim). Positions continue from `past`.
  Dynamic axes: batch, seq, past. The graph is interop/onnx/decoder.py's `KVDecoder`.
- `onnx_export.json` (META): model config, input/output names, dtypes and axes, opset, weights
  (fp32 or int8 and how), the source checkpoint, and the check made at export time (the graph run
  in onnxruntime against the PyTorch decoder on the same tokens).
- `tokenizer.json` when the source has one.

Refused in one line (OnnxError) before any work: Mixture-of-Experts blocks (data-dependent routing
the exported graph would have to hold as gathers of variable size; not exported), top-k sparse
attention layers (the block choice per query block keeps state across decoding steps), "dynamic"
RoPE scaling that changes its tables inside the model's context, an opset outside what the
exporter and onnxruntime both run.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.config.loader import to_dict
from lmforge.interop.onnx.decoder import KVDecoder
from lmforge.interop.onnx.errors import OnnxError
from lmforge.models.llama.model import Transformer
from lmforge.storage.atomic import atomic_dir

FORMAT = 1
META = "onnx_export.json"
MODEL_FILE = "model.onnx"
# The dynamo exporter writes opset 18 and later; onnxruntime 1.20+ runs up to 21 on CPU. 18 reaches
# the most runtimes (older onnxruntime builds on edge devices).
MIN_OPSET, MAX_OPSET, DEFAULT_OPSET = 18, 21, 18
# Above this many weight bytes the graph keeps its weights in a side file (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_500_000_000
# fp32 export check: onnxruntime's logits against the PyTorch decoder's, relative to their scale.
FP32_CHECK_TOLERANCE = 1e-4


def export_refusal(cfg: ModelConfig) -> str | None:
    """Why `cfg` cannot be exported to ONNX, in one line, or None."""
    if cfg.moe.n_experts:
        return (f"model.moe.n_experts = {cfg.moe.n_experts}: Mixture-of-Experts blocks are not exported to ONNX "
                "(routing to experts is data-dependent); export a dense model, or use --format hf")
    kinds = [cfg.attention.kind(i) for i in range(cfg.n_layers)]
    if "topk" in kinds:
        return (f"model.attention.layers = {cfg.attention.layers}: top-k sparse attention layers are not exported "
                "to ONNX (their block choice keeps state across decoding steps); full and window layers are; "
                "use --format hf")
    s = cfg.rope_scaling
    if s.type == "dynamic" and s.original_length(cfg.max_seq_len) < cfg.max_seq_len:
        return (f"model.rope_scaling.type = 'dynamic' with original length {s.original_length(cfg.max_seq_len)} < "
                f"max_seq_len {cfg.max_seq_len}: its RoPE tables change with the sequence length inside the "
                "context, which the fixed ONNX tables cannot follow; use a static scaling (ntk, yarn, llama3, "
                "linear) or --format hf")
    if cfg.max_seq_len < 8:
        return f"model.max_seq_len = {cfg.max_seq_len}: the ONNX export needs a context of at least 8 tokens"
    return None


def require_export_deps() -> None:
    """The `export` extra's packages, or one line saying how to install them."""
    import importlib

    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise OnnxError(f"--format onnx needs the packages onnx, onnxscript and onnxruntime ({name} is missing); "
                            "install them with: pip install -e '.[export]'") from None


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxError(f"--opset {opset}: must be in [{MIN_OPSET}, {MAX_OPSET}] (the dynamo exporter writes opset "
                        f">= {MIN_OPSET}; onnxruntime runs up to {MAX_OPSET}); default {DEFAULT_OPSET}")


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) in graph order: Hugging Face / Optimum decoder names."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "doc_start", *past], ["logits", *present]


def _io_table(cfg: ModelConfig) -> dict:
    ins, outs = io_names(cfg.n_layers)
    kv = ["batch", cfg.kv_heads, "past", cfg.head_dim]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
              {"name": "doc_start", "dtype": "int64", "shape": ["batch", "seq"]}]
    inputs += [{"name": n, "dtype": "float32", "shape": kv} for n in ins[2:]]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", cfg.vocab_size]}]
    outputs += [{"name": n, "dtype": "float32", "shape": ["batch", cfg.kv_heads, "past + seq", cfg.head_dim]}
                for n in outs[1:]]
    return {"inputs": inputs, "outputs": outputs}


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines, warnings and log records (torchvision ops it skips, the
    quantizer's pre-processing hint) say nothing about this model: keep them off the user's screen."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def _export_graph(decoder: KVDecoder, path: Path, opset: int, external: bool) -> None:
    """torch.onnx.export (dynamo) of `decoder` with batch, seq and past dynamic, to `path`.

    Example sizes are all different and > 1, so torch.export ties no two axes together and
    specialises none (it would for sizes 0 and 1)."""
    cfg = decoder.model.cfg
    batch, past, seq = 2, 3, 4
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    kv = [torch.randn(batch, cfg.kv_heads, past, cfg.head_dim, generator=gen) for _ in range(2 * cfg.n_layers)]
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    dynamic = {"input_ids": {0: b, 1: s}, "doc_start": {0: b, 1: s},
               "past": tuple({0: b, 2: p} for _ in range(2 * cfg.n_layers))}
    ins, outs = io_names(cfg.n_layers)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(decoder, (ids, torch.zeros_like(ids), *kv), dynamo=True, input_names=ins,
                                    output_names=outs, dynamic_shapes=dynamic, opset_version=opset,
                                    external_data=external, verbose=False)
        program.save(str(path), external_data=external)
    _strip_debug_metadata(path)


def _strip_debug_metadata(path: Path) -> None:
    """Drop the exporter's per-node debugging records (FX node text, stack traces with this
    machine's file paths, module scopes): a third of a small model's file, and nothing a runtime
    reads. External weight files are left as they are (only the graph file is rewritten)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for graph in (model.graph, *(f for f in model.functions)):
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
    tmp = path.with_name(path.name + ".strip")
    onnx.save_model(model, str(tmp))
    tmp.replace(path)


def _quantize_int8(fp32_path: Path, out_path: Path) -> dict:
    """Dynamic int8: weights of MatMul and Gather (the embedding) stored int8 with per-tensor
    scales; activations quantized on the fly per call (onnxruntime.quantization.quantize_dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gather"]
    with _quiet():
        quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8, op_types_to_quantize=ops,
                         per_channel=False, use_external_data_format=False)
    return {"weights": "int8", "method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
            "per_channel": False, "op_types": ops, "activations": "uint8, quantized dynamically per call"}


def _check_against_torch(decoder: KVDecoder, model_path: Path) -> dict:
    """Run the written graph in onnxruntime (a 5-token prefill, then 2 one-token steps, batch 1) and
    the PyTorch decoder on the same tokens: the largest logit difference, relative to the logits'
    scale, and whether the argmax agreed at every position."""
    import onnxruntime as ort

    cfg = decoder.model.cfg
    ins, _ = io_names(cfg.n_layers)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    past_t, past_o = decoder.empty_past(1), [t.numpy() for t in decoder.empty_past(1)]
    worst, scale, agree = 0.0, 0.0, True
    with torch.no_grad():
        for lo, hi in ((0, 5), (5, 6), (6, 7)):
            chunk = ids[:, lo:hi]
            ref = decoder(chunk, torch.zeros_like(chunk), *past_t)
            got = sess.run(None, {"input_ids": chunk.numpy(), "doc_start": np.zeros(chunk.shape, np.int64),
                                  **dict(zip(ins[2:], past_o, strict=True))})
            past_t, past_o = list(ref[1:]), got[1:]
            worst = max(worst, float(np.abs(got[0] - ref[0].numpy()).max()))
            scale = max(scale, float(ref[0].abs().max()))
            agree &= bool((got[0].argmax(-1) == ref[0].argmax(-1).numpy()).all())
    return {"tokens": 7, "steps": "prefill 5, then 2 one-token steps", "max_abs_logit_diff": worst,
            "max_abs_logit": scale, "relative": worst / max(scale, 1e-12), "argmax_agrees": agree}


def export_onnx(model: Transformer, cfg: ModelConfig, out_dir: Path, *, source: dict,
                tokenizer_json: Path | None = None, int8: bool = False, opset: int = DEFAULT_OPSET,
                overwrite: bool = False) -> dict:
    """Write the ONNX directory (module docstring) for `model`; returns what onnx_export.json says.
    `source`: where the weights came from (path, kind, checkpoint), recorded as given."""
    check_opset(opset)
    if (why := export_refusal(cfg)) is not None:
        raise OnnxError(why)
    require_export_deps()
    import onnx
    import onnxruntime

    decoder = KVDecoder(model.float().eval()).eval()
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    meta: dict = {}

    def fill(tmp: Path) -> None:
        final = tmp / MODEL_FILE
        fp32_path = tmp / "model.fp32.onnx" if int8 else final
        _export_graph(decoder, fp32_path, opset, external)
        onnx.checker.check_model(str(fp32_path))
        check = _check_against_torch(decoder, fp32_path)
        if check["relative"] > FP32_CHECK_TOLERANCE or not check["argmax_agrees"]:
            raise RuntimeError(f"the exported graph disagrees with the PyTorch decoder: max logit difference "
                               f"{check['max_abs_logit_diff']:.3g} of {check['max_abs_logit']:.3g} (an exporter bug)")
        weights = {"weights": "fp32"}
        if int8:
            weights = _quantize_int8(fp32_path, final)
            int8_check = _check_against_torch(decoder, final)
            for p in tmp.iterdir():
                if p.name != MODEL_FILE:
                    p.unlink()
            check = {"fp32": check, "int8": int8_check}
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        meta.update({
            "format": FORMAT, "model_file": MODEL_FILE, "opset": opset, **weights,
            "model_bytes": sum(f.stat().st_size for f in tmp.iterdir() if f.name.startswith(MODEL_FILE)),
            "model": to_dict(cfg), **_io_table(cfg),
            "semantics": ("positions continue from the past length; doc_start: each new token's document start "
                          "(zeros: one document, as lmforge generate treats a prompt); present = past + this "
                          "call's keys/values; sliding-window layers keep every position, the mask applies "
                          "the window"),
            "source": source, "tokenizer": "tokenizer.json" if tokenizer_json is not None else None,
            "check": check,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}})
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")

    atomic_dir(Path(out_dir), fill, replace=overwrite)
    return meta

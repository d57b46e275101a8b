"""Quantize a loaded model: which weights, in which format, and the checks that come before any
work. The result is a flat dict of tensors (safetensors-ready) plus a description of each weight's
format; lmforge/compress/artifact.py writes it, lmforge/compress/runtime.py runs it.

What is quantized (the same for every scheme, so the size targets hold on small-vocabulary models
whose embedding and head are most of the parameters):
- every linear weight of the blocks (attention q/k/v/o, SwiGLU gate/up/down) and the output head:
  int8 per output row, symmetric (torchao's Int8Tensor.from_hp with PerRow: the numbers torchao's
  own int8 configs produce), or int4 group-wise (GPTQ-calibrated, or round-to-nearest);
- the token embedding: int8 per row (one scale per token), whatever the scheme: a lookup has no
  activation Hessian for GPTQ to use, and int8 keeps it within noise;
- norms (and any bias) stay fp32: a few thousand numbers. A head tied to the embedding is stored
  once, as the embedding's int8.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.compress.errors import CompressError
from lmforge.compress.int4 import dequantize_codes, pack, rtn_codes
from lmforge.compress.schemes import CALIBRATIONS, check_scheme
from lmforge.compress.sequential import gptq_model
from lmforge.compress.torchao_import import torchao_quantization
from lmforge.compress.train_data import CalibrationSet
from lmforge.config import ModelConfig

EMBEDDING = "tok_embeddings.weight"
HEAD = "output.weight"


@dataclass(frozen=True)
class QuantizeOptions:
    """What `lmforge compress quantize` was asked (group size and calibration: int4 only)."""

    scheme: str
    group_size: int = 64
    calibration: str = "gptq"
    calib_samples: int = 128
    calib_seq_len: int | None = None
    seed: int = 0


@dataclass
class QuantizedWeights:
    """tensors: safetensors-ready; formats: weight name -> {"format", "shape", ...}; report: per weight."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    formats: dict[str, dict] = field(default_factory=dict)
    report: list[dict] = field(default_factory=list)


def linear_weight_names(model: nn.Module) -> list[str]:
    """State-dict names of the weights the scheme quantizes: every nn.Linear in the blocks, and the head."""
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [n for n in names if n.startswith("layers.") or n == HEAD]


def check_quantizable(model: nn.Module, cfg: ModelConfig, opts: QuantizeOptions, where: str) -> None:
    """Every refusal, one line each, before any work: scheme, options, MoE, group size."""
    check_scheme(opts.scheme)
    if opts.calibration not in CALIBRATIONS:
        raise CompressError(f"--calibration {opts.calibration!r}: must be one of {', '.join(CALIBRATIONS)}")
    moe = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    if moe:
        raise CompressError(f"{where}: a Mixture-of-Experts model (layers {moe[:8]} hold 3-D expert weights); "
                            f"{opts.scheme} quantizes dense Llama-family models only (nn.Linear weights)")
    if opts.scheme != "int4-weight":
        return
    if opts.group_size < 2 or opts.group_size % 2:
        raise CompressError(f"--group-size {opts.group_size}: must be an even number >= 2 (two int4 codes a byte)")
    for name in linear_weight_names(model):
        k = model.get_parameter(name).shape[1]
        if k % opts.group_size:
            raise CompressError(f"--group-size {opts.group_size} does not divide the {k} input features of {name}; "
                                f"use a divisor of every layer's input width (e.g. {_common_divisor(model)})")


def _common_divisor(model: nn.Module) -> int:
    import math

    g = 0
    for name in linear_weight_names(model):
        g = math.gcd(g, model.get_parameter(name).shape[1])
    for cand in (128, 64, 32, 16, 8, 4, 2):
        if g % cand == 0:
            return cand
    return g


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(qdata int8 (rows, cols), scale fp32 (rows,)): torchao's symmetric per-row int8 of `w`."""
    tq = torchao_quantization()
    q = tq.Int8Tensor.from_hp(w.detach().float().cpu(), tq.PerRow())
    return q.qdata.contiguous(), q.scale.reshape(-1).float().contiguous()


def _rel_error(w: torch.Tensor, deq: torch.Tensor) -> float:
    return float((w - deq).norm() / w.norm().clamp(min=1e-30))


def quantize_model(model: nn.Module, cfg: ModelConfig, opts: QuantizeOptions, calib: CalibrationSet | None,
                   say: Callable[[str], None] = print) -> QuantizedWeights:
    """The quantized form of `model` (left unchanged: GPTQ works on a copy)."""
    out = QuantizedWeights()
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    targets = linear_weight_names(model)
    tied = cfg.tie_embeddings
    if tied:
        targets = [n for n in targets if n != HEAD]
    gptq = {}
    if opts.scheme == "int4-weight" and opts.calibration == "gptq":
        if calib is None:
            raise CompressError("int4-weight with GPTQ needs calibration data; pass --calib-data DIR or "
                                "--calibration rtn")
        work = copy.deepcopy(model).float()
        gptq = gptq_model(work, calib, opts.group_size, cfg.attention.doc_mask,
                          {HEAD.removesuffix(".weight")} if tied else set(), say)
    for name, w in sd.items():
        if tied and name == HEAD:
            continue
        if name == EMBEDDING or (name in targets and opts.scheme != "int4-weight"):
            q, s = int8_rows(w)
            out.tensors[f"{name}.qdata"], out.tensors[f"{name}.scale"] = q, s
            out.formats[name] = {"format": "int8_row", "shape": list(w.shape)}
            deq = q.float() * s[:, None]
            out.report.append({"weight": name, "format": "int8_row", "rel_error": _rel_error(w, deq)})
        elif name in targets:
            module = name.removesuffix(".weight")
            if module in gptq:
                r = gptq[module]
                codes, grid, deq, loss = r.codes, r.grid, r.dequantized, r.loss
            else:
                codes, grid = rtn_codes(w, opts.group_size)
                deq, loss = dequantize_codes(codes, grid.scale, grid.zero, opts.group_size), None
            out.tensors[f"{name}.qcodes"] = pack(codes).contiguous()
            out.tensors[f"{name}.scale"] = grid.scale.half().contiguous()
            out.tensors[f"{name}.zero"] = grid.zero.to(torch.uint8).contiguous()
            out.formats[name] = {"format": "int4_group", "shape": list(w.shape), "group_size": opts.group_size,
                                 "method": "gptq" if module in gptq else "rtn"}
            out.report.append({"weight": name, "format": "int4_group", "method": out.formats[name]["method"],
                               "rel_error": _rel_error(w, deq), "gptq_loss": loss})
        else:
            out.tensors[name] = w.contiguous()
            out.formats[name] = {"format": "fp32", "shape": list(w.shape)}
    return out

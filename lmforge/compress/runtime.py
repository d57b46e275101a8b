"""Run a quantized directory: rebuild the model from its stored tensors, with the matmuls of the
recorded runtime (lmforge/compress/schemes.py). Every runtime computes with the stored numbers:
"dequant" holds fp32 copies equal to q * scale (same products, fp32 kernels), the others keep the
weights packed in memory and call int8/int4 kernels."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lmforge.compress.errors import CompressError
from lmforge.compress.int4 import dequantize_codes, unpack
from lmforge.compress.torchao_import import torchao_quantization
from lmforge.config import ModelConfig
from lmforge.models.registry import family_of
from lmforge.tensors.cpu_features import (
    cpu_native_feature,
    is_x86,
    onednn_cap_from_env,
    parse_cpu_flags,
    read_cpuinfo,
)


def dequantized(name: str, fmt: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 weight a stored entry stands for."""
    kind = fmt["format"]
    if kind == "fp32":
        return tensors[name].float()
    if kind == "int8_row":
        return tensors[f"{name}.qdata"].float() * tensors[f"{name}.scale"].float()[:, None]
    if kind == "int4_group":
        codes = unpack(tensors[f"{name}.qcodes"])
        return dequantize_codes(codes, tensors[f"{name}.scale"].float(), tensors[f"{name}.zero"].float(),
                                int(fmt["group_size"]))
    raise CompressError(f"weight {name}: unknown stored format {kind!r} (this lmforge reads fp32, int8_row, int4_group)")


class FbgemmDynamicInt8Linear(nn.Module):
    """y = x W^T with W int8 per row (prepacked for torch's x86/fbgemm engine) and x quantized per
    tensor at run time (uint8, reduce_range as the engine requires on CPUs without VNNI)."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = qdata.shape
        with warnings.catch_warnings():  # torch marks its quantized tensor types deprecated; the kernel is current
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(qdata, scale.double(),
                                                          torch.zeros_like(scale, dtype=torch.long), 0)
        self._packed = torch.ops.quantized.linear_prepack(qw, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self._packed, True)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8RowEmbedding(nn.Module):
    """A token lookup from int8 rows with one scale per row: only the looked-up rows are turned
    into fp32 (q * scale, the numbers the dequant runtime holds), not the whole table per call."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qdata.shape
        self.register_buffer("qdata", qdata.to(torch.int8))
        self.register_buffer("scale", scale.float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qdata[ids].float() * self.scale[ids].unsqueeze(-1)


class AtenInt4Linear(nn.Module):
    """y = x W^T with W int4 group-wise, packed for torch's _weight_int4pack_mm_for_cpu (which reads
    w = (q - 8) * scale + bias per group: bias = (8 - zero) * scale gives the stored grid)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
        bias = (8 - zero.float()) * scale.float()
        self.register_buffer("scales_and_zeros", torch.stack([scale.float(), bias], dim=-1).transpose(0, 1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).float(), self.packed,
                                                       self.group_size, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


def _torchao_int8(tensors: dict[str, torch.Tensor], name: str, dynamic: bool) -> nn.Parameter:
    tq = torchao_quantization()
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

    q, s = tensors[f"{name}.qdata"], tensors[f"{name}.scale"].float()
    act = QuantizeTensorToInt8Kwargs(granularity=tq.PerRow(), mapping_type=tq.MappingType.SYMMETRIC) if dynamic else None
    t = tq.Int8Tensor(q, s[:, None], [1, q.shape[1]], torch.float32, zero_point=torch.zeros(q.shape[0], 1, dtype=torch.int8),
                   act_quant_kwargs=act)
    return nn.Parameter(t, requires_grad=False)


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def int8_matmul_clips() -> bool:
    """Whether this process's int8 x int8 matmul (`aten._int_mm`, which torchao's int8-dynamic calls
    on CPU) loses products: full-range random int8 against the exact product (20-40 ms on a Zen 3).

    Measured, not read from the CPU's flags, because the flags did not decide it: on a Zen 4 with
    ONEDNN_MAX_CPU_ISA capping oneDNN below VNNI the product went to oneDNN, which adds u8 x s8
    pairs in saturating 16-bit lanes (clipped), while an AVX2-only Zen 3 computed it without oneDNN,
    exactly, if ~20x slower than fbgemm (docs/benchmarks.md)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (64, 256), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (256, 128), dtype=torch.int8, generator=g)
    exact = (a.double() @ b.double()).to(torch.int32)  # |sum| <= 2^22: exact in fp64
    return not torch.equal(torch._int_mm(a, b), exact)


def int8_runtime_problem(scheme: str, runtime: str, device: torch.device | str = "cpu",
                         cpuinfo: str | None = None) -> str | None:
    """Why `runtime` cannot compute `scheme`'s stored numbers here, or None when it can.

    torchao's int8-dynamic multiplies int8 activations by int8 weights with `aten._int_mm`; where
    that clips (int8_matmul_clips) full-range activations lose their products: on a 4-layer,
    width-192 model the logits moved 9.5% from the stored numbers' (1.2% where it is exact; fbgemm,
    which quantizes activations to 7 bits on CPUs without VNNI, 4.1%). The CPU's flags (`cpuinfo`,
    default /proc/cpuinfo) only say why."""
    if scheme != "int8-dynamic" or runtime != "torchao" or torch.device(device).type != "cpu":
        return None
    if not int8_matmul_clips():
        return None
    flags, cap = parse_cpu_flags(read_cpuinfo() if cpuinfo is None else cpuinfo), onednn_cap_from_env()
    if flags and cpu_native_feature("int8", flags) is not None and cpu_native_feature("int8", flags, cap) is None:
        why = f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from the CPU's int8 dot-product instructions"
    elif flags and is_x86() and cpu_native_feature("int8", flags) is None:
        why = "this CPU has no int8 dot-product instructions (AVX512_VNNI, AVX_VNNI or AMX)"
    else:
        why = "torch's int8 matmul lost products on a test matrix here"
    return f"runtime torchao (int8-dynamic) would clip its int8 sums: {why}"


def build_runtime_model(cfg: ModelConfig, formats: dict[str, dict], tensors: dict[str, torch.Tensor],
                        scheme: str, runtime: str, device: torch.device | str = "cpu") -> nn.Module:
    """The model in eval mode, its weights the stored ones, its matmuls those of `runtime` (refused
    where that runtime's kernels cannot compute the stored numbers: int8_runtime_problem)."""
    problem = int8_runtime_problem(scheme, runtime, device)
    if problem is not None:
        raise CompressError(f"{problem}; use runtime fbgemm")
    return checked_runtime_model(cfg, formats, tensors, scheme, runtime, device)


def checked_runtime_model(cfg: ModelConfig, formats: dict[str, dict], tensors: dict[str, torch.Tensor],
                          scheme: str, runtime: str, device: torch.device | str = "cpu") -> nn.Module:
    """build_runtime_model for a caller that has already asked int8_runtime_problem (its probe
    multiplies a test matrix: once per load is enough)."""
    model = family_of(cfg).build(cfg, "cpu", None)
    sd = {name: dequantized(name, fmt, tensors) for name, fmt in formats.items()}
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "output.weight")]
    if missing or unexpected:
        raise CompressError(f"stored weights do not match the model config: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    if runtime != "dequant":
        _swap_kernels(model, formats, tensors, scheme, runtime)
    return model.to(device).eval()


def _swap_kernels(model: nn.Module, formats: dict[str, dict], tensors: dict[str, torch.Tensor], scheme: str,
                  runtime: str) -> None:
    for m in model.modules():  # the fused fp32 fast path reads .weight directly: modules are called one by one
        if hasattr(m, "kernels"):
            m.kernels = None
    for name, fmt in formats.items():
        module = name.removesuffix(".weight")
        if fmt["format"] == "fp32" or not name.endswith(".weight"):
            continue
        if fmt["format"] == "int8_row" and module == "tok_embeddings":
            _set_module(model, module, Int8RowEmbedding(tensors[f"{name}.qdata"], tensors[f"{name}.scale"]))
        elif runtime == "torchao":
            model.get_submodule(module).weight = _torchao_int8(tensors, name, dynamic=scheme == "int8-dynamic")
        elif runtime == "fbgemm":
            _set_module(model, module, FbgemmDynamicInt8Linear(tensors[f"{name}.qdata"], tensors[f"{name}.scale"]))
        elif runtime == "aten" and fmt["format"] == "int4_group":
            _set_module(model, module, AtenInt4Linear(unpack(tensors[f"{name}.qcodes"]), tensors[f"{name}.scale"],
                                                      tensors[f"{name}.zero"], int(fmt["group_size"])))
        else:
            raise CompressError(f"weight {name}: runtime {runtime} cannot run format {fmt['format']}")


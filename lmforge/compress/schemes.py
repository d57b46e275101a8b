"""The quantization schemes and, for each, the runtimes that can execute a quantized directory.

Weights are stored the same way whatever runtime runs them; the runtime only decides how the
matmuls are done at load time (lmforge/compress/runtime.py). The default ("auto") per scheme is the
fastest one measured on the development CPU (an Ice Lake Xeon; bench/quantize.py reports all):

- int8-weight:  "dequant" (int8 in the file, fp32 weights equal to q * scale in memory, MKL GEMM)
                or "torchao" (torchao Int8Tensor weights: int8 in memory too).
- int8-dynamic: "fbgemm" (torch's quantized::linear_dynamic: activations quantized per tensor at
                run time, int8 x int8 VNNI kernels) or "torchao" (Int8Tensor with per-token dynamic
                activation quantization).
- int4-weight:  "dequant" or "aten" (torch's _weight_int4pack_mm_for_cpu on packed int4).
"""

from __future__ import annotations

from lmforge.compress.errors import CompressError

SCHEMES = ("int8-weight", "int8-dynamic", "int4-weight")
CALIBRATIONS = ("gptq", "rtn")
RUNTIMES: dict[str, tuple[str, ...]] = {
    "int8-weight": ("dequant", "torchao"),
    "int8-dynamic": ("fbgemm", "torchao"),
    "int4-weight": ("dequant", "aten"),
}
DEFAULT_GROUP_SIZE = 64


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise CompressError(f"--scheme {scheme!r}: must be one of {', '.join(SCHEMES)}")


def resolve_runtime(scheme: str, runtime: str | None) -> str:
    """The runtime to record: `runtime` checked against the scheme, or the scheme's default."""
    check_scheme(scheme)
    allowed = RUNTIMES[scheme]
    if runtime in (None, "auto"):
        return allowed[0]
    if runtime not in allowed:
        raise CompressError(f"--runtime {runtime!r}: scheme {scheme} runs with {', '.join(('auto', *allowed))}")
    return runtime

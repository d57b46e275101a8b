"""Which dtypes this CPU multiplies natively, as oneDNN (torch's CPU matmul backend for bf16, fp16
and int8) sees it: the CPU's feature flags, less what ONEDNN_MAX_CPU_ISA caps off.

Without the instructions a dtype's kernels emulate it: a bf16 matmul on an AVX2-only CPU runs
~100x slower than fp32, and an int8 matmul without VNNI adds u8 x s8 pairs in saturating 16-bit
lanes, so its sums clip. Training precision (train/precision.py) and the int8 runtimes
(compress/runtime.py) both decide from here. `cpu_key` names this CPU for the caches of measured
figures (observability/peak.py's peak FLOP/s, models/common/linear.py's kernel choice)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# oneDNN's ISA levels by their ONEDNN_MAX_CPU_ISA names, as the bit masks of its dnnl_cpu_isa_t: a
# level is within a cap when its bits are a subset of the cap's ("ALL", "DEFAULT": no cap).
ONEDNN_ISA_BITS = {
    "SSE41": 0x1, "AVX": 0x3, "AVX2": 0x7, "AVX2_VNNI": 0xF, "AVX2_VNNI_2": 0x1F, "AVX512_CORE": 0x27,
    "AVX512_CORE_VNNI": 0x67, "AVX512_CORE_BF16": 0xE7, "AVX10_1_512": 0x1EF, "AVX512_CORE_FP16": 0x1EF,
    "AVX10_1_512_AMX": 0xFEF, "AVX512_CORE_AMX": 0xFEF, "AVX10_1_512_AMX_FP16": 0x1FEF,
    "AVX512_CORE_AMX_FP16": 0x1FEF,
}
# Per dtype, in oneDNN's order of preference: (feature, the CPU flags it needs, the oneDNN ISA level).
NATIVE_FEATURES = {
    "bf16": (("AMX", {"amx_bf16", "amx_tile"}, "AVX512_CORE_AMX"),
             ("AVX512_BF16", {"avx512_bf16"}, "AVX512_CORE_BF16")),
    "fp16": (("AMX-FP16", {"amx_fp16", "amx_tile"}, "AVX512_CORE_AMX_FP16"),
             ("AVX512_FP16", {"avx512_fp16"}, "AVX512_CORE_FP16")),
    "int8": (("AMX-INT8", {"amx_int8", "amx_tile"}, "AVX512_CORE_AMX"),
             ("AVX512_VNNI", {"avx512_vnni"}, "AVX512_CORE_VNNI"),
             ("AVX_VNNI", {"avx_vnni"}, "AVX2_VNNI")),
}


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """Feature flags from /proc/cpuinfo text: x86 "flags", ARM "Features" (first CPU only)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.lower().split())
    return frozenset()


def read_cpuinfo() -> str:
    """/proc/cpuinfo, or "" where there is none (not Linux): no flags, so nothing counts as native."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def onednn_cap_from_env() -> str:
    """The ISA this process caps oneDNN at (ONEDNN_MAX_CPU_ISA, or its older name); "" when uncapped."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA", "")


def onednn_allows(level: str, cap: str) -> bool:
    """Whether oneDNN capped at `cap` (an ONEDNN_MAX_CPU_ISA value, "" = none) may use `level`."""
    cap_bits = ONEDNN_ISA_BITS.get(cap.strip().upper())
    if cap_bits is None:  # unset, ALL, DEFAULT, or a name newer than this table: not capped
        return True
    need = ONEDNN_ISA_BITS[level]
    return need & cap_bits == need


def cpu_native_feature(dtype: str, flags: frozenset[str], onednn_isa_cap: str = "") -> str | None:
    """The CPU feature that runs `dtype` ("bf16" / "fp16" / "int8") matmuls natively, or None.

    oneDNN uses AMX tiles and the AVX512_BF16 / AVX512_FP16 / VNNI dot-product instructions;
    without them, or capped below them by ONEDNN_MAX_CPU_ISA, it emulates: bf16 and fp16 are
    converted to fp32 element by element (bf16 on AVX2 CPUs ~100x slower than fp32), int8 pairs
    are summed in saturating 16-bit lanes (results clip)."""
    for feature, needs, level in NATIVE_FEATURES.get(dtype, ()):
        if needs <= flags and onednn_allows(level, onednn_isa_cap):
            return feature
    return None


def is_x86() -> bool:
    """x86 CPUs are the ones the tables above describe (ARM's int8 and bf16 instructions differ)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def cpu_model_name(cpuinfo: str | None = None) -> str:
    """CPU model as the OS names it (/proc/cpuinfo on Linux)."""
    for line in (read_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            name = line.split(":", 1)[1].strip()
            if name:
                return name
    return platform.processor() or platform.machine() or "unknown-cpu"


# Variables that cap the instruction sets torch's CPU kernels use (ATen's dispatch, oneDNN, MKL).
ISA_CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# /proc/cpuinfo fields that tell CPU generations apart where the model name does not.
GENERATION_FIELDS = ("cpu family", "model", "stepping", "CPU implementer", "CPU part")
# The flags that decide which matmul kernels run and how fast.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                "amx_bf16", "amx_int8", "amx_fp16", "asimd", "sve", "sve2", "bf16", "i8mm")


def cpu_generation(cpuinfo: str | None = None) -> str:
    """Family/model/stepping (ARM: implementer/part) and the matmul-relevant flags of the first CPU.

    Virtual machines often name every CPU of a vendor alike ("AMD EPYC" for a Zen 3, a Zen 4 and
    a Zen 5), so the model name alone would let one generation's figures stand for another's."""
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep:
            if fields:  # the blank line after the first CPU's block
                break
            continue
        if key in GENERATION_FIELDS and key not in fields:
            fields[key] = value.strip()
    flags = parse_cpu_flags(text)
    parts = [f"{k.lower().replace('cpu ', '')} {fields[k]}" for k in GENERATION_FIELDS if k in fields]
    have = [f for f in KERNEL_FLAGS if f in flags]
    if have:
        parts.append("+".join(have))
    return ", ".join(parts)


def cpu_key(cpuinfo: str | None = None) -> str:
    """This CPU as a cache of measured figures names it: its model, its generation (cpu_generation)
    and every instruction-set cap in effect, since a figure measured on another generation, or
    under a cap (AVX2 paths forced on an AVX-512 CPU), is another machine's."""
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    generation = cpu_generation(text)
    caps = [f"{var}={os.environ[var]}" for var in ISA_CAP_VARS if os.environ.get(var)]
    return (cpu_model_name(text) + (f" ({generation})" if generation else "")
            + (f" [{', '.join(caps)}]" if caps else ""))

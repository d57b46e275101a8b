"""train.mixed_precision = "auto": every hardware case forced through injected inputs, the
resolved config round-trips through config.json, and explicit choices keep their meaning."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from lmforge.config import JobConfig, load_job_config
from lmforge.config.loader import build_dataclass
from lmforge.train.precision import (
    Hardware,
    autocast_context,
    choose_precision,
    cpu_native_feature,
    detect_hardware,
    measure_slowdown,
    parse_cpu_flags,
    resolve_job_precision,
)

# /proc/cpuinfo "flags" lines of the CPU kinds we meet (abridged to what matters plus neighbours).
ZEN3_AVX2 = "flags\t\t: fpu sse sse2 avx f16c fma avx2 bmi2 sha_ni vaes vpclmulqdq"
SKYLAKE_AVX512 = "flags\t\t: fpu avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"
ZEN4_AVX512_BF16 = "flags\t\t: fpu avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni avx512_vbmi2"
SAPPHIRE_RAPIDS_AMX = ("flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8")
# Some hypervisors hide avx512_bf16 but pass AMX through.
AMX_ONLY = "flags\t\t: fpu avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8"


def cpu(capability: str, cpuinfo: str) -> Hardware:
    return Hardware("cpu", cpu_capability=capability, cpu_flags=parse_cpu_flags(cpuinfo))


@pytest.mark.parametrize("hw,mode,reason", [
    (cpu("AVX2", ZEN3_AVX2), "fp32", "auto: CPU has no native bf16 (AVX2): fp32"),
    (cpu("AVX512", SKYLAKE_AVX512), "fp32", "auto: CPU has no native bf16 (AVX512): fp32"),
    (cpu("AVX512", ZEN4_AVX512_BF16), "bf16", "auto: CPU has native bf16 (AVX512_BF16): bf16"),
    (cpu("AVX512", SAPPHIRE_RAPIDS_AMX), "bf16", "auto: CPU has native bf16 (AMX): bf16"),
    (cpu("AVX512", AMX_ONLY), "bf16", "auto: CPU has native bf16 (AMX): bf16"),
    (cpu("DEFAULT", ""), "fp32", "auto: CPU has no native bf16 (DEFAULT): fp32"),  # no /proc/cpuinfo
    (Hardware("cuda", cuda_bf16=True, device_name="NVIDIA H100 80GB HBM3"), "bf16",
     "auto: NVIDIA H100 80GB HBM3 has bf16 tensor cores: bf16"),
    (Hardware("cuda", cuda_bf16=False, device_name="Tesla V100-SXM2-16GB"), "fp16",
     "auto: Tesla V100-SXM2-16GB has no bf16 tensor cores: fp16 with dynamic loss scaling"),
])
def test_auto_resolves_per_hardware(hw: Hardware, mode: str, reason: str) -> None:
    choice = choose_precision("auto", hw)
    assert (choice.mode, choice.reason, choice.native) == (mode, reason, True)


def capped(cap: str, cpuinfo: str = SAPPHIRE_RAPIDS_AMX) -> Hardware:
    return Hardware("cpu", cpu_capability="AVX512", cpu_flags=parse_cpu_flags(cpuinfo), onednn_isa_cap=cap)


@pytest.mark.parametrize("hw,mode,reason", [
    # ONEDNN_MAX_CPU_ISA below AMX and AVX512_BF16: oneDNN emulates bf16 although the CPU has both
    (capped("AVX2"), "fp32", "auto: ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN from the CPU's native bf16 (AMX): fp32"),
    (capped("avx512_core_vnni"), "fp32",
     "auto: ONEDNN_MAX_CPU_ISA=avx512_core_vnni keeps oneDNN from the CPU's native bf16 (AMX): fp32"),
    (capped("AVX512_CORE_BF16"), "bf16", "auto: CPU has native bf16 (AVX512_BF16): bf16"),  # AMX capped off
    (capped("AVX512_CORE_AMX"), "bf16", "auto: CPU has native bf16 (AMX): bf16"),
    (capped("AVX10_1_512_AMX_FP16"), "bf16", "auto: CPU has native bf16 (AMX): bf16"),
    (capped("ALL"), "bf16", "auto: CPU has native bf16 (AMX): bf16"),
    (capped("DEFAULT"), "bf16", "auto: CPU has native bf16 (AMX): bf16"),
    (capped("AVX2", ZEN3_AVX2), "fp32", "auto: CPU has no native bf16 (AVX512): fp32"),  # nothing to cap
])
def test_auto_respects_a_onednn_isa_cap(hw: Hardware, mode: str, reason: str) -> None:
    choice = choose_precision("auto", hw)
    assert (choice.mode, choice.reason, choice.native) == (mode, reason, True)


def test_explicit_bf16_under_a_onednn_cap_is_flagged_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    choice = choose_precision("bf16", capped("AVX2"))
    assert not choice.native and choice.reason == ("set in the config; ONEDNN_MAX_CPU_ISA=AVX2 keeps oneDNN "
                                                   "from the CPU's native bf16 (AMX): emulated, slow")
    assert choose_precision("fp16", capped("AVX512_CORE_FP16")).reason.endswith("(AVX512_FP16)")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert detect_hardware("cpu", cpuinfo=SAPPHIRE_RAPIDS_AMX).onednn_isa_cap == "AVX2"
    assert choose_precision("auto", detect_hardware("cpu", cpuinfo=SAPPHIRE_RAPIDS_AMX)).mode == "fp32"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE_BF16")  # the variable's older name
    assert cpu_native_feature("bf16", parse_cpu_flags(SAPPHIRE_RAPIDS_AMX),
                              detect_hardware("cpu").onednn_isa_cap) == "AVX512_BF16"


def test_a_gpu_decides_even_on_a_cpu_without_bf16() -> None:
    """The CPU's flags do not matter when training runs on the GPU (and vice versa)."""
    hw = Hardware("cuda", cuda_bf16=True, cpu_capability="AVX2", cpu_flags=parse_cpu_flags(ZEN3_AVX2))
    assert choose_precision("auto", hw).mode == "bf16"
    hw = Hardware("cpu", cuda_bf16=True, cpu_capability="AVX2", cpu_flags=parse_cpu_flags(ZEN3_AVX2))
    assert choose_precision("auto", hw).mode == "fp32"


@pytest.mark.parametrize("requested,hw,native", [
    ("bf16", cpu("AVX2", ZEN3_AVX2), False),
    ("fp16", cpu("AVX2", ZEN3_AVX2), False),
    ("fp16", cpu("AVX512", ZEN4_AVX512_BF16), False),  # Zen 4 has bf16 but no fp16 dot products
    ("bf16", cpu("AVX512", SAPPHIRE_RAPIDS_AMX), True),
    ("fp16", cpu("AVX512", SAPPHIRE_RAPIDS_AMX), True),  # avx512_fp16
    ("fp32", cpu("AVX2", ZEN3_AVX2), True),
    ("bf16", Hardware("cuda", cuda_bf16=False), False),
    ("fp16", Hardware("cuda", cuda_bf16=False), True),
])
def test_explicit_choice_is_kept_and_flagged(requested: str, hw: Hardware, native: bool) -> None:
    choice = choose_precision(requested, hw)
    assert choice.mode == requested and choice.native is native
    assert choice.reason.startswith("set in the config")
    assert ("emulated" in choice.reason) is (not native)


def test_cpu_flags_parsing() -> None:
    text = "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu AVX512_BF16 amx_tile amx_bf16\n\nprocessor\t: 1\n"
    flags = parse_cpu_flags(text)
    assert flags == {"fpu", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert parse_cpu_flags("Features\t: fp asimd bf16 sve") == {"fp", "asimd", "bf16", "sve"}  # aarch64
    assert cpu_native_feature("bf16", flags) == "AMX"
    assert cpu_native_feature("bf16", frozenset({"amx_bf16"})) is None  # tiles are needed too
    assert cpu_native_feature("fp32", flags) is None


@pytest.mark.parametrize("cpuinfo,cap,feature", [
    (ZEN3_AVX2, "", None),  # u8 x s8 pairs in saturating 16-bit lanes
    (ZEN4_AVX512_BF16, "", "AVX512_VNNI"),
    (SAPPHIRE_RAPIDS_AMX, "", "AMX-INT8"),
    (SAPPHIRE_RAPIDS_AMX + " avx512_vnni", "AVX512_CORE_BF16", "AVX512_VNNI"),  # tiles capped off
    (SAPPHIRE_RAPIDS_AMX, "AVX512_CORE", None),
    ("flags\t\t: fpu avx2 avx_vnni", "", "AVX_VNNI"),  # Alder Lake and later client cores
    ("flags\t\t: fpu avx2 avx_vnni", "AVX2", None),
])
def test_int8_dot_product_feature(cpuinfo: str, cap: str, feature: str | None) -> None:
    """The int8 runtimes' question (compress/runtime.py): does oneDNN sum int8 products natively?"""
    assert cpu_native_feature("int8", parse_cpu_flags(cpuinfo), cap) == feature


def test_this_machine_is_detected_consistently() -> None:
    """detect_hardware reads this machine; a CPU without the flags never resolves to bf16."""
    hw = detect_hardware("cpu")
    assert hw.device_type == "cpu" and hw.cpu_capability == torch.backends.cpu.get_cpu_capability()
    expected = "bf16" if cpu_native_feature("bf16", hw.cpu_flags, hw.onednn_isa_cap) else "fp32"
    assert choose_precision("auto", hw).mode == expected
    assert detect_hardware("cpu", cpuinfo=ZEN3_AVX2).cpu_flags == parse_cpu_flags(ZEN3_AVX2)


def test_default_and_every_recipe_is_auto() -> None:
    from pathlib import Path

    assert JobConfig().train.mixed_precision == "auto"
    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.toml"))
    assert recipes
    for r in recipes:
        assert 'mixed_precision = "auto"' in r.read_text(), r.name


def test_resolution_round_trips_through_config_json() -> None:
    """config.json stores the resolved mode and reason; read back and resolved again (a resume,
    `lmforge train` with the run's settings) it trains in the same precision."""
    hw = cpu("AVX512", SAPPHIRE_RAPIDS_AMX)
    cfg = load_job_config(None, [("train.steps", "500")])
    assert cfg.train.mixed_precision == "auto"  # loading does not resolve: the trainer does, once
    resolved, choice = resolve_job_precision(cfg, hw)
    assert cfg.train.mixed_precision == "auto"  # the caller's config is left alone
    assert resolved.train.mixed_precision == "bf16" == choice.mode
    assert resolved.train.mixed_precision_reason == "auto: CPU has native bf16 (AMX): bf16"
    stored = json.loads(json.dumps(asdict(resolved)))
    back = build_dataclass(JobConfig, stored)
    assert asdict(back) == asdict(resolved)
    again, choice2 = resolve_job_precision(back, hw)
    assert again.train.mixed_precision == "bf16" and choice2.native
    # A resumed run re-resolves "auto" from its recipe: the same hardware gives the same answer.
    assert resolve_job_precision(cfg, hw)[0].train == resolved.train


def test_unresolved_mode_is_refused_by_autocast() -> None:
    with pytest.raises(ValueError, match="not resolved"):
        autocast_context("auto", torch.device("cpu"))


@pytest.mark.timed
def test_slowdown_is_measured_and_quick() -> None:
    import time

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    slower = measure_slowdown("bf16")
    assert time.perf_counter() - t0 < 2.0
    assert torch.get_num_threads() == threads  # measured on one thread, the setting restored
    hw = detect_hardware("cpu")  # the CPU's flags and any ONEDNN_MAX_CPU_ISA cap, as `auto` reads them
    native = cpu_native_feature("bf16", hw.cpu_flags, hw.onednn_isa_cap) is not None
    if native:
        assert slower < 2.0  # AMX / AVX512_BF16: bf16 is at least near fp32
    else:
        # converted in software: ~100x slower on a Zen 3 (AVX2), 3-5x on an Ice Lake Xeon (AVX512F)
        assert slower > 2.0


@pytest.mark.parametrize("capability,name,mode", [((7, 0), "Tesla V100-SXM2-16GB", "fp16"),
                                                  ((9, 0), "NVIDIA H100 80GB HBM3", "bf16")])
def test_gpu_detection_reads_this_ranks_gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
                                            name: str, mode: str) -> None:
    asked: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: asked.append(i) or capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: asked.append(i) or name)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setenv("LOCAL_RANK", "3")
    hw = detect_hardware("auto")
    assert hw.device_type == "cuda" and hw.device_name == name and asked == [1, 1]  # local rank 3 of 2 GPUs
    assert choose_precision("auto", hw).mode == mode
    assert detect_hardware("cpu").device_type == "cpu"  # train.device = "cpu" on a GPU machine

"""Long-context RoPE (issue 13): every `rope_scaling` type transformers computes imports from, and
exports to, transformers with logits equal within 1e-5 (fp32) at lengths past the original
context, where the scaling matters; with the scaling switched off the logits differ by > 1e-3,
so the comparison can fail. Bad settings are refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from lmforge.config import ConfigError, ModelConfig, RopeScalingConfig
from lmforge.interop.hf.base import HFFormatError
from lmforge.interop.hf.exporter import export_hf
from lmforge.interop.hf.importer import import_hf
from lmforge.interop.hf.registry import from_hf_config, to_hf_config
from lmforge.models.common.rope import rope_tables
from lmforge.models.llama import SIZES, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TOL = 1e-5
ORIGINAL = 32  # the "trained" context the scalings extend
SEQ = 96  # past it: every scaling changes the logits here
MAX_POSITIONS = 128

# HF rope_scaling dict -> the RopeScalingConfig fields import must give (original_max_seq_len included).
CASES = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, dict(type="linear", factor=4.0)),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0},
                dict(type="dynamic", factor=4.0, original_max_seq_len=ORIGINAL)),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
             dict(type="yarn", factor=4.0, original_max_seq_len=ORIGINAL)),
    "yarn-betas-attention-factor": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "beta_fast": 16.0,
         "beta_slow": 2.0, "attention_factor": 1.25, "truncate": False},
        dict(type="yarn", factor=4.0, original_max_seq_len=ORIGINAL, beta_fast=16.0, beta_slow=2.0,
             attention_factor=1.25, truncate=False)),
    "yarn-mscale": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL, "mscale": 0.8,
         "mscale_all_dim": 0.5},
        dict(type="yarn", factor=4.0, original_max_seq_len=ORIGINAL, mscale=0.8, mscale_all_dim=0.5)),
    "llama3": ({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": ORIGINAL},
               dict(type="llama3", factor=4.0, original_max_seq_len=ORIGINAL)),
}


def hf_llama(rope_scaling: dict, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A tiny random LlamaForCausalLM (head dim 16, GQA) with `rope_scaling`; random norms."""
    torch.manual_seed(seed)
    # HF "dynamic" scales past max_position_embeddings; the others name the extended length there.
    max_positions = ORIGINAL if rope_scaling["rope_type"] == "dynamic" else MAX_POSITIONS
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=dict(rope_scaling), initializer_range=0.05)
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return hf


def tokens(vocab: int, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))


def max_diff(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(x) - theirs(x).logits).abs().max().item()


def without_scaling(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """`model` with plain RoPE tables: what a converter that dropped rope_scaling would give."""
    model.cfg = plain = replace(cfg, rope_scaling=RopeScalingConfig())
    model.rope_cos, model.rope_sin = rope_tables(plain)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_rope_scaling_imports_and_exports_with_equal_logits(tmp_path: Path, case: str):
    hf_scaling, expected = CASES[case]
    hf = hf_llama(hf_scaling)
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = import_hf(tmp_path / "hf")
    assert cfg.rope_scaling == RopeScalingConfig(**expected)
    assert cfg.max_seq_len == MAX_POSITIONS  # dynamic: factor x max_position_embeddings
    x = tokens(cfg.vocab_size)
    imported = max_diff(model, hf, x)
    print(f"{case}: import max |logits diff| = {imported:.2e}")
    assert imported <= TOL

    out = export_hf(model, cfg, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert written["rope_scaling"]["rope_type"] == hf_scaling["rope_type"]
    assert written["rope_parameters"] == {**written["rope_scaling"], "rope_theta": 10000.0}
    back = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    exported = max_diff(model, back, x)
    print(f"{case}: export max |logits diff| = {exported:.2e}")
    assert exported <= TOL

    # The comparison can fail: the same weights with the scaling dropped are far off.
    off = max_diff(without_scaling(model, cfg), hf_llama(hf_scaling), x)
    print(f"{case}: scaling off: max |logits diff| = {off:.2e}")
    assert off > 1e-3


def test_scaling_changes_nothing_within_the_original_context_for_dynamic(tmp_path: Path):
    """HF "dynamic" is plain RoPE up to max_position_embeddings; so is ours, from the same tables."""
    hf = hf_llama(CASES["dynamic"][0])
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = import_hf(tmp_path / "hf")
    x = tokens(cfg.vocab_size, seq=ORIGINAL)
    assert max_diff(model, hf, x) <= TOL
    assert max_diff(without_scaling(model, cfg), hf, x) <= TOL


def test_dynamic_generation_with_kv_cache_matches_transformers(tmp_path: Path):
    """With a KV cache HF recomputes the dynamic frequencies for each new length and keeps the keys
    already cached as they were; ours does the same (tables for start + seq, from `start` on)."""
    hf = hf_llama(CASES["dynamic"][0])
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = import_hf(tmp_path / "hf")
    x = tokens(cfg.vocab_size, seq=44)[:1]
    cache = model.new_kv_cache(1, cfg.max_seq_len)
    past = transformers.DynamicCache(config=hf.config)
    with torch.no_grad():
        for lo, hi in [(0, 40), (40, 41), (41, 42), (42, 44)]:
            ours = model(x[:, lo:hi], cache)
            theirs = hf(x[:, lo:hi], cache=past, use_cache=True).logits
            assert (ours - theirs).abs().max().item() <= TOL, (lo, hi)


def test_static_ntk_exports_as_a_larger_base(tmp_path: Path):
    """"ntk" is plain RoPE with theta * factor^(d / (d - 2)): exported as that rope_theta (HF has
    no static NTK type), with equal logits; it equals HF "dynamic" at the length whose dynamic
    factor is the same."""
    base = replace(SIZES["debug"], max_seq_len=MAX_POSITIONS)  # head dim 16
    cfg = replace(base, rope_scaling=RopeScalingConfig(type="ntk", factor=4.0))
    model = build_model(cfg, seed=0).eval()
    out = export_hf(model, cfg, tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    assert "rope_scaling" not in written and written["rope_theta"] == pytest.approx(10000.0 * 4.0 ** (16 / 14))
    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    x = tokens(cfg.vocab_size)
    assert max_diff(model, hf, x) <= TOL
    back, cfg2 = import_hf(out)
    assert cfg2.rope_scaling.type == "none" and torch.allclose(back.rope_cos, model.rope_cos, atol=1e-6)
    # HF dynamic (factor 2, max_position_embeddings 32) at length 80: factor 2 * 80 / 32 - 1 = 4.
    dyn = replace(base, rope_scaling=RopeScalingConfig(type="dynamic", factor=2.0, original_max_seq_len=32))
    cos, sin = rope_tables(dyn, length=80)
    assert torch.allclose(cos, model.rope_cos[:80], atol=1e-6) and torch.allclose(sin, model.rope_sin[:80], atol=1e-6)


@pytest.mark.parametrize("change,key", [
    (dict(type="linear", factor=0.5), "model.rope_scaling.factor"),
    (dict(type="yarn", factor=float("nan")), "model.rope_scaling.factor"),
    (dict(type="yarn", factor=2.0, original_max_seq_len=0), "model.rope_scaling.original_max_seq_len"),
    (dict(type="llama3", factor=8.0, low_freq_factor=0.0), "model.rope_scaling.low_freq_factor"),
    (dict(type="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=4.0), "model.rope_scaling.high_freq_factor"),
    (dict(type="yarn", factor=2.0, beta_fast=1.0, beta_slow=1.0), "model.rope_scaling.beta_fast"),
    (dict(type="yarn", factor=2.0, beta_slow=0.0), "model.rope_scaling.beta_slow"),
    (dict(type="yarn", factor=2.0, attention_factor=0.0), "model.rope_scaling.attention_factor"),
    (dict(type="yarn", factor=2.0, mscale=-1.0), "model.rope_scaling.mscale"),
])
def test_bad_rope_scaling_is_refused_in_one_line(change: dict, key: str):
    with pytest.raises(ConfigError, match=key) as e:
        ModelConfig(rope_scaling=RopeScalingConfig(**change)).validate()
    assert "\n" not in str(e.value)
    ModelConfig(rope_scaling=RopeScalingConfig(type="none", factor=0.5)).validate()  # ignored without a type
    with pytest.raises(ConfigError, match="head dim > 2"):
        ModelConfig(dim=8, n_heads=4, rope_scaling=RopeScalingConfig(type="ntk", factor=2.0)).validate()


def test_recipe_override_sets_rope_scaling():
    from dataclasses import asdict

    from lmforge.config.loader import apply_override, build_dataclass

    cfg = ModelConfig()
    apply_override(cfg, "rope_scaling.type", "yarn")
    apply_override(cfg, "rope_scaling.factor", "4")
    assert cfg.rope_scaling.type == "yarn" and cfg.rope_scaling.factor == 4.0
    with pytest.raises(ConfigError, match="rope_scaling.type"):
        apply_override(cfg, "rope_scaling.type", "longrope")
    # A run's config.json (asdict) reads back the same (what generate loads).
    cfg.rope_scaling.original_max_seq_len = 512
    assert build_dataclass(ModelConfig, json.loads(json.dumps(asdict(cfg))), "model.") == cfg


@pytest.mark.parametrize("change,key", [
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}}, "longrope"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}}},
     "one global RoPE table"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs a factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "4"}}, "factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0.5}}, "model.rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs low_freq_factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
])
def test_unsupported_hf_rope_settings_are_refused_in_one_line(change: dict, key: str):
    d = {**to_hf_config(replace(SIZES["debug"], max_seq_len=64)), **change}
    with pytest.raises(HFFormatError, match=key) as e:
        from_hf_config(d)
    assert "\n" not in str(e.value)


def test_rope_backward_with_an_attention_factor_is_the_transpose():
    """YaRN scales cos and sin: the rotation's hand-written backward (its transpose) stays exact."""
    from lmforge.models.common.rope import apply_rope

    cfg = replace(SIZES["debug"], max_seq_len=24,
                  rope_scaling=RopeScalingConfig(type="yarn", factor=4.0, original_max_seq_len=8))
    cos, sin = rope_tables(cfg)
    assert cos.pow(2).add(sin.pow(2)).sqrt().sub(1 + 0.1 * torch.log(torch.tensor(4.0))).abs().max() < 1e-6
    x = torch.randn(2, 24, 3, cfg.head_dim, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    (ours,) = torch.autograd.grad(apply_rope(x, cos, sin), x, g)
    c, s = cos[:, None, :].double(), sin[:, None, :].double()
    x1, x2 = x.chunk(2, dim=-1)
    (ref,) = torch.autograd.grad(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1), x, g)
    assert torch.allclose(ours, ref, atol=1e-12)

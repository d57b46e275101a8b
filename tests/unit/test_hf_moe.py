"""Hugging Face interop for Mixtral and Qwen2-MoE: a transformers model (random weights, built from
its config) imports with equal logits, our export loads in transformers as the right class with
equal logits, both checkpoint layouts (per-expert on disk, fused 5.x in memory) read, and what the
families cannot express is refused in one line, both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmforge.cli_export import _byte_size
from lmforge.config import ModelConfig, MoEConfig
from lmforge.interop.hf.base import HFFormatError
from lmforge.interop.hf.exporter import export_hf
from lmforge.interop.hf.importer import import_hf
from lmforge.interop.hf.io import shard_groups
from lmforge.interop.hf.registry import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from lmforge.models.llama.model import Transformer, build_model, count_params

TOL = 1e-5
VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mixtral_config(**kw) -> transformers.PretrainedConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                rope_theta=50000.0)
    return transformers.MixtralConfig(**{**base, **kw})


def qwen2_moe_config(**kw) -> transformers.PretrainedConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                shared_expert_intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.Qwen2MoeConfig(**{**base, **kw})


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norms and biases random too (all-ones norms or zero biases would hide a swapped name)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name
                        else torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def hf_model(config: transformers.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomised(transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32), seed)


def tokens(batch: int = 2, seq: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def ours_from(hf: torch.nn.Module) -> tuple[Transformer, ModelConfig]:
    cfg = from_hf_config(hf.config.to_dict())
    model = Transformer(cfg)
    result = model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=False)
    assert result.missing_keys == (["output.weight"] if cfg.tie_embeddings else []) and not result.unexpected_keys
    assert (model.output.weight is model.tok_embeddings.weight) is cfg.tie_embeddings
    return model.eval(), cfg


def max_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        la = a(x)
        lb = b(x)
        la, lb = getattr(la, "logits", la), getattr(lb, "logits", lb)
    return (la - lb).abs().max().item()


CASES = {
    "mixtral": (mixtral_config, {}),
    "mixtral-top3-tied": (mixtral_config, {"num_experts_per_tok": 3, "tie_word_embeddings": True}),
    "qwen-all-sparse": (qwen2_moe_config, {"norm_topk_prob": False}),
    "qwen-step2-normtopk": (qwen2_moe_config, {"decoder_sparse_step": 2, "norm_topk_prob": True}),
    "qwen-mlp-only": (qwen2_moe_config, {"mlp_only_layers": [0, 2], "num_experts_per_tok": 1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_both_ways(case: str, tmp_path: Path):
    """transformers -> lmforge (fused 5.x names in memory) and lmforge -> transformers (our export,
    per-expert layout, loaded by AutoModelForCausalLM as the class `architectures` names)."""
    make, kw = CASES[case]
    hf = hf_model(make(**kw))
    ours, cfg = ours_from(hf)
    hf_sparse = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert hf_sparse == [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    assert cfg.moe.n_experts == 4 and cfg.moe.capacity_factor == 0
    x = tokens()
    with torch.no_grad():
        assert ours(x).abs().max() > 0.1  # logits not trivially small
    assert max_diff(ours, hf, x) <= TOL

    out = export_hf(ours, cfg, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(back) is type(hf)
    assert max_diff(ours, back, x) <= TOL

    # The comparison can fail: swapping gate and up of the routed experts moves the logits.
    with torch.no_grad():
        for i in hf_sparse:
            e = ours.layers[str(i)].feed_forward.experts
            e.w1.data, e.w3.data = e.w3.data.clone(), e.w1.data.clone()
    assert max_diff(ours, hf, x) > 1e-3


def test_config_fields_read_from_each_family():
    mix = from_hf_config(mixtral_config(sliding_window=None, rms_norm_eps=1e-6).to_dict())
    assert (mix.dim, mix.n_layers, mix.kv_heads, mix.expert_hidden_size, mix.rope_theta) == (32, 2, 2, 24, 50000.0)
    assert (mix.moe.n_experts, mix.moe.top_k, mix.moe.norm_topk, mix.moe.n_shared_experts, mix.qkv_bias) == (
        4, 2, True, 0, False)
    qw = from_hf_config(qwen2_moe_config(decoder_sparse_step=2, mlp_only_layers=[3]).to_dict())
    assert (qw.ffn_hidden_size, qw.expert_hidden_size, qw.moe.n_shared_experts, qw.moe.shared_expert_gate) == (
        40, 24, 2, True)
    assert [qw.is_moe_layer(i) for i in range(4)] == [False, True, False, False] and qw.qkv_bias


def test_saved_checkpoint_in_per_expert_layout_imports(tmp_path: Path):
    """save_pretrained writes the published per-expert layout (block_sparse_moe.experts.J.w1);
    import_hf reads it."""
    hf = hf_model(mixtral_config(), seed=1)
    hf.save_pretrained(tmp_path / "hf")
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in stored
    model, cfg = import_hf(tmp_path / "hf")
    assert cfg.moe.n_experts == 4
    assert max_diff(model, hf, tokens(seed=1)) <= TOL


def native_cfg(**moe) -> ModelConfig:
    base = dict(n_experts=4, top_k=2, expert_hidden=24)
    return ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_hidden=40,
                       max_seq_len=64, moe=MoEConfig(**{**base, **moe}))


def test_lmforge_model_without_qkv_bias_exports_as_qwen2_moe(tmp_path: Path):
    """A native config that only Qwen2-MoE expresses (first layer dense, gated shared expert, top-1
    unnormalised): written with zero q/k/v biases and norm_topk_prob false; logits equal; our own
    import reads it back bit for bit."""
    cfg = native_cfg(top_k=1, first_k_dense=1, n_shared_experts=1, shared_expert_gate=True)
    model = randomised(build_model(cfg, seed=2), seed=2)
    hf_cfg = to_hf_config(cfg)
    assert hf_cfg["architectures"] == ["Qwen2MoeForCausalLM"] and hf_cfg["norm_topk_prob"] is False
    assert (hf_cfg["decoder_sparse_step"], hf_cfg["mlp_only_layers"]) in ((1, [0]),)
    out = export_hf(model, cfg, tmp_path / "hf")
    stored = load_file(str(out / "model.safetensors"))
    assert torch.equal(stored["model.layers.2.self_attn.k_proj.bias"], torch.zeros(16))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert max_diff(model, hf, tokens(seed=2)) <= TOL
    back, cfg2 = import_hf(out)
    assert cfg2.qkv_bias and [cfg2.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert max_diff(model, back, tokens(seed=2)) == 0.0


@pytest.mark.parametrize("moe,key", [
    ({"router": "expert_choice", "capacity_factor": 1.0}, "router"),
    ({"score_func": "sigmoid"}, "score_func"),
    ({"bias_update_rate": 1e-3}, "bias_update_rate"),
    ({"capacity_factor": 1.25}, "capacity_factor"),
    ({"route_scale": 2.0}, "route_scale"),
    ({"n_shared_experts": 1}, "shared_expert_gate = False"),
    ({"first_k_dense": 1}, "Qwen2-MoE needs"),
    ({"top_k": 1}, "Mixtral renormalises"),
])
def test_export_refuses_what_neither_family_expresses(moe: dict, key: str, tmp_path: Path):
    cfg = native_cfg(**moe)
    cfg.validate()
    with pytest.raises(HFFormatError, match=key) as e:
        export_hf(build_model(cfg, seed=0), cfg, tmp_path / "hf")
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()


def test_export_refuses_a_trained_selection_bias(tmp_path: Path):
    cfg = native_cfg()
    model = build_model(cfg, seed=0)
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in to_hf_state_dict(model.state_dict(), cfg)
    model.layers["1"].feed_forward.router.expert_bias[2] = 0.01
    with pytest.raises(HFFormatError, match=r"layers\.1\.feed_forward\.router\.expert_bias is nonzero") as e:
        export_hf(model, cfg, tmp_path / "hf")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("make,change,key", [
    (mixtral_config, {"sliding_window": 16}, "sliding_window"),
    (mixtral_config, {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    (mixtral_config, {"num_experts_per_tok": 1}, "num_experts_per_tok"),
    (mixtral_config, {"hidden_act": "gelu"}, "hidden_act"),
    (qwen2_moe_config, {"use_sliding_window": True}, "use_sliding_window"),
    (qwen2_moe_config, {"shared_expert_intermediate_size": 30}, "shared_expert_intermediate_size"),
    (qwen2_moe_config, {"num_experts_per_tok": 1, "norm_topk_prob": True}, "norm_topk_prob"),
    (qwen2_moe_config, {"mlp_only_layers": [0, 1, 2, 3]}, "mlp_only_layers"),
    (qwen2_moe_config, {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
    (qwen2_moe_config, {"model_type": "deepseek_v3"}, "model_type"),
])
def test_import_refuses_unsupported_options_in_one_line(make, change: dict, key: str):
    d = {**make().to_dict(), **change}
    with pytest.raises(HFFormatError, match=key) as e:
        from_hf_config(d)
    assert "\n" not in str(e.value)


def test_missing_expert_and_unexpected_weights_are_named(tmp_path: Path):
    cfg = native_cfg()
    out = export_hf(build_model(cfg, seed=0), cfg, tmp_path / "hf")
    sd = load_file(str(out / "model.safetensors"))
    del sd["model.layers.2.block_sparse_moe.experts.1.w2.weight"]
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match=r"model.layers.2: expert weights w2 missing for experts \[1\]"):
        import_hf(out)
    sd["model.layers.2.block_sparse_moe.experts.1.w2.weight"] = torch.zeros(32, 24)
    sd["model.layers.0.mlp.shared_expert_gate.weight"] = torch.zeros(1, 32)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match="unexpected weights.*shared_expert_gate"):
        import_hf(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"


def test_published_configs_map_to_their_published_sizes():
    """Mixtral-8x7B and Qwen1.5-MoE-A2.7B config.json values (typed in, no download) give the
    published totals (46.7B / 12.9B active; 14.3B / 2.7B active) through our config and count."""
    mixtral = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2,
               "rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "sliding_window": None,
               "router_aux_loss_coef": 0.02, "output_router_logits": False, "hidden_act": "silu"}
    c = count_params(from_hf_config(mixtral))
    assert (c["total"], c["active"]) == (46_702_792_704, 12_879_925_248)
    qwen = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
            "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
            "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936,
            "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False, "decoder_sparse_step": 1,
            "rope_theta": 1e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192, "use_sliding_window": False,
            "sliding_window": 32768, "max_window_layers": 21, "hidden_act": "silu"}
    cfg = from_hf_config(qwen)
    assert (cfg.moe.n_shared_experts, cfg.qkv_bias, cfg.moe.norm_topk) == (4, True, False)
    c = count_params(cfg)
    assert round(c["total"] / 1e9, 1) == 14.3 and round(c["active"] / 1e9, 1) == 2.7


def test_count_params_counts_qkv_bias_and_dense_layers():
    cfg = native_cfg(n_shared_experts=1, shared_expert_gate=True, dense_layers=[1])
    cfg = ModelConfig(**{**cfg.__dict__, "qkv_bias": True})
    model = build_model(cfg, seed=0)
    assert [cfg.is_moe_layer(i) for i in range(3)] == [True, False, True]
    assert model.layers["0"].attention.wk.bias.shape == (16,) and not model.layers["1"].attention.wq.bias.any()
    assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_shard_groups_and_sizes():
    t = {n: torch.zeros(k) for n, k in [("a", 10), ("b", 10), ("big", 100), ("c", 5)]}  # fp32: 4 bytes each
    assert shard_groups(t, None) == [["a", "b", "big", "c"]]
    assert shard_groups(t, 80) == [["a", "b"], ["big"], ["c"]]
    assert shard_groups(t, 10**6) == [["a", "b", "big", "c"]]
    assert (_byte_size("5GB"), _byte_size("500mb"), _byte_size("64KB"), _byte_size("123")) == (
        5 * 10**9, 500 * 10**6, 64_000, 123)
    with pytest.raises(Exception, match="positive size"):
        _byte_size("-1GB")

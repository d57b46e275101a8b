"""Hugging Face interop: our export loads in transformers with equal logits, a transformers model
imports with equal logits, tokenizer files load with AutoTokenizer, and what we cannot represent
is refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import TextTokenizer, train_tokenizer
from lmforge.interop.hf.base import HFFormatError
from lmforge.interop.hf.exporter import export_hf
from lmforge.interop.hf.importer import import_hf
from lmforge.interop.hf.registry import from_hf_config, from_hf_state_dict, to_hf_config, to_hf_state_dict
from lmforge.models.llama import SIZES, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TOL = 1e-5


def small_cfg(**kw) -> ModelConfig:
    # debug size: dim 64, 2 layers, 4 heads, 2 kv heads (GQA), vocab 512
    return replace(SIZES["debug"], max_seq_len=64, **kw)


def randomised_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, norms included (all-ones norms would hide a swapped norm)."""
    model = build_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def tokens(cfg_vocab: int, batch: int = 2, seq: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg_vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def train_tiny_tokenizer(path: Path) -> Path:
    """lmforge's byte-level BPE ("<|endoftext|>" = id 0), trained on a few lines."""
    text = ["To be, or not to be, that is the question.", "In the beginning was the Word.",
            "Whether 'tis nobler in the mind to suffer the slings and arrows"] * 20
    corpus = path.with_name("corpus.jsonl")
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in text))
    return train_tokenizer(corpus, path, vocab_size=320, min_frequency=1)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path: Path, tie: bool):
    cfg = small_cfg(tie_embeddings=tie, rope_theta=50000.0)
    model = randomised_model(cfg)
    out = export_hf(model, cfg, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    stored = load_file(str(out / "model.safetensors"))
    assert ("lm_head.weight" in stored) is (not tie)
    assert len(stored) == 2 + 9 * cfg.n_layers + (0 if tie else 1)

    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings is tie
    x = tokens(cfg.vocab_size)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ours.abs().max() > 0.5  # logits are not trivially small
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("kv_heads,tie", [(2, False), (4, True)], ids=["gqa-untied", "mha-tied"])
def test_transformers_model_imports_with_equal_logits(tmp_path: Path, kv_heads: int, tie: bool):
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=500000.0,
        tie_word_embeddings=tie, initializer_range=0.05)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    hf.save_pretrained(tmp_path / "hf")

    model, cfg = import_hf(tmp_path / "hf")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.ffn_hidden_size, cfg.vocab_size) == (
        64, 2, 4, kv_heads, 160, 384)
    assert (cfg.norm_eps, cfg.rope_theta, cfg.max_seq_len, cfg.tie_embeddings) == (1e-6, 500000.0, 128, tie)
    assert (model.output.weight is model.tok_embeddings.weight) is tie
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    x = tokens(cfg.vocab_size, seq=48)
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= TOL


def test_sharded_checkpoint_imports(tmp_path: Path):
    torch.manual_seed(1)
    hf_cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    model, cfg = import_hf(tmp_path / "hf")
    x = tokens(cfg.vocab_size, seq=16)
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= TOL


def test_round_trip_through_our_export_is_exact(tmp_path: Path):
    cfg = small_cfg()
    model = randomised_model(cfg, seed=3)
    export_hf(model, cfg, tmp_path / "hf")
    back, cfg2 = import_hf(tmp_path / "hf")
    for f in ("dim", "n_layers", "n_heads", "kv_heads", "ffn_hidden_size", "vocab_size", "norm_eps", "rope_theta",
              "max_seq_len", "tie_embeddings"):
        assert getattr(cfg2, f) == getattr(cfg, f), f
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_state_dict_renames_are_inverse_and_strip_wrappers():
    cfg = small_cfg(tie_embeddings=True)
    sd = build_model(cfg, seed=0).state_dict()
    hf = to_hf_state_dict({"_orig_mod." + k: v for k, v in sd.items()}, cfg)
    assert "lm_head.weight" not in hf and "model.layers.1.mlp.gate_proj.weight" in hf
    assert hf["model.layers.0.self_attn.k_proj.weight"] is sd["layers.0.attention.wk.weight"]
    back = from_hf_state_dict({**hf, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, cfg)
    assert back.keys() == sd.keys() - {"output.weight"}
    with pytest.raises(HFFormatError, match="model.layers.0.mlp.gate_proj.bias"):
        from_hf_state_dict({**hf, "model.layers.0.mlp.gate_proj.bias": torch.ones(3)}, cfg)


def test_bf16_export_and_dtype_kept_on_import(tmp_path: Path):
    cfg = small_cfg()
    model = randomised_model(cfg)
    export_hf(model, cfg, tmp_path / "hf", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back, _ = import_hf(tmp_path / "hf")
    assert back.tok_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(back.tok_embeddings.weight, model.tok_embeddings.weight.to(torch.bfloat16))
    back32, _ = import_hf(tmp_path / "hf", dtype=torch.float32)
    assert back32.norm.weight.dtype == torch.float32


def test_tokenizer_export_loads_with_autotokenizer(tmp_path: Path):
    from tokenizers import Tokenizer

    tok_path = train_tiny_tokenizer(tmp_path / "tokenizer.json")
    ours = Tokenizer.from_file(str(tok_path))
    assert ours.token_to_id("<|endoftext|>") == 0
    cfg = small_cfg()
    out = export_hf(randomised_model(cfg), cfg, tmp_path / "hf", tokenizer_json=tok_path)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == 0
    text_tok = TextTokenizer.from_file(tok_path)
    for text in ["To be, or not to be", "  whether 'tis nobler\nin the mind ünïcödé 123", ""]:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert len(ids) > 0 or text == ""
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids) == text
        assert text_tok.encode(text) == ids
    assert hf_tok("the end<|endoftext|>")["input_ids"][-1] == 0
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    assert fast("the question")["input_ids"] == ours.encode("the question").ids


def test_from_hf_config_reads_v4_and_v5_rope_keys():
    base = to_hf_config(small_cfg(rope_theta=1234.0), eos_token_id=0)
    assert base["rope_parameters"]["rope_theta"] == base["rope_theta"] == 1234.0
    v4 = {k: v for k, v in base.items() if k != "rope_parameters"}
    v5 = {k: v for k, v in base.items() if k != "rope_theta"}
    assert from_hf_config(v4).rope_theta == from_hf_config(v5).rope_theta == 1234.0
    assert from_hf_config({**v4, "rope_scaling": None}).rope_theta == 1234.0
    assert from_hf_config({**v4, "num_key_value_heads": 4}).n_kv_heads is None


@pytest.mark.parametrize("change,key", [
    ({"rope_scaling": {"rope_type": "longrope", "factor": 8.0}}, "longrope"),  # the scalings we read: test_hf_rope.py
    ({"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4, "factor": 2.0}}, "proportional"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 32}, "head_dim"),
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "model_type"),
    ({"num_attention_heads": 5}, "num_attention_heads"),
    ({"hidden_size": "64"}, "hidden_size"),
])
def test_unrepresentable_config_is_refused_in_one_line(change: dict, key: str):
    with pytest.raises(HFFormatError, match=key) as e:
        from_hf_config({**to_hf_config(small_cfg()), **change})
    assert "\n" not in str(e.value)


def test_missing_and_unexpected_weights_are_named(tmp_path: Path):
    cfg = small_cfg()
    out = export_hf(randomised_model(cfg), cfg, tmp_path / "hf")
    sd = load_file(str(out / "model.safetensors"))
    del sd["model.layers.1.post_attention_layernorm.weight"]
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match="missing weights: model.layers.1.post_attention_layernorm.weight"):
        import_hf(out)
    sd["model.layers.1.post_attention_layernorm.weight"] = torch.ones(cfg.dim)
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(cfg.dim)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match="unexpected weights.*q_proj.bias"):
        import_hf(out)
    del sd["model.layers.0.self_attn.q_proj.bias"]
    sd["model.norm.weight"] = torch.ones(cfg.dim + 1)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match=r"model.norm.weight \(65,\) != \(64,\)"):
        import_hf(out)


def test_export_is_atomic_and_never_overwrites_by_default(tmp_path: Path):
    cfg = small_cfg()
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(HFFormatError, match="not empty"):
        export_hf(randomised_model(cfg), cfg, out)
    assert (out / "keep.txt").read_text() == "precious"
    export_hf(randomised_model(cfg), cfg, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp dirs left behind

    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    import lmforge.interop.hf.io as hf_mod
    orig = hf_mod.save_file
    hf_mod.save_file = boom
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            export_hf(randomised_model(cfg), cfg, tmp_path / "hf2")
    finally:
        hf_mod.save_file = orig
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_not_a_hf_dir_is_a_clear_error(tmp_path: Path):
    with pytest.raises(HFFormatError, match="no config.json"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(small_cfg())))
    with pytest.raises(HFFormatError, match="no model.safetensors"):
        import_hf(tmp_path)

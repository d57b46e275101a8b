"""interop/onnx without running the exporter: the explicit-KV decoder (what is exported) computes
what lmforge's Transformer computes (full and window layers, GQA, q/k/v bias, document masks,
prefill then cached chunks), and the export refuses what it cannot export before doing any work."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.config.model import AttentionConfig, MoEConfig, RopeScalingConfig
from lmforge.interop.onnx.decoder import KVDecoder
from lmforge.interop.onnx.errors import OnnxError
from lmforge.interop.onnx.export import (
    MAX_OPSET,
    MIN_OPSET,
    check_opset,
    export_onnx,
    export_refusal,
    io_names,
    require_export_deps,
)
from lmforge.interop.onnx.runtime import OnnxLM
from lmforge.models.common.sparse_attention import document_starts
from lmforge.models.llama.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 3
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64,
                  qkv_bias=True, attention=AttentionConfig(layers=["window", "full"], window=5))


def _model(cfg: ModelConfig = CFG):
    cfg.validate()
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():  # non-zero q/k/v biases, so the test sees them used
        for layer in model.layers.values():
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                lin.bias.normal_(std=0.1)
    return model


def _tokens() -> torch.Tensor:
    tokens = torch.randint(4, CFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    tokens[0, 7] = tokens[1, 15] = tokens[1, 3] = EOS  # document boundaries inside the rows
    return tokens


def test_decoder_equals_transformer_with_documents_whole_and_in_cached_chunks() -> None:
    model = _model()
    dec = KVDecoder(model)
    tokens = _tokens()
    starts = document_starts(tokens, EOS)
    assert starts[0, 8] == 8 and starts[1, 16] == 16  # the mask has work to do
    with torch.no_grad():
        ref = model(tokens, doc_start=starts)
        whole = dec(tokens, starts, *dec.empty_past(2))
        assert torch.allclose(whole[0], ref, atol=2e-5, rtol=0)
        assert [tuple(t.shape) for t in whole[1:]] == [(2, 2, 24, 16)] * 4
        past, chunks = dec.empty_past(2), []
        for lo, hi in ((0, 10), (10, 11), (11, 16), (16, 17), (17, 24)):  # prefill, steps, chunks
            out = dec(tokens[:, lo:hi], starts[:, lo:hi], *past)
            chunks.append(out[0])
            past = list(out[1:])
        assert torch.allclose(torch.cat(chunks, dim=1), ref, atol=2e-5, rtol=0)
        # one document (zeros): what `generate` runs, plain causal + window
        plain = dec(tokens, torch.zeros_like(tokens), *dec.empty_past(2))[0]
        assert torch.allclose(plain, model(tokens), atol=2e-5, rtol=0)
        assert (plain - ref).abs().max() > 1e-2  # and the document mask did change the logits


def test_window_layers_see_only_their_window_through_the_cache() -> None:
    """A token beyond the window of every window layer, changed, changes nothing in a model of
    window layers only; in a full-attention model it does."""
    for kinds, expect_same in ((["window"], True), (["full"], False)):
        cfg = replace(CFG, n_layers=1, attention=AttentionConfig(layers=kinds, window=5))
        dec = KVDecoder(_model(cfg))
        a = torch.arange(10, 22)[None]
        b = a.clone()
        b[0, 0] = 99
        with torch.no_grad():
            la = dec(a, torch.zeros_like(a), *dec.empty_past(1))[0][:, -1]
            lb = dec(b, torch.zeros_like(b), *dec.empty_past(1))[0][:, -1]
        assert torch.equal(la, lb) == expect_same


def test_refusals_name_the_setting_and_what_is_exported() -> None:
    assert export_refusal(CFG) is None
    moe = replace(CFG, moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32))
    assert "model.moe.n_experts = 4" in export_refusal(moe)
    topk = replace(CFG, attention=AttentionConfig(layers=["full", "topk"]))
    assert "top-k" in export_refusal(topk) and "full and window layers are" in export_refusal(topk)
    dyn = replace(CFG, rope_scaling=RopeScalingConfig(type="dynamic", factor=2.0, original_max_seq_len=32))
    assert "dynamic" in export_refusal(dyn)
    assert export_refusal(replace(dyn, rope_scaling=RopeScalingConfig(type="dynamic", factor=2.0))) is None
    for why in (export_refusal(moe), export_refusal(topk), export_refusal(dyn)):
        assert "\n" not in why
    check_opset(MIN_OPSET)
    check_opset(MAX_OPSET)
    for bad in (MIN_OPSET - 1, MAX_OPSET + 1):
        with pytest.raises(OnnxError, match=rf"--opset {bad}: must be in \[{MIN_OPSET}, {MAX_OPSET}\]"):
            check_opset(bad)


def test_export_refuses_before_writing(tmp_path: Path) -> None:
    cfg = replace(CFG, attention=AttentionConfig(layers=["topk"], window=4, block_size=4))
    with pytest.raises(OnnxError, match="top-k sparse attention"):
        export_onnx(_model(cfg), cfg, tmp_path / "out", source={})
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_io_names_follow_optimum_and_runtime_refuses_a_foreign_dir(tmp_path: Path) -> None:
    ins, outs = io_names(2)
    assert ins == ["input_ids", "doc_start", "past_key_values.0.key", "past_key_values.0.value",
                   "past_key_values.1.key", "past_key_values.1.value"]
    assert outs == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    with pytest.raises(OnnxError, match="onnx_export.json: cannot read"):
        OnnxLM(tmp_path)


def test_missing_export_extra_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    require_export_deps()  # installed here
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # import now raises ImportError
    with pytest.raises(OnnxError, match=r"onnxscript is missing\); install them with: pip install -e '.\[export\]'"):
        require_export_deps()

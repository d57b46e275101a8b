"""Sliding-window Hugging Face families (issue 13): Mistral (`sliding_window`) and Qwen2
(`use_sliding_window`, `sliding_window`, `max_window_layers`) import and export with logits
equal within 1e-5, and HF's window number means what ours means (a query attends to itself and
the w - 1 previous tokens).

Past the window the logits still agree: our "window" attention (model.attention) keeps the same
keys as HF's sliding window."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from transformers.masking_utils import sliding_window_causal_mask_function

from lmforge.interop.hf.base import HFFormatError
from lmforge.interop.hf.exporter import export_hf
from lmforge.interop.hf.importer import import_hf
from lmforge.interop.hf.registry import adapter_for_model, from_hf_config
from lmforge.interop.hf.sliding_window import full_then_window, hf_layer_windows, uniform_window
from lmforge.models.llama import SIZES, build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TOL = 1e-5
WINDOW = 48
MAX_POSITIONS = 128

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-6, rope_theta=10000.0,
              initializer_range=0.05)


def hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """Mistral: window 48 on both layers; Qwen2: layer 0 full, layer 1 window 48 (max_window_layers 1)."""
    torch.manual_seed(seed)
    if family == "mistral":
        cfg = transformers.MistralConfig(**COMMON, sliding_window=WINDOW)
        cls = transformers.MistralForCausalLM
    else:
        cfg = transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
        cls = transformers.Qwen2ForCausalLM
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
            elif name.endswith(".bias"):
                p.normal_(std=0.1)  # HF initialises biases to zero: make them matter
    return model


def tokens(vocab: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))


def max_diff(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(x) - theirs(x).logits).abs().max().item()


def test_hf_window_convention_is_ours():
    """transformers' mask: key k visible to query q iff q - w < k <= q, the query and w - 1 before it."""
    q, k = torch.arange(60)[:, None], torch.arange(60)[None, :]
    for w in (1, 3, 48):
        hf = sliding_window_causal_mask_function(w)(torch.tensor(0), torch.tensor(0), q, k)
        assert torch.equal(hf, (q - k >= 0) & (q - k < w)), w
        assert hf.sum(dim=1).max().item() == w  # w keys at most, the query's own included


def test_window_mapping_reads_both_families():
    m = transformers.MistralConfig(**COMMON, sliding_window=WINDOW).to_dict()
    assert hf_layer_windows(m, 2) == [WINDOW, WINDOW]
    assert hf_layer_windows({**m, "sliding_window": None}, 2) == [0, 0]
    q = transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    assert hf_layer_windows(q.to_dict(), 2) == [0, WINDOW]  # layer_types written by 5.x
    assert hf_layer_windows({k: v for k, v in q.to_dict().items() if k != "layer_types"}, 2) == [0, WINDOW]
    assert hf_layer_windows({**q.to_dict(), "use_sliding_window": False}, 2) == [0, 0]
    assert uniform_window([5, 5]) == 5 and uniform_window([0, 5]) is None
    assert full_then_window([0, 0, 5, 5]) == (2, 5) and full_then_window([0, 0]) == (2, 0)
    assert full_then_window([5, 0]) is None and full_then_window([0, 5, 6]) is None
    for bad in ({**m, "sliding_window": 0}, {**m, "sliding_window": "48"}):
        with pytest.raises(HFFormatError, match="sliding_window") as e:
            from_hf_config(bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_model_imports_and_exports_within_the_window(tmp_path: Path, family: str):
    """Up to the window, full attention and the window agree: exact whether or not ours has it."""
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = import_hf(tmp_path / "hf")
    assert cfg.qkv_bias is (family == "qwen2")
    x = tokens(cfg.vocab_size, WINDOW - 8)
    imported = max_diff(model, hf, x)
    print(f"{family}: import (seq {x.shape[1]} <= window) max |logits diff| = {imported:.2e}")
    assert imported <= TOL
    out = export_hf(model, cfg, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    exported = max_diff(model, back, x)
    print(f"{family}: export ({type(back).__name__}) max |logits diff| = {exported:.2e}")
    assert exported <= TOL
    assert cfg.attention.window == WINDOW and cfg.max_seq_len == MAX_POSITIONS


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_model_imports_and_exports_past_the_window(tmp_path: Path, family: str):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = import_hf(tmp_path / "hf")
    assert cfg.max_seq_len == MAX_POSITIONS
    x = tokens(cfg.vocab_size, 2 * WINDOW)
    assert max_diff(model, hf, x) <= TOL
    out = export_hf(model, cfg, tmp_path / "export")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == family and written["sliding_window"] == WINDOW
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert max_diff(model, back, x) <= TOL
    # Without the window the same weights are far off past it: the comparison can fail.
    no_window = ({"sliding_window": None} if family == "mistral" else
                 {"use_sliding_window": False, "layer_types": ["full_attention"] * cfg.n_layers})
    full = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", **no_window).eval()
    assert max_diff(model, full, x) > 1e-3


def test_qwen2_without_window_and_biased_models_export_as_qwen2(tmp_path: Path):
    """Qwen2 with use_sliding_window false is a biased Llama; our biased dense model exports as
    Qwen2 (Llama has no q/k/v bias), logits equal at any length."""
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen2Config(**COMMON, use_sliding_window=False, sliding_window=WINDOW)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = import_hf(tmp_path / "hf")
    assert cfg.max_seq_len == MAX_POSITIONS and cfg.qkv_bias
    x = tokens(cfg.vocab_size, 2 * WINDOW)
    assert max_diff(model, hf, x) <= TOL

    ours_cfg = replace(SIZES["debug"], max_seq_len=64, qkv_bias=True)
    ours = build_model(ours_cfg, seed=0).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    assert adapter_for_model(ours_cfg).display_name == "Qwen2"
    out = export_hf(ours, ours_cfg, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    assert max_diff(ours, back, tokens(ours_cfg.vocab_size, 40)) <= TOL

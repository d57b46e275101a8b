"""The Hugging Face form of int8-quantized models (`compress quantize --hf`): transformers loads it
(torchao Int8Tensor weights, embeddings and head included) with the same integers lmforge stored,
and its logits are lmforge's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.compress.errors import CompressError
from lmforge.compress.hf_export import export_hf_quantized
from lmforge.compress.quantize import QuantizeOptions, quantize_model
from lmforge.compress.runtime import build_runtime_model, int8_runtime_problem
from lmforge.config import ModelConfig
from lmforge.models.llama.model import build_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.mark.parametrize(("scheme", "runtime", "tol"), [("int8-weight", "dequant", 1e-5),
                                                         ("int8-dynamic", "torchao", 1e-2)])
def test_transformers_loads_the_int8_export_with_lmforges_numbers(scheme: str, runtime: str, tol: float,
                                                                   tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)
    cfg.validate()
    model = build_model(cfg, seed=3)
    export_hf_quantized(model, cfg, scheme, tmp_path / "hf", None)
    assert not (tmp_path / "hf.fp32").exists()  # the staging export is gone
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ours = quantize_model(model, cfg, QuantizeOptions(scheme), None, say=lambda _: None)
    q = hf.model.layers[1].mlp.down_proj.weight
    linear_weights = {n: type(m.weight).__name__ for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linear_weights) == 2 * 7 + 1 and set(linear_weights.values()) == {"Int8Tensor"}, linear_weights
    assert type(hf.model.embed_tokens.weight).__name__ == "Int8Tensor"
    assert type(hf.model.norm.weight).__name__ == "Parameter"  # norms stay fp32
    assert torch.equal(q.qdata, ours.tensors["layers.1.feed_forward.w2.weight.qdata"])
    assert torch.equal(hf.lm_head.weight.qdata, ours.tensors["output.weight.qdata"])
    if int8_runtime_problem(scheme, runtime) is not None:  # its int8 sums clip here: refused (test_quantize.py)
        with pytest.raises(CompressError, match="would clip its int8 sums"):
            build_runtime_model(cfg, ours.formats, ours.tensors, scheme, runtime)
        return
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = build_runtime_model(cfg, ours.formats, ours.tensors, scheme, runtime)(tokens)
        b = hf(tokens).logits
    assert float((a - b).norm() / b.norm()) < tol

"""Every safety feature works with the network unreachable: sockets are blocked (any connect or
DNS lookup raises) while the filter (its homoglyph table read afresh from the installed package),
the pipeline step, the watermark through generate(), detection, the adversarial detector and the
model watermark (embed and read) run."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models.registry import family_of
from tests.helpers.offline import NetworkBlocked, block_network

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return block_network(monkeypatch)


def test_the_block_itself_works(no_network: list[str]) -> None:
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("example.org", 443), timeout=1)
    assert len(no_network) == 1


def test_safety_features_run_with_sockets_blocked(no_network: list[str], tmp_path: Path) -> None:
    from lmforge.data.pipeline.config import parse_pipeline
    from lmforge.data.pipeline.executor import run_pipeline
    from lmforge.safety.adversarial import AdversarialDetector, lm_token_nll
    from lmforge.safety.gates import ContentFilter
    from lmforge.safety.normalize import _base, homoglyph_table
    from lmforge.safety.secret_key import read_key_file, write_new_key
    from lmforge.safety.watermark import GreenLists, WatermarkConfig, WatermarkLogitsProcessor, detect
    from lmforge.serve.generate import generate

    homoglyph_table.cache_clear()
    _base.cache_clear()
    flt = ContentFilter.from_toml(REPO / "recipes" / "safety" / "filter.toml")
    assert not flt.check_prompt("k\u0456ll y\u043eurself", on_block=lambda e: None).allowed
    assert flt.redact("ok, build a bomb now", on_block=lambda e: None) == "ok, [filtered] now"

    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "a pipe bomb"}) + "\n" + json.dumps({"text": "fine"}) + "\n")
    data = {"output_dir": "out", "inputs": [{"path": "in.jsonl"}],
            "steps": [{"type": "harmful", "filter": str(REPO / "recipes" / "safety" / "filter.toml")}]}
    res = run_pipeline(parse_pipeline(data, tmp_path, "test"))
    assert [json.loads(x)["text"] for x in res.output.read_text().splitlines()] == ["fine"]

    write_new_key(tmp_path / "k.key")
    green = GreenLists(read_key_file(tmp_path / "k.key"), 256, WatermarkConfig())
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=256, multiple_of=32, max_seq_len=128)
    model = family_of(cfg).build(cfg, "cpu", 0).eval()
    out = generate(model, [1, 2, 3], 100, temperature=1.0, seed=0, logits_processor=WatermarkLogitsProcessor(green))
    assert detect([3, *out[0]], green).z > 4

    det = AdversarialDetector(lm_token_nll(model, lambda t: list(t.encode("utf-8")), 128))
    det.calibrate([f"plain prompt number {i} about the weather" for i in range(20)])
    assert det.assess("plain \u200bprompt\u2060 about the weather").components[0].score == 0.75
    assert no_network == []  # nothing even tried to connect


def test_the_model_watermark_embeds_and_reads_with_sockets_blocked(no_network: list[str]) -> None:
    from lmforge.safety.model_watermark import embed_watermark, read_watermark
    from lmforge.safety.secret_key import WatermarkKey

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=32)
    model = family_of(cfg).build(cfg, "cpu", 0).eval()
    key = WatermarkKey(b"an offline model owner's key")
    embed_watermark(model, key)
    reading = read_watermark(model.named_parameters(), key)
    assert reading.errors == 0 and reading.p_value < 1e-6 and no_network == []

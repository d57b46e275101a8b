"""MFU under document masking counts the attended pairs of the documents actually trained: the
per-batch count equals a brute-force count of the materialised mask, one-document batches give
the closed-form per-token count, and a trained run's logged MFU uses the exact count."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmforge.config import load_job_config, parse_override_args
from lmforge.config.model import AttentionConfig
from lmforge.models.common.sparse_attention import AttnSpec, dense_mask, document_starts
from lmforge.models.llama import SIZES
from lmforge.observability.flops import attended_pairs, flops_breakdown, training_flops_per_token
from lmforge.observability.step_flops import StepFlops, document_masked_pairs
from lmforge.train.trainer import Trainer
from tests.helpers.cli import read_metrics, tiny_run_args

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
N = 45


def packed(b: int, n: int, seed: int, vocab: int = 6) -> torch.Tensor:
    """Token ids with end-of-text (0) every `vocab` tokens on average."""
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("w", [None, 1, 7, 8, 100])
def test_document_masked_pairs_equal_the_mask(w: int | None):
    ds = document_starts(packed(3, N, seed=1), 0)
    spec = AttnSpec("full") if w is None else AttnSpec("window", w)
    q = torch.zeros(3, 1, N, 4)
    assert document_masked_pairs(ds, w) == int(dense_mask(spec, q, q, ds).sum())


TOPK_SPECS = [AttnSpec("topk", 6, 2, 4), AttnSpec("topk", 4, 3, 4), AttnSpec("topk", 5, 8, 4),
              AttnSpec("topk", 3, 1, 8), AttnSpec("topk", 1, 2, 4)]


@pytest.mark.parametrize("spec", TOPK_SPECS, ids=lambda s: f"w{s.window}-k{s.topk}-B{s.block}")
@pytest.mark.parametrize("doc_every", [6, 20, 60])
def test_topk_pairs_with_documents_equal_the_mask_whichever_blocks_win(spec: AttnSpec, doc_every: int):
    """Top-k with documents: the count from the document starts equals the materialised mask of
    random queries and keys, for every KV head (each chose its own blocks), and is below the
    one-document count."""
    n, b = 130, 3
    ds = document_starts(packed(b, n, seed=doc_every, vocab=doc_every), 0)
    g = torch.Generator().manual_seed(doc_every)
    q, k = torch.randn(b, 4, n, 8, generator=g), torch.randn(b, 2, n, 8, generator=g)
    mask = dense_mask(spec, q, k, ds)  # (b, 2 kv heads, n, n)
    per_head = mask.sum(dim=(2, 3))
    for row in range(b):
        starts = sorted(set(ds[row].tolist())) + [n]
        lengths = [e - s for s, e in zip(starts, starts[1:])]
        expected = attended_pairs("topk", n, spec.window, spec.block, spec.topk, doc_lengths=lengths)
        assert per_head[row].tolist() == [expected, expected]
        assert expected < attended_pairs("topk", n, spec.window, spec.block, spec.topk)
    cfg = replace(SIZES["debug"], max_seq_len=n, n_heads=4, n_kv_heads=2, attention=AttentionConfig(
        layers=["topk"], window=spec.window, topk=spec.topk, block_size=spec.block))
    counter = StepFlops(cfg, n)
    counter.add(ds)
    per_pair = 3 * 2 * 2 * cfg.n_heads * cfg.head_dim
    attention = flops_breakdown(cfg, n)["attention_scores_and_values"]
    others = 3 * (flops_breakdown(cfg, n)["forward"] - attention) * b * n
    assert counter.take(None, torch.device("cpu")) == pytest.approx(others + cfg.n_layers * per_pair * int(per_head[:, 0].sum()),
                                                                    rel=1e-12)


LAYERS = {"full": ["full"], "window": ["window"], "mixed": ["window", "full"], "with-topk": ["topk", "full"]}


def cfg_of(layers: list[str]):
    return replace(SIZES["debug"], max_seq_len=64,
                   attention=AttentionConfig(layers=layers, window=6, topk=2, block_size=4))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_one_document_per_sequence_gives_the_per_token_count(name: str):
    cfg = cfg_of(LAYERS[name])
    counter = StepFlops(cfg, N)
    counter.add(torch.zeros(2, N, dtype=torch.long))
    assert counter.take(None, torch.device("cpu")) == pytest.approx(training_flops_per_token(cfg, N) * 2 * N, rel=1e-12)
    assert counter.take(None, torch.device("cpu")) == 0.0  # taken: starts over


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_documents_counted_per_document(name: str):
    cfg = cfg_of(LAYERS[name])
    toks = packed(2, N, seed=5)
    ds = document_starts(toks, 0)
    counter = StepFlops(cfg, N)
    counter.add(ds)
    per_pair = 3 * 2 * 2 * cfg.n_heads * cfg.head_dim
    b = flops_breakdown(cfg, N)
    expected = 0.0
    for row in ds.tolist():  # each sequence from its document lengths (flops.attended_pairs)
        starts = sorted(set(row)) + [N]
        lengths = [e - s for s, e in zip(starts, starts[1:])]
        expected += 3 * (b["forward"] - b["attention_scores_and_values"]) * N
        for i in range(cfg.n_layers):
            kind = cfg.attention.kind(i)
            expected += per_pair * attended_pairs(kind, N, 6, 4, 2, doc_lengths=lengths)
    assert counter.take(None, torch.device("cpu")) == pytest.approx(expected, rel=1e-12)
    assert expected < training_flops_per_token(cfg, N) * 2 * N  # documents strictly cut the attended pairs


def test_trained_run_logs_mfu_from_the_documents(tmp_path: Path) -> None:
    """tokens/s x FLOPs per token / peak = MFU: the FLOPs per token the run divided by lie below the
    one-document count (short documents, several per sequence) and above the count without attention."""
    import json
    import random

    rng = random.Random(0)
    words = "the king of france and his men went up the hill and came down again".split()
    corpus = tmp_path / "short.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(3, 12)))}) + "\n"
                              for _ in range(400)))
    peak = 1e11
    args = tiny_run_args(tmp_path / "data", tmp_path / "run", "--data.corpus", str(corpus), "--train.steps", "4",
                         "--metrics.log_interval", "2", "--train.eval_interval", "0", "--checkpoint.enabled", "false")
    args[args.index("--data.max_documents") + 1] = "400"
    cfg = load_job_config(None, parse_override_args(args))
    trainer = Trainer(cfg, echo=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2
    s = cfg.train.seq_len
    upper = training_flops_per_token(cfg.model, s)
    b = flops_breakdown(cfg.model, s)
    lower = 3 * (b["forward"] - b["attention_scores_and_values"])
    for r in rows:
        per_token = r["mfu"] * peak / r["tokens_per_s"]
        assert lower < per_token < upper * (1 - 1e-4), (per_token, lower, upper)

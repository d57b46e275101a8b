"""The cloze task of `lmforge eval` (lmforge/eval/cloze.py): its items are built from held-out text
only, the same every time, with the true line among distinct distractors of the same domain; a
model that memorised the held-out text scores 100% through the real scoring path; per-token
negative log-likelihood equals torch's cross-entropy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.eval.cloze import ClozeItem, build_items, model_scorer, score_items, segments
from lmforge.eval.heldout import open_heldout
from lmforge.eval.scoring import token_nll
from lmforge.models.registry import family_of

pytestmark = pytest.mark.usefixtures("one_thread")


def _texts(text: str) -> list[str]:
    return [text[a:b] for a, b in segments(text)]


def test_segments_are_lines_and_sentences_with_numbers_left_in_the_context() -> None:
    text = "Genesis 2\n\n1 Thus the heavens were finished.\n  2 And on the seventh day God ended his work.  \n\n"
    assert _texts(text) == ["Genesis 2", "Thus the heavens were finished.", "And on the seventh day God ended his work."]
    assert _texts("第一句话。“第二句！”\n第三句") == ["第一句话。", "“第二句！”", "第三句"]
    assert _texts("12 \n\n") == ["12"]  # a bare number is a line, not a prefix of one


@pytest.fixture(scope="module")
def heldout_docs(tiny_data_dir: Path) -> list[tuple[str, str]]:
    held = open_heldout(tiny_data_dir)
    assert held.labelled
    return list(zip(held.domains, held.texts))


def test_items_come_from_held_out_text_and_are_fixed(heldout_docs: list[tuple[str, str]]) -> None:
    items = build_items(heldout_docs, 60)
    assert len(items) == 60 and items == build_items(heldout_docs, 60)
    assert build_items(heldout_docs, 60, seed=1) != items
    by_domain = {}
    for item in items:
        domain, text = heldout_docs[item.document]
        assert item.domain == domain
        true = item.choices[item.answer]
        a, b = segments(text)[item.segment]
        assert text[a:b] == true and text[:a].endswith(item.context)  # the true line follows its context
        assert len(set(item.choices)) == len(item.choices) == 4
        for c in item.choices:
            assert c == true or not (c.startswith(true) or true.startswith(c))
            # every distractor is a line of a held-out document of the same domain
            assert any(c in t for d, t in heldout_docs if d == domain)
        by_domain[item.domain] = by_domain.get(item.domain, 0) + 1
    assert set(by_domain) == {d for d, _ in heldout_docs}  # the domains take turns
    assert max(by_domain.values()) - min(by_domain.values()) <= 1
    answers = [i.answer for i in items]
    assert len(set(answers)) == 4  # the answer's position is drawn, not always the same


def test_scoring_counts_what_the_scorer_prefers(heldout_docs: list[tuple[str, str]]) -> None:
    items = build_items(heldout_docs, 40)
    oracle = score_items(items, lambda it: [(0.0 if j == it.answer else -1.0, 1) for j in range(len(it.choices))])
    assert oracle["accuracy"] == oracle["accuracy_norm"] == 1.0 and oracle["items"] == 40
    assert oracle["chance"] == 0.25 and sum(d["items"] for d in oracle["domains"].values()) == 40
    assert oracle["accuracy_stderr"] == oracle["accuracy_norm_stderr"] == 0.0  # no spread: every item right
    first = score_items(items, lambda it: [(-float(j), 1) for j in range(len(it.choices))])
    p = sum(i.answer == 0 for i in items) / 40
    assert first["accuracy"] == p and 0 < p < 1
    assert first["accuracy_stderr"] == pytest.approx((p * (1 - p) / 40) ** 0.5)  # binomial standard error
    # unnormalised: total log-likelihood; normalised: per token (a long candidate with a better mean wins)
    long_item = ClozeItem("d", 0, 0, "ctx", ("a", "b"), 1)
    r = score_items([long_item], lambda it: [(-2.0, 1), (-3.0, 6)])
    assert r["accuracy"] == 0.0 and r["accuracy_norm"] == 1.0


class Memoriser(nn.Module):
    """A language model that memorised sequences: after a prefix it has seen, the token that
    followed gets logit +30; after any other prefix every token is equally likely."""

    def __init__(self, sequences: list[list[int]], vocab: int):
        super().__init__()
        self.vocab = vocab
        self.next = {tuple(s[:t]): s[t] for s in sequences for t in range(1, len(s))}
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*tokens.shape, self.vocab)
        for b, row in enumerate(tokens.tolist()):
            for t in range(len(row)):
                nxt = self.next.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return logits


def test_a_model_that_memorised_the_held_out_text_scores_100_percent(tiny_data_dir: Path,
                                                                     heldout_docs: list[tuple[str, str]]) -> None:
    tok = TextTokenizer.from_file(tiny_data_dir / "tokenizer.json")
    items = build_items(heldout_docs, 24)
    max_seq_len = 4096  # nothing cut: the memoriser's sequences are exactly the scored rows
    model = Memoriser([tok.encode(i.context) + tok.encode(i.choices[i.answer]) for i in items], tok.vocab_size)
    r = score_items(items, model_scorer(model, tok.encode, max_seq_len, torch.device("cpu")))
    assert r["accuracy"] == r["accuracy_norm"] == 1.0
    # and one that memorised other text does not
    other = Memoriser([tok.encode(i.context) + tok.encode(i.choices[(i.answer + 1) % 4]) for i in items], tok.vocab_size)
    assert score_items(items, model_scorer(other, tok.encode, max_seq_len, torch.device("cpu")))["accuracy"] == 0.0


def test_a_candidates_score_is_its_log_likelihood_after_the_context() -> None:
    """The batched, padded scoring equals each candidate's log-probabilities read off a forward of
    context + candidate alone, at the candidate's positions (no off-by-one, padding changes nothing)."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=48)
    model = family_of(cfg).build(cfg, "cpu", 0).eval()
    encode = lambda text: [ord(c) % 64 for c in text]  # noqa: E731 (a toy tokenizer: one id a character)
    item = ClozeItem("d", 0, 3, "To be, or not", ("to be", "that is the question", "a"), 0)
    got = model_scorer(model, encode, cfg.max_seq_len, torch.device("cpu"))(item)
    for (score, n), cand in zip(got, item.choices):
        ids = torch.tensor([encode(item.context) + encode(cand)])
        with torch.no_grad():
            logp = model(ids[:, :-1]).log_softmax(-1).gather(-1, ids[:, 1:, None])[0, :, 0]
        assert n == len(cand)
        assert score == pytest.approx(float(logp[-len(cand):].sum()), rel=1e-5)


def test_token_nll_is_cross_entropy_per_token() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").reshape(3, 7)
    torch.testing.assert_close(token_nll(logits, targets), want)
    torch.testing.assert_close(token_nll(logits.bfloat16(), targets),
                               F.cross_entropy(logits.bfloat16().float().flatten(0, 1), targets.flatten(),
                                               reduction="none").reshape(3, 7))


def _skewed_docs(n_docs: int = 60, lines: int = 40, seed: int = 0) -> list[tuple[str, str]]:
    """Documents of distinct lines whose lengths follow a long-tailed law (most lines short, a few
    long), as verse and prose lines do: where a length-biased item builder shows."""
    rng = np.random.default_rng(seed)
    words = [f"w{k}" for k in range(5000)]
    docs = []
    for _ in range(n_docs):
        n_words = np.clip(rng.lognormal(1.6, 0.6, size=lines).astype(int), 3, 40)
        docs.append(("d", "\n".join(" ".join(rng.choice(words, size=n)) + "." for n in n_words)))
    return docs


def test_the_true_lines_length_gives_nothing_away() -> None:
    """A scorer that reads only the candidates' lengths scores chance. Distractors of similar length
    drawn around the true line would leave it in the middle of the lengths: "longest" and "shortest"
    (what total log-likelihood favours) would win less often than chance, "a middle one" more often.
    The builder draws distractors from a window of the length-sorted pool whose place around the
    true line is itself drawn, so all candidates are alike in length."""
    items = build_items(_skewed_docs(), 1600)
    assert len(items) == 1600
    for name, pick in (("shortest", min), ("longest", max)):
        hits = np.mean([pick(range(4), key=lambda k, i=i: (len(i.choices[k]), k)) == i.answer for i in items])
        assert abs(hits - 0.25) < 0.035, (name, hits)  # 3.2 binomial standard deviations
    # and the distractors stay close in length: within a factor 1.5 of the true line for most items
    ratios = [len(c) / len(i.choices[i.answer]) for i in items for k, c in enumerate(i.choices) if k != i.answer]
    assert np.mean([2 / 3 <= r <= 3 / 2 for r in ratios]) > 0.9

"""The adversarial-prompt detector (lmforge/safety/adversarial.py): each component on its own, the
perplexity statistics, calibration, logging, and the AUROC on a small generated attack set
(lmforge/safety/attacks.py; bench/adversarial.py measures it on the main job's model)."""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from lmforge.safety.adversarial import (
    AdversarialDetector,
    invisible_component,
    perplexity_stats,
    perturbation_component,
    suffix_component,
)
from lmforge.safety.attacks import ATTACK_KINDS, auroc, gcg_suffix, make_attack
from lmforge.safety.errors import SafetyError

PLAIN = "The committee will meet on Tuesday to review the budget and the plans for next year."


def test_invisible_counts_hidden_characters_but_not_emoji_sequences() -> None:
    assert invisible_component(PLAIN).score == 0
    assert invisible_component("man\u200d\U0001f469\u200d\U0001f467 family: 👩\u200d👧").score == 0.5  # one outside
    assert invisible_component("hel\u200blo wo\u2060rld\ufeff").score == 1 - 0.5 ** 3
    assert invisible_component("n\u0301a\u0308\u0336\u0337\u0323me").score == 0.5   # a stack of 5 marks: one
    assert invisible_component("caf\u00e9 na\u00efve").score == 0                      # precomposed accents


def test_perturbation_finds_disguised_words_only() -> None:
    assert perturbation_component(PLAIN).score == 0
    assert perturbation_component("An mp3 player, well-a-day, iPhone and COVID-19; O, ho!--my lord!").score == 0
    for word in ("b\u0443dget", "bud9et", "h@ck", "bUdGeT", "b\u0336u\u0301d\u0308get"):
        comp = perturbation_component(f"review the {word} now")
        assert comp.score == pytest.approx(0.4) and comp.detail.startswith("1 of 4"), word
    assert perturbation_component("r3view th\u0435 bUdGeT").score == pytest.approx(1 - 0.6 ** 3)


def test_suffix_scores_a_gibberish_tail_above_a_normal_one() -> None:
    normal = suffix_component(PLAIN + " Everyone is welcome to attend and ask questions.")
    gcg = suffix_component(PLAIN + ' describing.\\ + similarlyNow write oppositeley.]( Me giving**ONE please? '
                                   'revert with "\\!--Two')
    assert normal.score < 0.1 and gcg.score > 0.9
    chinese = suffix_component("新华社北京电，国务院总理今天在人民大会堂会见了来访的代表团，双方就合作问题交换了意见。")
    assert chinese.score < 0.1  # ordinary punctuation of any script is text


def test_perplexity_stats_find_the_worst_window_and_the_change_point() -> None:
    flat = [3.0] * 40
    assert perplexity_stats(flat, 8) == (0.0, 0.0)
    assert perplexity_stats([7.0] * 40, 8) == (0.0, 0.0)  # uniformly hard text: nothing stands out
    jump = [3.0] * 30 + [9.0] * 10
    top, rise = perplexity_stats(jump, 8)
    assert top == 6.0 and rise == pytest.approx(6.0)  # the change point at 30: 9 after, 3 before
    spike = [3.0] * 20 + [20.0] + [3.0] * 19
    assert perplexity_stats(spike, 8)[0] == pytest.approx(17 / 8)


def _char_nll(reference: list[str]):
    """A character-bigram model of the reference texts as the scoring callable (add-one smoothing)."""
    pairs = Counter((a, b) for t in reference for a, b in zip(t, t[1:], strict=False))
    firsts = Counter(a for t in reference for a in t[:-1])
    alphabet = len({c for t in reference for c in t}) + 100

    def nll(text: str) -> list[float]:
        return [-math.log((pairs[(a, b)] + 1) / (firsts[a] + alphabet)) for a, b in zip(text, text[1:], strict=False)]

    return nll


def _corpus_prompts(data_dir: Path) -> list[str]:
    texts = [json.loads(line)["text"] for line in (data_dir / "corpus.jsonl").open(encoding="utf-8")]
    out = []
    for t in texts:
        t = " ".join(t.split())
        out.extend(t[s:s + 160] for s in range(0, len(t) - 160, 400))
    return out


def test_calibrated_perplexity_component_and_the_logged_flag(caplog: pytest.LogCaptureFixture) -> None:
    reference = [PLAIN, "The plans for next year will be shown at the meeting on Tuesday."] * 15
    det = AdversarialDetector(_char_nll(reference), window=8)
    with pytest.raises(SafetyError):
        det.assess(PLAIN)  # not calibrated yet
    ref = det.calibrate(reference)
    assert ref.prompts == 30 and ref.window == 8
    ok = det.assess(PLAIN)
    assert not ok.flagged and {c.name for c in ok.components} == {"invisible", "perturbation", "suffix", "perplexity"}
    with caplog.at_level(logging.WARNING, logger="lmforge.safety"):
        bad = det.check(PLAIN + " zq xj vk qz jx")
    assert bad.flagged and bad.reason.startswith("perplexity")
    assert "adversarial prompt flagged" in caplog.text and "zq xj" not in caplog.text  # never the text


def test_auroc_on_a_small_generated_attack_set(tiny_data_dir: Path) -> None:
    prompts = _corpus_prompts(tiny_data_dir)
    rng = random.Random(0)
    rng.shuffle(prompts)
    calib, benign, bases, training = prompts[:40], prompts[40:100], prompts[100:160], prompts[160:]
    assert len(bases) == 60 and len(training) > 300  # the "model": a character bigram LM of the rest
    words = " ".join(calib).split()

    def suffix(r: random.Random) -> str:  # random "tokens": pieces of reference words, as a BPE vocabulary
        return gcg_suffix(lambda ids: "".join(words[i][: 1 + i % 4] for i in ids), len(words), r, 20)

    attacks = [(k, make_attack(k, bases[i], rng, suffix)) for i, k in enumerate(ATTACK_KINDS * 15)]
    assert all(t != bases[i] for i, (_, t) in enumerate(attacks))
    det = AdversarialDetector(_char_nll(training))
    det.calibrate(calib)
    b = [det.assess(t).score for t in benign]
    a = [det.assess(t).score for _, t in attacks]
    assert auroc(a, b) >= 0.95
    assert sum(s >= 0.5 for s in b) / len(b) <= 0.05
    assert auroc([1.0, 2.0], [0.0, 0.5]) == 1.0 and auroc([1.0], [1.0]) == 0.5


def test_lm_token_nll_feeds_the_ids_to_the_models_device() -> None:
    """A served model may sit on CUDA: the token ids go where the model's weights are, not to the
    default device (set to meta here, with the model on CPU, so ids left there would fail)."""
    import torch

    from lmforge.config import ModelConfig
    from lmforge.models.llama import build_model
    from lmforge.safety.adversarial import lm_token_nll

    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=256, multiple_of=32, max_seq_len=64)
    model = build_model(cfg, "cpu", seed=0).eval()
    ids = list(PLAIN.encode("utf-8"))[:20]
    nll = lm_token_nll(model, lambda t: list(t.encode("utf-8")), 64)
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).float()[0]
    expected = (torch.logsumexp(logits, -1) - logits.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)).tolist()
    with torch.device("meta"):
        got = nll(PLAIN[:20])
    assert len(got) == 19 and got == pytest.approx(expected, rel=1e-5)

"""The green-list watermark (lmforge/safety/watermark.py, watermark_robustness.py, secret_key.py)
and generate()'s logits_processor hook."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models.registry import family_of
from lmforge.safety.errors import SafetyError
from lmforge.safety.secret_key import WatermarkKey, read_key_file, write_new_key
from lmforge.safety.watermark import (
    GreenLists,
    WatermarkConfig,
    WatermarkLogitsProcessor,
    detect,
    one_sided_p,
)
from lmforge.safety.watermark_robustness import attack_tokens, robustness_curve
from lmforge.serve.generate import generate

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 512
KEY = WatermarkKey(b"a test key that is long enough")


def _green(gamma: float = 0.25, width: int = 1, key: WatermarkKey = KEY) -> GreenLists:
    return GreenLists(key, VOCAB, WatermarkConfig(gamma, 2.0, width))


def test_green_lists_are_exactly_gamma_of_the_vocabulary_keyed_and_stable() -> None:
    g = _green()
    masks = [g.mask([t]) for t in range(20)]
    assert all(m.sum() == int(0.25 * VOCAB) for m in masks)
    assert len({m.tobytes() for m in masks}) == 20                # each context its own list
    assert np.array_equal(_green().mask([7]), masks[7])           # a fresh object: the same list
    other = _green(key=WatermarkKey(b"another key, also long enough")).mask([7])
    assert 0.1 < (other & masks[7]).sum() / masks[7].sum() < 0.4  # another key: overlap ~ gamma
    assert all(g.is_green([7], t) == masks[7][t] for t in range(VOCAB))
    # the green list is a pure function of (key, context): pinned so a library change cannot move it
    assert np.flatnonzero(masks[3])[:6].tolist() == [2, 4, 5, 9, 19, 28]
    g2 = _green(width=2)
    assert np.array_equal(g2.mask([1, 2]), g2.mask([9, 1, 2])) and not np.array_equal(g2.mask([1, 2]), g2.mask([3, 2]))


def test_the_processor_adds_delta_to_the_green_logits_of_each_row() -> None:
    g = _green()
    logits = torch.zeros(2, VOCAB + 8)  # a model vocabulary padded past the tokenizer's
    out = WatermarkLogitsProcessor(g)(torch.tensor([[5, 11], [5, 12]]), logits)
    assert torch.equal(out[0, :VOCAB] == 2.0, torch.from_numpy(g.mask([11])))
    assert torch.equal(out[1, :VOCAB] == 2.0, torch.from_numpy(g.mask([12])))
    assert torch.all(out[:, VOCAB:] == 0)


def _sample(g: GreenLists, n: int, rng: random.Random, delta: float) -> list[int]:
    """Tokens from a uniform 'model' with the watermark's bias: a maximal-entropy language."""
    ids = [rng.randrange(VOCAB)]
    w = np.exp(delta * g.mask([0]).astype(float))
    for _ in range(n):
        w = np.exp(delta * g.mask(ids[-1:]).astype(float))
        ids.append(rng.choices(range(VOCAB), weights=w.tolist())[0])
    return ids


def test_detection_z_and_p_on_marked_and_unmarked_text() -> None:
    g, rng = _green(), random.Random(0)
    marked = [detect(_sample(g, 200, rng, 2.0), g) for _ in range(10)]
    # expected green share at delta 2, gamma 0.25, uniform model: 0.25 e^2 / (1 + 0.25 (e^2 - 1)) = 0.711
    assert all(d.z > 9 and d.p_value < 1e-18 for d in marked)
    assert abs(sum(d.green for d in marked) / sum(d.scored for d in marked) - 0.711) < 0.04
    plain = [detect([rng.randrange(VOCAB) for _ in range(200)], g).z for _ in range(1000)]
    assert sum(z > 4 for z in plain) == 0
    assert abs(np.mean(plain)) < 0.12 and abs(np.std(plain) - 1) < 0.1  # z is standard normal without the key
    assert one_sided_p(0.0) == 0.5 and abs(one_sided_p(4.0) - 3.167e-5) < 1e-7


def test_repeated_context_token_pairs_are_scored_once() -> None:
    g = _green()
    green_tok = int(np.flatnonzero(g.mask([3]))[0])
    d = detect([3, green_tok] * 50, g)
    assert d.scored == 2 and d.tokens == 100  # (3, tok) and (tok, 3): each once
    assert detect([3, green_tok] * 50, g, ignore_repeated=False).scored == 99


def test_robustness_curve_falls_with_the_edit_rate_and_is_seeded() -> None:
    g, rng = _green(), random.Random(1)
    seqs = [_sample(g, 200, rng, 2.0) for _ in range(12)]
    rows = robustness_curve(seqs, g, [0.0, 0.3, 0.9], z_threshold=4.0)
    by = {(r.attack, r.rate): r for r in rows}
    assert by[("substitute", 0.0)].detection_rate == 1.0 and by[("substitute", 0.9)].detection_rate == 0.0
    assert by[("substitute", 0.0)].mean_z > by[("substitute", 0.3)].mean_z > by[("substitute", 0.9)].mean_z
    assert by[("delete", 0.3)].detection_rate == 1.0  # deletion keeps most (context, token) pairs intact
    assert [r.as_json() for r in rows] == [r.as_json() for r in robustness_curve(seqs, g, [0.0, 0.3, 0.9])]
    ids = list(range(100))
    assert len(attack_tokens(ids, "delete", 0.5, VOCAB, random.Random(0))) < 70
    assert len(attack_tokens(ids, "substitute", 0.5, VOCAB, random.Random(0))) == 100


def test_generate_applies_the_processor_in_both_paths() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32, max_seq_len=128)
    model = family_of(cfg).build(cfg, "cpu", 0).eval()
    g = _green()
    seen: list[int] = []

    def counting(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        seen.append(tokens.shape[1])
        return WatermarkLogitsProcessor(g)(tokens, logits)

    prompt = [[1, 2, 3, 4], [5, 6, 7, 8]]
    cached = generate(model, prompt, 40, temperature=1.0, seed=3, logits_processor=counting)
    assert seen == list(range(4, 44))  # the tokens so far, prompt included, before each sampling step
    plain = generate(model, prompt, 40, temperature=1.0, seed=3, use_cache=False, logits_processor=counting)
    assert cached == plain
    base = generate(model, prompt, 40, temperature=1.0, seed=3)
    assert base != cached
    zs = [detect(p + o, g).z for p, o in zip(prompt, cached, strict=True)]
    assert all(z > 4 for z in zs), zs


def test_the_key_is_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "wm.key"
    write_new_key(path)
    secret = path.read_text().strip()
    assert len(secret) == 64 and (path.stat().st_mode & 0o777) == 0o600
    key = read_key_file(path)
    assert secret not in repr(key) and secret not in str(key) and repr(key) == "WatermarkKey(<secret>)"
    (tmp_path / "short.key").write_text("tooshort\n")
    with pytest.raises(SafetyError) as e:
        read_key_file(tmp_path / "short.key")
    assert "tooshort" not in str(e.value) and "short.key: 8 bytes; need at least 16" in str(e.value)
    for bad in (WatermarkConfig(gamma=1.0), WatermarkConfig(delta=float("nan")), WatermarkConfig(context_width=0)):
        with pytest.raises(SafetyError):
            bad.validate()

"""A detector of crafted prompts in front of the model: a score in [0, 1] and a threshold.

Four components, each a score in [0, 1] with a one-line detail; the prompt's score is the
strongest component's (so each flag has one stated reason), flagged at `threshold`:

- `invisible`: characters a reader cannot see: format characters (zero-width space and joiners
  outside emoji sequences, word joiner, soft hyphen, BOM, bidi controls, tag characters),
  variation selectors on letters, blank fillers, and stacks of 3+ combining marks. 1 - 0.5^count.
- `perturbation`: words disguised character by character: letters of two scripts in one word
  (Latin with Cyrillic or Greek look-alikes), leetspeak (digits or @ $ | inside a word with
  letters on both sides), case flipping 3+ times inside a word, combining marks on Latin
  letters. 1 - 0.6^count (one odd word such as "mp3player" is not enough alone).
- `suffix`: a gibberish tail, as GCG's optimised suffixes: the last 30, 60 and 100 characters
  (a suffix's length is unknown), each against the text before it: their share of symbol characters (Unicode S* categories, markup such as
  `{}<>\\^|*#=+_`) and of words mixing scripts or changing case inside; a logistic of the
  excess over the head (ordinary punctuation of any script counts as text).
- `perplexity` (with a model, `token_nll`): the per-token NLL of the prompt; windows of `window`
  tokens; the larger of (a) the highest window mean above the prompt's median and (b) the largest rise of the mean NLL at a
  change point (mean after k - mean before k, both sides >= window tokens), each standardised by
  the same statistic on benign reference prompts (`calibrate`), as z; score = logistic(z - 3)
  (0.5 at three reference standard deviations). Perplexity alone is a weak filter against fluent
  attacks; change points localise an appended gibberish span that an overall mean would dilute.

`check(text)` logs each flagged prompt (score and component names, never the text: it may carry
an attack payload) on the `lmforge.safety` logger.
"""

from __future__ import annotations

import logging
import math
import statistics
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmforge.safety.errors import SafetyError

if TYPE_CHECKING:
    import torch

__all__ = ["AdversarialDetector", "Assessment", "ComponentScore", "PerplexityReference", "TokenNll",
           "invisible_component", "lm_token_nll", "perplexity_stats", "perturbation_component", "suffix_component"]

TokenNll = Callable[[str], Sequence[float]]  # a text -> -log p of each of its tokens (after the first)

_log = logging.getLogger("lmforge.safety")
_FILLERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f\u180e")
_LEET_INNER = frozenset("0123456789@$|")
_ODD_CHARS = frozenset("{}<>\\^`~|*#=+_@$%&")


@dataclass(frozen=True)
class ComponentScore:
    name: str
    score: float
    detail: str


@dataclass(frozen=True)
class Assessment:
    score: float
    flagged: bool
    components: tuple[ComponentScore, ...]

    @property
    def reason(self) -> str:
        top = max(self.components, key=lambda c: c.score)
        return f"{top.name}: {top.detail}"

    def as_json(self) -> dict:
        return {"score": round(self.score, 4), "flagged": self.flagged,
                "components": {c.name: {"score": round(c.score, 4), "detail": c.detail} for c in self.components}}


def _is_pictographic(ch: str) -> bool:
    return ord(ch) >= 0x1F000 or 0x2600 <= ord(ch) <= 0x27BF


def invisible_component(text: str) -> ComponentScore:
    count = 0
    marks = 0
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if cat in ("Mn", "Me"):
            marks += 1
            if marks == 3:  # a stack of 3+ marks on one base ("zalgo")
                count += 1
            continue
        marks = 0
        if ch == "\u200d" and 0 < i < len(text) - 1 and _is_pictographic(text[i - 1]) and _is_pictographic(text[i + 1]):
            continue  # an emoji ZWJ sequence
        if cat == "Cf" or ch in _FILLERS or 0xFE00 <= ord(ch) <= 0xFE0F and i and text[i - 1].isalpha():
            count += 1
    return ComponentScore("invisible", 1 - 0.5 ** count, f"{count} invisible characters")


def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    return name.split(" ", 1)[0] if name else ""


def _perturbed(word: str) -> bool:
    letters = [c for c in word if c.isalpha()]
    if not letters:
        return False
    scripts = {_script(c) for c in letters}
    if len(scripts) > 1 and scripts & {"LATIN"}:
        return True
    for i in range(1, len(word) - 1):
        if word[i] in _LEET_INNER and word[i - 1].isalpha() and word[i + 1].isalpha():
            return True
    flips = sum(1 for a, b in zip(letters, letters[1:], strict=False) if a.islower() != b.islower() and a.isalpha())
    if flips >= 3:
        return True
    decomposed = unicodedata.normalize("NFD", word)
    marks = sum(unicodedata.category(c) == "Mn" for c in decomposed)
    return marks > max(1, len(letters) // 3) and bool(scripts & {"LATIN", "CJK", "GREEK", "CYRILLIC"})


def perturbation_component(text: str) -> ComponentScore:
    words = text.split()
    count = sum(_perturbed(w) for w in words)
    return ComponentScore("perturbation", 1 - 0.6 ** count, f"{count} of {len(words)} words disguised")


def _odd_word(word: str) -> bool:
    letters = [c for c in word if c.isalpha()]
    scripts = {_script(c) for c in letters}
    inner_case = any(a.islower() and b.isupper() for a, b in zip(word, word[1:], strict=False))
    return len(scripts) > 1 or inner_case or any(c in _ODD_CHARS for c in word)


def _is_symbol(c: str) -> bool:
    """Symbols, markup and ASCII brackets; letters, digits, spaces and other punctuation (any script) are not."""
    return c in _ODD_CHARS or c in "[]()" or unicodedata.category(c).startswith("S") or c == "\ufffd"


def _symbol_share(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(map(_is_symbol, chars)) / max(len(chars), 1)


def _odd_share(text: str) -> float:
    words = text.split()
    return sum(map(_odd_word, words)) / len(words) if words else 0.0


def suffix_component(text: str, tails: Sequence[int] = (30, 60, 100)) -> ComponentScore:
    text = text.strip()
    best, detail = 0.0, "too short"
    for n in tails:  # a suffix's length is unknown: the tail of each length against the text before it
        if len(text) < n + 30:
            continue
        head, tail = text[:-n], text[-n:]
        odd = _odd_share(tail) - _odd_share(head)
        sym = _symbol_share(tail) - _symbol_share(head)
        excess = max(odd, 0.0) + 4 * max(sym, 0.0)
        if excess >= best:
            best, detail = excess, f"last {n} characters: odd words +{odd:.2f}, symbols +{sym:.3f} over the rest"
    return ComponentScore("suffix", 1 / (1 + math.exp(-(best - 0.3) / 0.06)), detail)


def perplexity_stats(nll: Sequence[float], window: int) -> tuple[float, float]:
    """(highest mean NLL of a window of `window` tokens above the prompt's median token NLL,
    largest rise of the mean NLL at a change point). Both are differences within the prompt, so a
    language or domain the model finds harder throughout does not look like an attack."""
    n = len(nll)
    if n == 0:
        return 0.0, 0.0
    w = min(window, n)
    prefix = [0.0]
    for x in nll:
        prefix.append(prefix[-1] + x)
    top = max((prefix[i + w] - prefix[i]) / w for i in range(n - w + 1)) - statistics.median(nll)
    rise = 0.0
    for k in range(w, n - w + 1):
        before = prefix[k] / k
        after = (prefix[n] - prefix[k]) / (n - k)
        rise = max(rise, after - before)
    return top, rise


@dataclass(frozen=True)
class PerplexityReference:
    """Mean and standard deviation of `perplexity_stats` over benign reference prompts."""

    top_mean: float
    top_std: float
    rise_mean: float
    rise_std: float
    window: int
    prompts: int


def _logistic(x: float) -> float:
    return 1 / (1 + math.exp(-max(min(x, 50.0), -50.0)))


class AdversarialDetector:
    """`assess(text) -> Assessment`; `check(text)` also logs a flag. Without `token_nll` the
    perplexity component is left out (3 components)."""

    def __init__(self, token_nll: TokenNll | None = None, threshold: float = 0.5, window: int = 8,
                 reference: PerplexityReference | None = None):
        if not 0 < threshold < 1:
            raise SafetyError(f"adversarial threshold {threshold}: must be in (0, 1)")
        if window < 2:
            raise SafetyError(f"adversarial window {window}: must be >= 2 tokens")
        self.token_nll = token_nll
        self.threshold = threshold
        self.window = window
        self.reference = reference

    def calibrate(self, benign: Sequence[str]) -> PerplexityReference:
        """Fit the perplexity component's reference on benign prompts (at least 20)."""
        if self.token_nll is None:
            raise SafetyError("adversarial detector: calibrating needs a model (token_nll)")
        if len(benign) < 20:
            raise SafetyError(f"adversarial detector: {len(benign)} reference prompts; need at least 20")
        stats = [perplexity_stats(self.token_nll(t), self.window) for t in benign]
        tops, rises = [s[0] for s in stats], [s[1] for s in stats]
        self.reference = PerplexityReference(statistics.fmean(tops), statistics.pstdev(tops) or 1e-6,
                                             statistics.fmean(rises), statistics.pstdev(rises) or 1e-6,
                                             self.window, len(benign))
        return self.reference

    def perplexity_component(self, text: str) -> ComponentScore:
        if self.token_nll is None or self.reference is None:
            raise SafetyError("adversarial detector: the perplexity component needs a model and calibrate()")
        ref = self.reference
        top, rise = perplexity_stats(self.token_nll(text), self.window)
        z = max((top - ref.top_mean) / ref.top_std, (rise - ref.rise_mean) / ref.rise_std)
        return ComponentScore("perplexity", _logistic(z - 3), f"window NLL {top:.2f}, change-point rise {rise:.2f} "
                              f"(z {z:.1f} over {ref.prompts} reference prompts)")

    def assess(self, text: str) -> Assessment:
        comps = [invisible_component(text), perturbation_component(text), suffix_component(text)]
        if self.token_nll is not None:
            comps.append(self.perplexity_component(text))
        score = max(c.score for c in comps)
        return Assessment(score, score >= self.threshold, tuple(comps))

    def check(self, text: str) -> Assessment:
        a = self.assess(text)
        if a.flagged:
            _log.warning("safety: adversarial prompt flagged (score %.2f >= %.2f; %s)", a.score, self.threshold,
                         a.reason)
        return a


def lm_token_nll(model: torch.nn.Module, encode: Callable[[str], list[int]], max_len: int) -> TokenNll:
    """A `TokenNll` from a causal LM (`model(ids (1, n)) -> logits (1, n, vocab)`) and its encoder;
    texts longer than `max_len` tokens are scored on their last `max_len` (where suffixes are). The
    ids go to the model's device (a served model may be on CUDA)."""
    import torch

    device = next(model.parameters()).device

    def nll(text: str) -> list[float]:
        ids = encode(text)[-max_len:]
        if len(ids) < 2:
            return []
        with torch.inference_mode():
            x = torch.tensor([ids], device=device)
            logits = model(x[:, :-1]).float()[0]
            return (torch.logsumexp(logits, -1) - logits.gather(1, x[0, 1:, None]).squeeze(1)).tolist()

    return nll

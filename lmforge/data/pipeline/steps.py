"""Pipeline steps: the per-shard step registry `STEP_TYPES`, and the steps `normalize` and `quality`.

The `Step` base class (with its drop sink: every document seen leaves a verdict) is in `base.py`,
re-exported here. A new step: a config dataclass, a `Step` subclass with `process` (in its own
module when it is more than a few lines), and one line in `STEP_TYPES`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.config.loader import ConfigError
from lmforge.data.pipeline.base import DropSink, Step, StepStats
from lmforge.data.pipeline.document import Document
from lmforge.data.pipeline.eda import EdaConfig, EdaStep
from lmforge.data.pipeline.harmful import HarmfulConfig, HarmfulStep
from lmforge.data.pipeline.lexicon import LexiconConfig, LexiconStep
from lmforge.data.pipeline.lm_score import LmScoreConfig, LmScoreStep
from lmforge.data.words import words as split_words

__all__ = ["STEP_TYPES", "DropSink", "StepStats", "NormalizeConfig", "NormalizeStep", "QualityConfig", "QualityStep", "Step",
           "build_steps"]

# ---------------------------------------------------------------- normalize


@dataclass(frozen=True)
class NormalizeConfig:
    form: Literal["NFC", "NFKC", "none"] = "NFC"  # unicode normal form (NFKC also folds compatibility chars)
    newlines: bool = True          # \r\n and \r -> \n
    collapse_spaces: bool = True   # runs of spaces/tabs inside a line -> one space
    strip_lines: bool = True       # no trailing spaces at line ends, none at the document's ends
    max_blank_lines: int = 1       # longer runs of blank lines are shortened to this

    def validate(self, prefix: str, where: str | None) -> None:
        if self.max_blank_lines < 0:
            raise ConfigError(prefix + "max_blank_lines", self.max_blank_lines, "must be >= 0", where)


_HSPACE = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+")


class NormalizeStep(Step):
    """Unicode and whitespace normalisation: the same text written two ways becomes one string
    (for dedup, hashing and the tokenizer). A document that normalises to nothing is dropped."""

    name = "normalize"

    def process(self, doc: Document) -> bool:
        c: NormalizeConfig = self.config
        text = doc.text
        if c.form != "none":
            text = unicodedata.normalize(c.form, text)
        if c.newlines:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        if c.collapse_spaces:
            lines = [_HSPACE.sub(" ", ln) for ln in lines]
        if c.strip_lines:
            lines = [ln.rstrip() for ln in lines]
        out: list[str] = []
        blank = 0
        for ln in lines:
            blank = blank + 1 if not ln.strip() else 0
            if blank <= c.max_blank_lines:
                out.append(ln)
        text = "\n".join(out)
        if c.strip_lines:
            text = text.strip()
        if not text:
            return self.reject(doc, "empty_after_normalize", None, "no characters left")
        changed = text != doc.text
        doc.text = text
        return self.keep(doc, None, "changed" if changed else "unchanged")


# ---------------------------------------------------------------- quality

DEFAULT_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with", "a", "in", "is", "it", "for",
                      "on", "as", "was", "this", "not", "are", "you")


QUALITY_RULES = ("min_words", "max_words", "max_symbol_word_ratio", "max_digit_ratio",
                 "max_duplicate_line_fraction", "max_top_ngram_fraction", "min_stop_words")


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds per rule (defaults: the usual web-text heuristics, Gopher-style). TOML has no
    null, so a rule is switched off by naming it in `disable`; it is still measured and shown in
    the keep verdict, but never drops."""

    min_words: int | None = 50
    max_words: int | None = 100_000
    max_symbol_word_ratio: float | None = 0.1     # ('#' + '...' + '…') per word
    max_digit_ratio: float | None = 0.3           # digits per non-space character
    max_duplicate_line_fraction: float | None = 0.3   # lines repeating an earlier line, per line
    max_top_ngram_fraction: float | None = 0.2    # chars covered by the most frequent word n-gram
    top_ngram_n: int = 2
    min_stop_words: int | None = 2
    stop_words: list[str] = field(default_factory=lambda: list(DEFAULT_STOP_WORDS))
    disable: list[str] = field(default_factory=list)  # rule names, e.g. ["min_stop_words"]

    def validate(self, prefix: str, where: str | None) -> None:
        for name in self.disable:
            if name not in QUALITY_RULES:
                raise ConfigError(prefix + "disable", name, "unknown rule; rules: " + ", ".join(QUALITY_RULES), where)
        for key in ("max_symbol_word_ratio", "max_digit_ratio", "max_duplicate_line_fraction",
                    "max_top_ngram_fraction"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise ConfigError(prefix + key, v, "must be >= 0", where)
        for key in ("min_words", "max_words", "min_stop_words"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise ConfigError(prefix + key, v, "must be >= 0", where)
        if self.top_ngram_n < 1:
            raise ConfigError(prefix + "top_ngram_n", self.top_ngram_n, "must be >= 1", where)


def quality_signals(text: str, n: int, stop_words: frozenset[str]) -> dict[str, float]:
    """The measured value of every rule (the same numbers whether or not a rule drops). Words as
    data/words.py counts them: space-separated runs, and one per Han or kana character."""
    words = split_words(text)
    n_words = len(words)
    symbols = text.count("#") + text.count("...") + text.count("…")
    chars = [ch for ch in text if not ch.isspace()]
    digits = sum(ch.isdigit() for ch in chars)
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    dup_lines = len(lines) - len(set(lines))
    top = 0.0
    if n_words >= n:
        grams = Counter(tuple(words[i:i + n]) for i in range(n_words - n + 1))
        gram, count = grams.most_common(1)[0]
        if count > 1:
            total = sum(len(w) for w in words)
            top = count * sum(len(w) for w in gram) / max(total, 1)
    lowered = (w.strip(".,;:!?\"'()").lower() for w in words)
    return {
        "words": float(n_words),
        "symbol_word_ratio": symbols / max(n_words, 1),
        "digit_ratio": digits / max(len(chars), 1),
        "duplicate_line_fraction": dup_lines / max(len(lines), 1),
        "top_ngram_fraction": top,
        "stop_words": float(sum(w in stop_words for w in lowered)),
    }


class QualityStep(Step):
    """Heuristic quality filters; the first failing rule drops the document and names the rule,
    its value and its threshold. Kept documents carry all measured values in their verdict."""

    name = "quality"

    def __init__(self, config: QualityConfig, drop: DropSink):
        super().__init__(config, drop)
        self._stop = frozenset(w.lower() for w in config.stop_words)
        # (rule, signal, threshold, True when the value must be >= threshold)
        self._rules = [
            ("min_words", "words", config.min_words, True),
            ("max_words", "words", config.max_words, False),
            ("max_symbol_word_ratio", "symbol_word_ratio", config.max_symbol_word_ratio, False),
            ("max_digit_ratio", "digit_ratio", config.max_digit_ratio, False),
            ("max_duplicate_line_fraction", "duplicate_line_fraction", config.max_duplicate_line_fraction, False),
            ("max_top_ngram_fraction", "top_ngram_fraction", config.max_top_ngram_fraction, False),
            ("min_stop_words", "stop_words", config.min_stop_words, True),
        ]

    def process(self, doc: Document) -> bool:
        sig = quality_signals(doc.text, self.config.top_ngram_n, self._stop)
        for rule, signal, threshold, at_least in self._rules:
            if threshold is None or rule in self.config.disable:
                continue
            value = sig[signal]
            if (value < threshold) if at_least else (value > threshold):
                op = "<" if at_least else ">"
                return self.reject(doc, rule, value, f"{signal} {value:.4g} {op} {threshold}")
        return self.keep(doc, None, " ".join(f"{k}={v:.4g}" for k, v in sig.items()))


STEP_TYPES: dict[str, tuple[type[Step], type]] = {
    "normalize": (NormalizeStep, NormalizeConfig),
    "quality": (QualityStep, QualityConfig),
    "lm_score": (LmScoreStep, LmScoreConfig),  # with max_perplexity; keep_top_fraction: GLOBAL_STEP_TYPES
    "lexicon": (LexiconStep, LexiconConfig),
    "eda": (EdaStep, EdaConfig),
    "harmful": (HarmfulStep, HarmfulConfig),  # the safety filter's data gate (lmforge/safety)
}


def build_steps(specs: list[Any], drop: DropSink) -> list[Step]:
    """The step objects of a chain of `config.StepSpec`s, all sending drops to `drop`."""
    return [STEP_TYPES[s.type][0](s.options, drop) for s in specs]

"""Synthetic-text detection: how likely a passage is machine-generated, from a classifier trained
to tell reference human text from text sampled from a given model (the "adversarial validation"
of a corpus's authenticity). The pipeline's `synthetic` step (`pipeline/synthetic.py`) trains one
per run and scores every document with it; `holdout_auroc` measures it on held-out passages.

Why these features (scikit-learn, CPU, seconds to train): character n-grams (1-4, case kept,
within word boundaries) and word uni/bigrams, TF-IDF with sublinear counts, plus a few style
statistics (type-token ratio, repeated word trigrams, word length, capitals, punctuation, line
breaks), into one L2-regularised logistic regression with balanced class weights. A small model's
samples differ from human text mostly in local texture (made-up words, wrong function-word
patterns, repetition), which these see without a GPU and without the generating model.

Why passages of the samples' length: a detector trained on whole human documents against short
samples would learn length and layout, not style. Human reference documents are cut at word
boundaries into passages whose lengths are drawn from the machine samples' lengths, and a document
is scored as the mean P(machine) over up to `windows` passage-length windows spread over it.

The machine samples come from `lmforge/serve/sample.py: sample_passages` (`lmforge data sample`):
the data layer never loads a model (docs/architecture.md), it reads the samples' jsonl.
scikit-learn is imported only here, when a detector is built or loaded (`pip install -e .[data]`).
"""

from __future__ import annotations

import json
import pickle
import random
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.errors import DataError
from lmforge.storage.atomic import atomic_open

__all__ = ["DetectorOptions", "HoldoutResult", "ReferenceProfile", "SyntheticDetector", "cut_passage", "holdout_auroc", "read_jsonl_texts",
           "style_stats"]

DETECTOR_FORMAT = 1  # bump when features or the pickle layout change: cached detectors are retrained


@dataclass(frozen=True)
class DetectorOptions:
    char_ngram_max: int = 4        # character n-grams 1..char_ngram_max (within word boundaries)
    word_ngram_max: int = 2        # word n-grams 1..word_ngram_max
    max_features: int = 100_000    # per vectorizer (most frequent kept)
    c: float = 4.0                 # inverse L2 strength of the logistic regression
    human_per_machine: float = 4.0  # at most this many human training passages per machine sample
    windows: int = 4               # scoring: up to this many passage-length windows per document
    seed: int = 0


def style_stats(texts: Iterable[str]) -> np.ndarray:
    """(n, 7) statistics a passage's style shows regardless of topic: type-token ratio, fraction
    of word trigrams that repeat an earlier one, mean word length, capitals per letter,
    punctuation per character, line breaks per word, log length."""
    rows = []
    for text in texts:
        words = text.split()
        n = max(len(words), 1)
        lowered = [w.lower() for w in words]
        tri = Counter(zip(lowered, lowered[1:], lowered[2:], strict=False))
        repeated = sum(c - 1 for c in tri.values())
        letters = sum(ch.isalpha() for ch in text)
        rows.append([len(set(lowered)) / n, repeated / max(len(words) - 2, 1),
                     sum(len(w) for w in words) / n, sum(ch.isupper() for ch in text) / max(letters, 1),
                     sum(not ch.isalnum() and not ch.isspace() for ch in text) / max(len(text), 1),
                     text.count("\n") / n, float(np.log1p(len(text)))])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 7)


_SPACE = re.compile(r"\s")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class ReferenceProfile:
    """What human text looks like, from reference documents the detector's passages are not cut
    from: word frequencies and the set of character 4-grams. `features` measures a passage against
    it: the fraction of words never seen, of rare words, their mean log frequency, and the
    fraction of character 4-grams never seen (made-up words). These need no machine samples, so
    they hold even when there are few samples to learn the TF-IDF weights from."""

    words: dict[str, int] = field(default_factory=dict)
    char4: frozenset[str] = frozenset()

    @classmethod
    def build(cls, texts: Iterable[str], max_chars: int = 5_000_000) -> ReferenceProfile:
        words: Counter[str] = Counter()
        grams: set[str] = set()
        used = 0
        for text in texts:
            words.update(_words(text))
            grams.update(text[i:i + 4] for i in range(len(text) - 3))
            used += len(text)
            if used >= max_chars:
                break
        return cls(dict(words), frozenset(grams))

    def features(self, texts: Iterable[str]) -> np.ndarray:
        rows = []
        for text in texts:
            ws = _words(text)
            counts = [self.words.get(w, 0) for w in ws]
            n = max(len(ws), 1)
            grams = [text[i:i + 4] for i in range(len(text) - 3)]
            unseen = sum(g not in self.char4 for g in grams) / max(len(grams), 1)
            rows.append([sum(c == 0 for c in counts) / n, sum(c <= 2 for c in counts) / n,
                         sum(np.log1p(c) for c in counts) / n, unseen])
        return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def cut_passage(text: str, start: int, length: int) -> str:
    """About `length` characters of `text` from `start`, moved to begin after a whitespace and end
    before one (no half words at either end), stripped."""
    if start > 0:
        m = _SPACE.search(text, start)
        start = m.end() if m else len(text)
    end = start + length
    if end < len(text):
        cut = max(text.rfind(" ", start, end + 1), text.rfind("\n", start, end + 1))
        end = cut if cut > start else end
    return text[start:end].strip()


def _windows(text: str, length: int, count: int) -> list[str]:
    if len(text) <= length * 1.5 or count <= 1:
        return [cut_passage(text, 0, length) or text]
    starts = np.linspace(0, len(text) - length, num=min(count, len(text) // length)).astype(int)
    return [p for p in (cut_passage(text, int(s), length) for s in starts) if p] or [text]


def _sklearn() -> Any:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise DataError('synthetic-text detection needs scikit-learn: pip install -e ".[data]"') from None
    from sklearn import feature_extraction, linear_model, pipeline, preprocessing

    return feature_extraction.text, linear_model, pipeline, preprocessing


def _build_model(o: DetectorOptions, profile: ReferenceProfile) -> Any:
    text, linear_model, pipeline, preprocessing = _sklearn()
    features = pipeline.FeatureUnion([
        ("char", text.TfidfVectorizer(analyzer="char_wb", ngram_range=(1, o.char_ngram_max), lowercase=False,
                                      sublinear_tf=True, min_df=2, max_features=o.max_features, dtype=np.float32)),
        ("word", text.TfidfVectorizer(analyzer="word", ngram_range=(1, o.word_ngram_max), token_pattern=r"\S+",
                                      sublinear_tf=True, min_df=2, max_features=o.max_features, dtype=np.float32)),
        ("style", pipeline.make_pipeline(preprocessing.FunctionTransformer(style_stats), preprocessing.StandardScaler())),
        ("reference", pipeline.make_pipeline(preprocessing.FunctionTransformer(profile.features),
                                             preprocessing.StandardScaler())),
    ])
    clf = linear_model.LogisticRegression(C=o.c, max_iter=2000, class_weight="balanced")
    return pipeline.make_pipeline(features, clf)


@dataclass
class SyntheticDetector:
    """P(machine-generated) for texts. `fit` on human reference texts (whole documents: cut here)
    and machine samples (passages, kept as they are)."""

    options: DetectorOptions = field(default_factory=DetectorOptions)
    passage_chars: int = 0   # the median machine sample length: the scoring window
    model: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def fit(self, human: Sequence[str], machine: Sequence[str]) -> SyntheticDetector:
        machine = [t.strip() for t in machine if t.strip()]
        if len(machine) < 2 or not human:
            raise DataError(f"synthetic detector: need >= 2 machine samples and >= 1 human text "
                            f"(got {len(machine)} and {len(human)})")
        o = self.options
        rng = random.Random(o.seed)
        lengths = [len(t) for t in machine]
        self.passage_chars = int(statistics.median(lengths))
        budget = max(int(len(machine) * o.human_per_machine), len(machine))
        human = list(human)
        rng.shuffle(human)
        # the profile from one half of the human documents, the training passages from the other:
        # cut from the profile's own documents, human passages would look more familiar than
        # any unseen human text does
        split = len(human) // 2 if len(human) >= 20 else len(human)
        profile = ReferenceProfile.build(human[:split])
        passages = human_passages(human[split:] or human, lengths, rng)
        if len(passages) > budget:
            passages = rng.sample(passages, budget)
        if not passages:
            raise DataError("synthetic detector: the human reference texts give no passage (all empty?)")
        self.model = _build_model(o, profile).fit(passages + machine, [0] * len(passages) + [1] * len(machine))
        self.info = {"human_passages": len(passages), "machine_samples": len(machine),
                     "passage_chars": self.passage_chars}
        return self

    def predict_passages(self, passages: Sequence[str]) -> np.ndarray:
        """P(machine) of each passage as it is (no windows)."""
        if self.model is None:
            raise DataError("synthetic detector: not trained")
        if not passages:
            return np.zeros(0)
        return self.model.predict_proba(list(passages))[:, 1]

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """P(machine) of each document: the mean over up to `options.windows` windows of the
        training passage length."""
        spans = [_windows(t, self.passage_chars, self.options.windows) for t in texts]
        flat = self.predict_passages([w for ws in spans for w in ws])
        out, at = np.zeros(len(texts)), 0
        for i, ws in enumerate(spans):
            out[i] = float(flat[at:at + len(ws)].mean())
            at += len(ws)
        return out

    def save(self, path: Path, fingerprint: str = "") -> None:
        state = {"format": DETECTOR_FORMAT, "fingerprint": fingerprint, "options": asdict(self.options),
                 "passage_chars": self.passage_chars, "model": self.model, "info": self.info}
        with atomic_open(path, "wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def load(cls, path: Path, fingerprint: str = "") -> SyntheticDetector | None:
        """A detector this code saved with the same fingerprint, else None (retrain). Only files
        the pipeline itself wrote into its run directory are loaded (a pickle runs code)."""
        _sklearn()
        try:
            with open(path, "rb") as f:
                state = pickle.load(f)  # noqa: S301 (our own cache file, see above)
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError):
            return None
        if not isinstance(state, dict) or state.get("format") != DETECTOR_FORMAT \
                or state.get("fingerprint") != fingerprint:
            return None
        return cls(DetectorOptions(**state["options"]), state["passage_chars"], state["model"], state["info"])


def human_passages(texts: Iterable[str], lengths: Sequence[int], rng: random.Random) -> list[str]:
    """Consecutive passages of each text, their lengths drawn from `lengths` (word boundaries)."""
    out = []
    for text in texts:
        at = 0
        while at < len(text):
            length = rng.choice(lengths)
            p = cut_passage(text, at, length)
            if len(p) >= 0.5 * length:
                out.append(p)
            at += length + 1
    return out


def read_jsonl_texts(path: Path, field_name: str = "text") -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line, record) of every record of a jsonl file with a non-empty string `field_name`;
    a malformed line is a DataError naming it (a reference or sample file is small and hand-picked)."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise DataError(f"{path}:{n}: not a JSON line") from None
            text = obj.get(field_name) if isinstance(obj, dict) else None
            if isinstance(text, str) and text.strip():
                yield n, obj


@dataclass(frozen=True)
class HoldoutResult:
    auroc: float
    train_machine: int
    train_human_docs: int
    test_machine: int
    test_human: int
    passage_chars: int

    def line(self) -> str:
        return (f"AUROC {self.auroc:.4f} on {self.test_machine} held-out samples vs {self.test_human} held-out human "
                f"passages of the same lengths (trained on {self.train_machine} samples, "
                f"{self.train_human_docs} human documents; median passage {self.passage_chars} chars)")


def holdout_auroc(reference: Path, samples: Path, test_fraction: float = 0.5, seed: int = 0,
                  options: DetectorOptions | None = None, max_human_docs: int = 3000,
                  text_field: str = "text") -> HoldoutResult:
    """Train on part of the samples (and the reference documents none of the held-out samples was
    prompted from), then score the held-out samples against held-out human passages: for each
    held-out sample, its own reference document's text after the prompt, cut to the sample's
    length. Same topics, same lengths: only style separates them. Needs the samples'
    `reference_line` and `prompt_chars` fields (`sample_passages` writes them)."""
    _, _, _, _ = _sklearn()
    from sklearn.metrics import roc_auc_score

    refs = {n: obj[text_field] for n, obj in read_jsonl_texts(reference, text_field)}
    rows = [obj for _, obj in read_jsonl_texts(samples, "text")]
    if any("reference_line" not in r or "prompt_chars" not in r for r in rows):
        raise DataError(f"{samples}: records need reference_line and prompt_chars (written by lmforge data sample)")
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_test = int(round(len(rows) * test_fraction))
    test = [rows[i] for i in sorted(order[:n_test])]
    train = [rows[i] for i in sorted(order[n_test:])]
    held = {r["reference_line"] for r in test}
    human_train = [t for n, t in refs.items() if n not in held]
    if len(human_train) > max_human_docs:
        human_train = rng.sample(human_train, max_human_docs)
    det = SyntheticDetector(options or DetectorOptions(seed=seed)).fit(human_train, [r["text"] for r in train])
    machine_test = [r["text"] for r in test]
    human_test = [cut_passage(refs[r["reference_line"]], r["prompt_chars"], len(r["text"])) for r in test]
    pairs = [(h, m) for h, m in zip(human_test, machine_test, strict=True) if h]
    scores = det.predict_passages([h for h, _ in pairs] + [m for _, m in pairs])
    labels = [0] * len(pairs) + [1] * len(pairs)
    return HoldoutResult(float(roc_auc_score(labels, scores)), len(train), len(human_train), len(pairs), len(pairs),
                         det.passage_chars)

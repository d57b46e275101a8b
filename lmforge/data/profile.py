"""One pass over a pipeline run directory (or a plain jsonl corpus) -> a `CorpusProfile`: what the
report plots and the drift comparison needs, in bounded memory.

Why a profile instead of the documents: a corpus is far larger than memory. Documents are
streamed one at a time and only summaries are kept: counters (words, domains, step verdicts), and
for the histograms a fixed-size uniform reservoir sample of each value series (`Reservoir`:
every document is equally likely to be in it, the same sample on every run). Every word of every
kept document is counted, and the unigram table stays bounded: past `max_vocabulary` distinct
words its rarest entries are dropped (`CorpusProfile.prune`, noted in the profile). That leaves
the drift verdict unchanged - it needs the counts of the most frequent words and the total, which
is kept apart (`unigram_tokens`) - and only the full-vocabulary figure, shown for reference, loses
the pruned words. Sources past `MAX_SOURCES` distinct names are counted as "(other)".

Where the per-step table comes from: `stats.json` "steps" ({step: {seen, kept, dropped:
{reason: n}, seconds}}, in the pipeline's order `step_order`; a global step's seconds include its
decision) when the executor wrote it; otherwise it is rebuilt from the provenance verdicts of the
kept documents and the rejects (then without seconds, so without throughput).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.errors import DataError
from lmforge.data.files import read_json
from lmforge.data.pipeline.readers import JSONL_SUFFIXES, open_binary
from lmforge.data.pipeline.steps import DEFAULT_STOP_WORDS, quality_signals
from lmforge.data.words import word_tokens, words

__all__ = ["MAX_SOURCES", "MAX_VOCABULARY", "RESERVOIR_SIZE", "CorpusProfile", "Reservoir", "StepRow", "profile_path",
           "read_corpus", "read_run"]

RESERVOIR_SIZE = 50_000
MAX_VOCABULARY = 2_000_000  # distinct words in the unigram table (about 200 MB) before pruning
MAX_SOURCES = 10_000       # a directory of text files has one source per file
OUTPUTS = ("output.jsonl", "output.jsonl.zst")
_STOP = frozenset(DEFAULT_STOP_WORDS)


class Reservoir:
    """A uniform sample of at most `size` values of a stream (Algorithm R, seeded: the same stream
    gives the same sample), and how many values the stream had."""

    def __init__(self, size: int = RESERVOIR_SIZE, seed: int = 0):
        self.size = size
        self.seen = 0
        self.values: list[float] = []
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
            return
        j = self._rng.randrange(self.seen)
        if j < self.size:
            self.values[j] = value

    @property
    def sampled(self) -> bool:
        return self.seen > len(self.values)


@dataclass
class StepRow:
    """One row of the per-step table: documents the step saw, kept, dropped by reason, and its
    wall time when the executor measured it (throughput = seen / seconds)."""

    seen: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    seconds: float | None = None

    @property
    def docs_per_second(self) -> float | None:
        return self.seen / self.seconds if self.seconds else None


@dataclass
class CorpusProfile:
    """The summaries of one corpus. `scores`: value series of kept documents ("length.words",
    "<step>.<signal>" from keep verdicts such as quality's "words=.. symbol_word_ratio=..",
    "<step>.score"); `removed_scores`: the value a drop rested on, per "<step>.<signal>"."""

    name: str
    kind: str  # "run" or "corpus"
    documents: int = 0
    words: int = 0
    unigrams: Counter[str] = field(default_factory=Counter)
    unigram_tokens: int = 0  # every word counted, pruned ones too
    pruned_below: int = 0    # the count under which words were dropped from `unigrams` (0: none)
    scores: dict[str, Reservoir] = field(default_factory=dict)
    removed_scores: dict[str, Reservoir] = field(default_factory=dict)
    domains: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    steps: dict[str, StepRow] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    step_seconds: bool = False  # whether the step table came from stats.json (with seconds)
    notes: list[str] = field(default_factory=list)
    max_vocabulary: int = MAX_VOCABULARY
    reservoir_size: int = RESERVOIR_SIZE

    def series(self, table: dict[str, Reservoir], key: str) -> Reservoir:
        if key not in table:
            table[key] = Reservoir(self.reservoir_size)
        return table[key]

    def add_text(self, text: str) -> None:
        """Length and unigram counts of one kept document."""
        n_words = len(words(text))  # data/words.py: one word per Han or kana character
        self.documents += 1
        self.words += n_words
        self.series(self.scores, "length.words").add(float(n_words))
        self.series(self.scores, "length.chars").add(float(len(text)))
        tokens = word_tokens(text)
        self.unigrams.update(tokens)
        self.unigram_tokens += len(tokens)
        if len(self.unigrams) > self.max_vocabulary:
            self.prune()

    def prune(self) -> None:
        """Drop the rarest words until the table holds at most half of `max_vocabulary` (lossy
        counting: a dropped word that comes back starts again from 0; frequent words never go)."""
        floor = max(self.pruned_below, 2)
        while len(self.unigrams) > self.max_vocabulary // 2:
            self.unigrams = Counter({w: n for w, n in self.unigrams.items() if n >= floor})
            self.pruned_below = floor
            floor *= 2

    def add_source(self, source: str, domain: Any) -> None:
        if isinstance(domain, str):
            self.domains[domain] += 1
        if source not in self.sources and len(self.sources) >= MAX_SOURCES:
            source = "(other)"
        self.sources[source] += 1


def _signals(detail: str) -> dict[str, float]:
    """"k=v k=v" pairs of a keep verdict's detail with a numeric v (other words are ignored)."""
    out = {}
    for part in detail.split():
        key, eq, value = part.partition("=")
        if eq:
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, the JSON object or None when the line is not one), streamed."""
    with open_binary(path) as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                yield n, None
                continue
            yield n, obj if isinstance(obj, dict) else None


def _note_caps(p: CorpusProfile) -> None:
    if p.pruned_below:
        p.notes.append(f"more than {p.max_vocabulary:,} distinct words: words seen fewer than {p.pruned_below} "
                       "times at a time were pruned from the unigram table (the drift verdict does not change; "
                       "the full-vocabulary JSD misses them)")
    sampled = sorted(k for k, r in {**p.scores, **p.removed_scores}.items() if r.sampled)
    if sampled:
        p.notes.append(f"histograms of {', '.join(sampled)} are drawn from a uniform sample of "
                       f"{p.reservoir_size:,} values")


def _verdicts(p: CorpusProfile, provenance: Any, rebuild_steps: bool) -> None:
    for v in provenance if isinstance(provenance, list) else []:
        if not isinstance(v, dict) or not isinstance(v.get("step"), str):
            continue
        step, detail, score = v["step"], str(v.get("detail", "")), v.get("score")
        row = p.steps.setdefault(step, StepRow()) if rebuild_steps else None
        if row is not None:
            row.seen += 1
        if v.get("verdict") == "keep":
            if row is not None:
                row.kept += 1
            for key, value in _signals(detail).items():
                p.series(p.scores, f"{step}.{key}").add(value)
            if isinstance(score, int | float):
                p.series(p.scores, f"{step}.score").add(float(score))
            continue
        reason, _, rest = detail.partition(": ")
        if row is not None:
            row.dropped[reason or "dropped"] += 1
        if isinstance(score, int | float):
            # quality's detail: "<rule>: <signal> <value> <op> <threshold>"; other steps': by reason
            signal = rest.split(" ", 1)[0] if rest else ""
            key = f"{step}.{signal}" if f"{step}.{signal}" in p.scores else f"{step}.{reason or 'dropped'}"
            p.series(p.removed_scores, key).add(float(score))


def _steps_from_stats(stats: dict[str, Any]) -> dict[str, StepRow] | None:
    table = stats.get("steps")
    if not isinstance(table, dict) or not table:
        return None
    order = stats.get("step_order") if isinstance(stats.get("step_order"), list) else []
    names = [n for n in order if n in table] + [n for n in table if n not in order]  # older runs: as stored
    rows = {}
    for name in names:
        r = table[name]
        if not isinstance(r, dict):
            continue
        dropped = r.get("dropped") if isinstance(r.get("dropped"), dict) else {}
        secs = r.get("seconds")
        rows[str(name)] = StepRow(int(r.get("seen", 0) or 0), int(r.get("kept", 0) or 0),
                                  Counter({str(k): int(n) for k, n in dropped.items()}),
                                  float(secs) if isinstance(secs, int | float) else None)
    return rows


def read_run(run_dir: str | Path, reservoir_size: int = RESERVOIR_SIZE,
             max_vocabulary: int = MAX_VOCABULARY) -> CorpusProfile:
    """Profile a `lmforge data run` output directory: output.jsonl[.zst], rejects.jsonl, stats.json."""
    d = Path(run_dir)
    stats = read_json(d / "stats.json")
    outputs = [d / n for n in OUTPUTS if (d / n).is_file()]
    if stats is None or not outputs:
        raise DataError(f"{d} is not a finished pipeline run (needs stats.json and output.jsonl[.zst], written "
                        "by `lmforge data run`)")
    p = CorpusProfile(d.name or str(d), "run", totals=stats, reservoir_size=reservoir_size,
                      max_vocabulary=max_vocabulary)
    from_stats = _steps_from_stats(stats)
    bad = 0
    for _, doc in _lines(outputs[0]):
        if doc is None or not isinstance(doc.get("text"), str):
            bad += 1
            continue
        p.add_text(doc["text"])
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        p.add_source(str(doc.get("source", "?")), meta.get("domain"))
        _verdicts(p, doc.get("provenance"), from_stats is None)
    rejects = d / "rejects.jsonl"
    read_rejects: Counter[str] = Counter()
    if rejects.is_file():
        for _, rej in _lines(rejects):
            if rej is None:
                bad += 1
            elif rej.get("stage") == "read":
                read_rejects[str(rej.get("reason", "?"))] += 1
            else:
                _verdicts(p, rej.get("provenance"), from_stats is None)
    if bad:
        p.notes.append(f"{bad} unreadable lines in the run's output files were skipped")
    rejected = stats.get("rejected") if isinstance(stats.get("rejected"), dict) else dict(read_rejects)
    records = int(stats.get("records", 0) or 0)
    steps = from_stats if from_stats is not None else p.steps
    if "read" not in steps and records:
        read = StepRow(records, records - sum(int(n) for n in rejected.values()), Counter(rejected))
        steps = {"read": read, **steps}
    p.steps = steps
    p.step_seconds = from_stats is not None and any(r.seconds is not None for r in steps.values())
    if from_stats is None:
        p.notes.append("stats.json has no per-step table: steps rebuilt from provenance verdicts (no timings)")
    _note_caps(p)
    return p


def read_corpus(path: str | Path, reservoir_size: int = RESERVOIR_SIZE,
                max_vocabulary: int = MAX_VOCABULARY, text_field: str = "text") -> CorpusProfile:
    """Profile a jsonl corpus of {"text": ...} (.jsonl, .gz, .zst). Documents without provenance get
    the quality step's signals measured here ("quality.<signal>"), so a raw corpus and a run
    compare on the same series."""
    f = Path(path)
    if not f.is_file():
        raise DataError(f"{f} not found (expected a pipeline run directory or a .jsonl corpus of {{\"text\": ...}})")
    p = CorpusProfile(f.name, "corpus", reservoir_size=reservoir_size, max_vocabulary=max_vocabulary)
    bad = 0
    for _, doc in _lines(f):
        text = doc.get(text_field) if doc is not None else None
        if not isinstance(text, str) or not text.strip():
            bad += 1
            continue
        p.add_text(text)
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        p.add_source(str(doc.get("source", f.name)), meta.get("domain", doc.get("domain")))
        if doc.get("provenance"):
            _verdicts(p, doc["provenance"], False)
        else:
            for key, value in quality_signals(text, 2, _STOP).items():
                p.series(p.scores, f"quality.{key}").add(value)
    if bad:
        p.notes.append(f"{bad} lines without a non-empty {text_field!r} string were skipped")
    if not p.documents:
        raise DataError(f"{f} holds no documents (jsonl lines of {{\"{text_field}\": \"...\"}})")
    _note_caps(p)
    return p


def profile_path(path: str | Path, **kw: Any) -> CorpusProfile:
    """A run directory or a jsonl corpus file, whichever `path` is."""
    p = Path(path)
    if p.is_dir():
        return read_run(p, **kw)
    if p.is_file() and not p.name.endswith(JSONL_SUFFIXES):
        raise DataError(f"{p}: not a pipeline run directory nor a jsonl corpus ({', '.join(JSONL_SUFFIXES)})")
    return read_corpus(p, **kw)

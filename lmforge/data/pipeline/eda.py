"""`eda`: Easy Data Augmentation (Wei & Zou, 2019): each document is followed by `copies`
augmented copies, each made by one of synonym replacement (sr), random insertion (ri), random
swap (rs) or random deletion (rd).

    [[steps]]
    type = "eda"
    synonyms = "synonyms.txt"   # lines `word: syn1, syn2` (`#` comments), relative to the TOML
    alpha_sr = 0.1              # sr: n = max(1, int(alpha * words)) distinct words replaced
    alpha_ri = 0.1              # ri: n synonyms of random words inserted at random places
    alpha_rs = 0.1              # rs: n swaps of two random words
    p_rd = 0.1                  # rd: each word deleted with this probability (at least one stays)
    copies = 4
    seed = 0

As in the paper's code, each copy applies one operation, copy k the k-th of the enabled ones in
the order sr, ri, rs, rd, cycling; an operation is enabled by a rate above 0. Synonyms: there is
no WordNet offline, so sr and ri use only the table given in `synonyms` (one direction: list a
word both ways for symmetry); without a table they are disabled (copies cycle through rs and rd),
and a copy whose operation found no word with a synonym is emitted unchanged with "0 changes".
Words are whitespace-separated tokens; a synonym replaces a token's letters and keeps the
punctuation around them; lookups are lower-case. A copy's words are joined by single spaces (its
line breaks are not kept).

The copies follow their original in the output, with ids `<id>#eda<k>` (k from 1), metadata
`eda` = {"of", "copy", "operations", "changes"} and the original's provenance plus an `eda`
verdict whose score is the number of changes. Determinism: copy k's random generator is seeded
from (seed, document id, k), so the output is byte-identical for any worker count.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lmforge.config.loader import ConfigError
from lmforge.data.pipeline.base import DropSink, Step
from lmforge.data.pipeline.document import Document, Verdict

__all__ = ["EdaConfig", "EdaStep", "random_deletion", "random_insertion", "random_swap", "read_synonyms",
           "synonym_replacement"]

OPERATIONS = ("sr", "ri", "rs", "rd")
_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


@dataclass(frozen=True)
class EdaConfig:
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("synonyms",)  # relative to the TOML (config.py)
    synonyms: str = ""
    alpha_sr: float = 0.1
    alpha_ri: float = 0.1
    alpha_rs: float = 0.1
    p_rd: float = 0.1
    copies: int = 4
    seed: int = 0

    def validate(self, prefix: str, where: str | None) -> None:
        if self.synonyms and not Path(self.synonyms).is_file():
            raise ConfigError(prefix + "synonyms", self.synonyms, "is not a file", where)
        if self.synonyms:
            read_synonyms(Path(self.synonyms), prefix + "synonyms", where)
        for key in ("alpha_sr", "alpha_ri", "alpha_rs", "p_rd"):
            v = getattr(self, key)
            if not 0 <= v <= 1:
                raise ConfigError(prefix + key, v, "must be in [0, 1]", where)
        if self.copies < 1:
            raise ConfigError(prefix + "copies", self.copies, "must be >= 1", where)
        if not self.operations():
            raise ConfigError(prefix + "alpha_rs", self.alpha_rs, "no operation enabled: set alpha_rs or p_rd above 0 "
                              "(alpha_sr, alpha_ri also need a synonyms table)", where)


    def operations(self) -> list[str]:
        """The enabled operations, in the order copies cycle through them."""
        rates = {"sr": self.alpha_sr if self.synonyms else 0, "ri": self.alpha_ri if self.synonyms else 0,
                 "rs": self.alpha_rs, "rd": self.p_rd}
        return [op for op in OPERATIONS if rates[op] > 0]


def read_synonyms(path: Path, key: str = "synonyms", where: str | None = None) -> dict[str, list[str]]:
    """`word: syn1, syn2` lines -> {word: [syn1, syn2]} (lower case); a bad line is a ConfigError."""
    table: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            word, sep, rest = line.partition(":")
            syns = [s.strip().lower() for s in rest.split(",") if s.strip()]
            if not sep or not word.strip() or not syns:
                raise ConfigError(key, f"{path}:{n}", "lines must read `word: synonym, synonym`", where)
            table.setdefault(word.strip().lower(), []).extend(s for s in syns if s != word.strip().lower())
    return {w: sorted(set(s)) for w, s in table.items() if s}


def _core(token: str) -> tuple[str, str, str]:
    """(leading punctuation, the word, trailing punctuation)."""
    if token.isalnum():
        return "", token, ""
    m = _CORE.match(token)
    assert m is not None
    return m.group(1), m.group(2), m.group(3)


def synonym_replacement(words: list[str], n: int, table: dict[str, list[str]], rng: random.Random) -> tuple[list[str], int]:
    """Up to n distinct words that have synonyms, every occurrence replaced by one random synonym."""
    parts = [_core(w) for w in words]
    keys = [core.lower() for _, core, _ in parts]
    candidates = sorted(set(keys) & table.keys())
    rng.shuffle(candidates)
    out, changes = list(words), 0
    for word in candidates[:n]:
        syn = rng.choice(table[word])
        for i, key in enumerate(keys):
            if key == word:
                out[i] = parts[i][0] + syn + parts[i][2]
                changes += 1
    return out, changes


def random_insertion(words: list[str], n: int, table: dict[str, list[str]], rng: random.Random) -> tuple[list[str], int]:
    """n times: a synonym of a random word that has one, inserted at a random position."""
    out, changes = list(words), 0
    with_syn = [key for key in (_core(w)[1].lower() for w in words) if key in table]
    if not with_syn:
        return out, 0
    for _ in range(n):
        out.insert(rng.randint(0, len(out)), rng.choice(table[rng.choice(with_syn)]))
        changes += 1
    return out, changes


def random_swap(words: list[str], n: int, rng: random.Random) -> tuple[list[str], int]:
    """n swaps of the words at two different random positions (nothing to swap in one word)."""
    out = list(words)
    if len(out) < 2:
        return out, 0
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out, n


def random_deletion(words: list[str], p: float, rng: random.Random) -> tuple[list[str], int]:
    """Each word deleted with probability p; when all would go, one random word stays."""
    if len(words) <= 1:
        return list(words), 0
    out = [w for w in words if rng.random() >= p]
    if not out:
        out = [rng.choice(words)]
    return out, len(words) - len(out)


class EdaStep(Step):
    """Keeps every document and emits `copies` augmented copies after it (see the module docstring)."""

    name = "eda"

    def __init__(self, config: EdaConfig, drop: DropSink):
        super().__init__(config, drop)
        self._table = read_synonyms(Path(config.synonyms)) if config.synonyms else {}
        self._ops = config.operations()

    def run(self, docs: Iterator[Document]) -> Iterator[Document]:
        stats = self.stats
        for doc in docs:
            t0 = time.perf_counter()
            before = list(doc.provenance)
            copies = self.augment(doc, before)
            self.process(doc, len(copies))
            stats.seconds += time.perf_counter() - t0
            stats.seen += 1
            stats.kept += 1 + len(copies)
            yield doc
            yield from copies

    def process(self, doc: Document, n_copies: int = 0) -> bool:
        note = f"original; {n_copies} augmented copies follow" if n_copies else "original; no words to augment"
        return self.keep(doc, None, note)

    def augment(self, doc: Document, provenance: list[Verdict]) -> list[Document]:
        c: EdaConfig = self.config
        words = doc.text.split()
        if not words:
            return []
        out = []
        for k in range(1, c.copies + 1):
            rng = random.Random(f"{c.seed}\0{doc.id}\0{k}")
            op = self._ops[(k - 1) % len(self._ops)]
            n = max(1, int({"sr": c.alpha_sr, "ri": c.alpha_ri, "rs": c.alpha_rs, "rd": 0}[op] * len(words)))
            if op == "sr":
                new, changes = synonym_replacement(words, n, self._table, rng)
            elif op == "ri":
                new, changes = random_insertion(words, n, self._table, rng)
            elif op == "rs":
                new, changes = random_swap(words, n, rng)
            else:
                new, changes = random_deletion(words, c.p_rd, rng)
            meta = {**doc.metadata, "eda": {"of": doc.id, "copy": k, "operations": [op], "changes": changes}}
            verdict = Verdict(self.name, "keep", float(changes), f"copy {k} of {doc.id}: {op}, {changes} changes")
            out.append(Document(f"{doc.id}#eda{k}", " ".join(new), doc.source, doc.offset, meta,
                                [*provenance, verdict]))
        return out

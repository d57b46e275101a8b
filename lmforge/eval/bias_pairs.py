"""Minimal sentence pairs for the bias probes: each template (eval/bias_lexicon.py) is filled once
with a term of its stereotyped group and once with a term of its anti group; the two sentences
share everything but the term. Per template:

- word pairs: the dimension's frames with a word of each group ("the Muslim man" / "the Christian
  man": same frame; aligned dimensions take counterparts, "my father" / "my mother"), up to
  `WORD_PAIRS`, drawn without repeats;
- name pairs: when both groups have names, up to `NAME_PAIRS` pairs of names drawn without repeats
  ("Juan Ramírez" / "Brian Collins").

Deterministic: every draw uses numpy's generator seeded by (seed, crc32 of "dimension/template id"),
so a template's pairs do not depend on the other templates, and the name lists are read sorted.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass

import numpy as np

from lmforge.eval.bias_lexicon import SLOT, Dimension, Template
from lmforge.eval.bias_names import group_names

SEED = 0
WORD_PAIRS, NAME_PAIRS = 12, 12


@dataclass(frozen=True)
class BiasPair:
    """One minimal pair: `prefix + stereo_term + suffix` against `prefix + anti_term + suffix`."""

    dimension: str
    template: str
    kind: str  # "word" or "name"
    prefix: str
    stereo_term: str
    anti_term: str
    suffix: str

    @property
    def stereotyped(self) -> str:
        return self.prefix + self.stereo_term + self.suffix

    @property
    def anti(self) -> str:
        return self.prefix + self.anti_term + self.suffix


def _cap(term: str, at_start: bool) -> str:
    return term[:1].upper() + term[1:] if at_start else term


def _word_pairs(dim: Dimension, t: Template, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    a, b = dim.groups[t.stereotyped].words, dim.groups[t.anti].words
    if dim.aligned:
        words = list(zip(a, b))
    else:
        words = [(x, y) for x in a for y in b if x != y]
    options = [(f.format(x), f.format(y)) for f in dim.frames for x, y in words]
    return [options[i] for i in rng.permutation(len(options))[:n]]


def _name_pairs(names: dict[str, tuple[list[str], list[str]]], t: Template, rng: np.random.Generator,
                n: int) -> list[tuple[str, str]]:
    if t.stereotyped not in names or t.anti not in names:
        return []
    sides = []
    for g in (t.stereotyped, t.anti):
        firsts, lasts = names[g]
        k = min(n, len(firsts))
        chosen = [firsts[i] for i in rng.choice(len(firsts), size=k, replace=False)]
        if lasts:
            chosen = [f"{f} {lasts[i]}" for f, i in zip(chosen, rng.integers(len(lasts), size=k))]
        sides.append(chosen)
    return list(zip(*sides))


def template_pairs(dim: Dimension, t: Template, names: dict[str, tuple[list[str], list[str]]],
                   seed: int = SEED, word_pairs: int = WORD_PAIRS, name_pairs: int = NAME_PAIRS) -> list[BiasPair]:
    rng = np.random.default_rng([seed, zlib.crc32(f"{t.dimension}/{t.id}".encode())])
    at_start = t.text.startswith(SLOT)
    out = []
    for kind, terms in (("word", _word_pairs(dim, t, rng, word_pairs)),
                        ("name", _name_pairs(names, t, rng, name_pairs))):
        out.extend(BiasPair(t.dimension, t.id, kind, t.prefix, _cap(s, at_start), _cap(a, at_start), t.suffix)
                   for s, a in terms)
    return out


def build_pairs(lexicon: dict[str, Dimension], templates: list[Template], seed: int = SEED,
                word_pairs: int = WORD_PAIRS, name_pairs: int = NAME_PAIRS) -> list[BiasPair]:
    """Every template's pairs, in template order (names read once per dimension)."""
    names = {d: group_names({g: grp.names for g, grp in dim.groups.items() if grp.names is not None})
             for d, dim in lexicon.items()}
    return [p for t in templates
            for p in template_pairs(lexicon[t.dimension], t, names[t.dimension], seed, word_pairs, name_pairs)]


def pairs_digest(pairs: list[BiasPair]) -> str:
    """sha256 of the pairs: the same digest means the same probe sentences."""
    return hashlib.sha256(json.dumps([asdict(p) for p in pairs], ensure_ascii=False).encode()).hexdigest()

"""A small n-gram language model (interpolated Kneser–Ney), trained on a reference corpus, for
the `lm_score` step's perplexity.

Why Kneser–Ney and strings: it is the best-behaved classical smoother for small reference sets,
and written over strings it is short and fast in pure Python. Every unit (a lower-cased word or
punctuation mark, or a character) becomes one code point, so a document is a string and an
n-gram is a slice of it; the tables are plain dicts of slices. Reference units seen fewer than
`min_count` times become UNK, so unknown units in scored text have a trained probability and
every perplexity is finite. Discounts per order: Ney's D = n1 / (n1 + 2 n2).

    P(w | h) = (max(c(h w) - D, 0) + D * N1+(h .) * P(w | h')) / c(h)

with raw counts at the highest order, continuation counts (distinct left neighbours) below it,
and the uniform 1/V under the unigram; an unseen context leaves the shorter context's estimate.

Why a fingerprint: `lm_score` steps are built afresh for every shard, so `load_model` keeps the
trained model in the process (keyed by the reference files' paths, sizes and mtimes and the
options) and, when a cache directory is given, as a pickle there: a worker process trains at most
once per run, and with a cache only the first process of the first run trains.
"""

from __future__ import annotations

import functools
import json
import math
import pickle
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from lmforge.data.errors import DataError
from lmforge.data.pipeline.readers import JSONL_SUFFIXES, input_files, open_binary
from lmforge.data.words import scored_units
from lmforge.storage.atomic import atomic_open

__all__ = ["DEFAULT_REFERENCES", "NgramModel", "load_model", "reference_files", "reference_texts", "train_model"]

MODEL_FORMAT = 2  # 2: a Han or kana character is one word (1 made a whole Chinese clause one)
UNK, BOS, EOS = "\x01", "\x02", "\x03"  # reserved code points (real text below 0x10 is mapped to UNK)
_FIRST_CODE = 0x10
DEFAULT_REFERENCES = ("default:shakespeare", "default:kjv")


def units(text: str, unit: str) -> list[str] | str:
    """Words (lower-cased word runs, one per Han or kana character, and single punctuation marks:
    `lmforge/data/words.py`) or characters (whitespace runs collapsed to one space)."""
    return scored_units(text) if unit == "word" else " ".join(text.split())


def _code(k: int) -> str:
    c = _FIRST_CODE + k
    return chr(c if c < 0xD800 else c + 0x800)  # skip the surrogate range


@dataclass
class NgramModel:
    order: int
    unit: str
    codes: dict[str, str]          # unit -> its code point (char unit: the character itself)
    tables: list[dict[str, int]]   # [k]: k-gram -> count (raw at `order`, continuation below)
    contexts: list[dict[str, tuple[int, int]]]  # [k]: (k-1)-gram -> (sum of counts, distinct next units)
    discounts: list[float]         # [k]
    vocab: int                     # distinct codes that can be predicted (units + UNK + EOS)

    def encode(self, text: str) -> str:
        get = self.codes.get
        return BOS * (self.order - 1) + "".join(get(u, UNK) for u in units(text, self.unit)) + EOS

    def log_prob(self, s: str, i: int) -> float:
        """Natural log of P(s[i] | the order-1 code points before it)."""
        w = s[i]
        p = 1.0 / self.vocab
        for k in range(1, self.order + 1):
            h = s[i - k + 1:i]
            c = self.contexts[k].get(h)
            if c is None:
                break  # an unseen context: no longer one was seen either
            d = self.discounts[k]
            p = (max(self.tables[k].get(h + w, 0) - d, 0.0) + d * c[1] * p) / c[0]
        return math.log(p)

    def perplexity(self, text: str) -> tuple[float, int]:
        """(perplexity, units scored): every unit and the end of the document, not the padding."""
        ppl, n, _ = self.score(text)
        return ppl, n

    def score(self, text: str) -> tuple[float, int, int]:
        """(perplexity, units scored, units unknown to the reference). Why the last: UNK is one
        trained unit, so text the reference never saw (another language) reads as a run of likely
        UNKs, with a low perplexity that says nothing."""
        s = self.encode(text)
        start = self.order - 1
        total = sum(self.log_prob(s, i) for i in range(start, len(s)))
        n = len(s) - start
        return math.exp(-total / n), n, s.count(UNK)


def _discount(counts: Iterable[int]) -> float:
    hist = Counter(c for c in counts if c <= 2)
    n1, n2 = hist[1], hist[2]
    if n1 == 0 or n2 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2 * n2), 0.05), 0.95)


def train_model(texts: Iterable[str], order: int, unit: str, min_count: int = 2) -> NgramModel:
    """Interpolated Kneser–Ney tables of `order` from the reference texts."""
    docs = [units(t, unit) for t in texts]
    freq: Counter[str] = Counter()
    for d in docs:
        freq.update(d)
    kept = sorted(u for u, c in freq.items() if c >= min_count)
    if unit == "word":
        codes = {u: _code(i) for i, u in enumerate(kept)}
    else:
        codes = {u: u for u in kept if ord(u) >= _FIRST_CODE}
    model = NgramModel(order, unit, codes, [{} for _ in range(order + 1)], [{} for _ in range(order + 1)],
                       [0.0] * (order + 1), len(codes) + 2)
    top: Counter[str] = Counter()
    for d in docs:
        s = BOS * (order - 1) + "".join(codes.get(u, UNK) for u in d) + EOS
        top.update(s[i:i + order] for i in range(len(s) - order + 1))
    if not top:
        raise DataError("lm_score: the reference holds no text to train on")
    model.tables[order] = dict(top)
    for k in range(order - 1, 0, -1):  # continuation counts: distinct left neighbours
        model.tables[k] = dict(Counter(g[1:] for g in model.tables[k + 1]))
    for k in range(1, order + 1):
        ctx: dict[str, list[int]] = {}
        for g, c in model.tables[k].items():
            e = ctx.setdefault(g[:-1], [0, 0])
            e[0] += c
            e[1] += 1
        model.contexts[k] = {h: (e[0], e[1]) for h, e in ctx.items()}
        model.discounts[k] = _discount(model.tables[k].values())
    return model


def reference_files(reference: str) -> list[Path]:
    """The files a reference is read from (for the fingerprint; the default corpora's files too)."""
    if reference.startswith("default:"):
        from lmforge.data.corpus import kjv_file, shakespeare_files

        return shakespeare_files() if reference == "default:shakespeare" else [kjv_file()]
    path = Path(reference)
    if not path.exists():
        raise DataError(f"lm_score reference {reference}: does not exist")
    return input_files(path, "text")


def reference_texts(reference: str) -> Iterator[str]:
    """The reference's documents: a default corpus's documents, each line's "text" of a jsonl
    file (.jsonl, .gz, .zst), or each file of a directory (and any other file) as one text."""
    if reference.startswith("default:"):
        from lmforge.data.corpus import iter_kjv, iter_shakespeare

        docs = iter_shakespeare() if reference == "default:shakespeare" else iter_kjv()
        yield from (d["text"] for d in docs)
        return
    for path in reference_files(reference):
        if path.name.endswith(JSONL_SUFFIXES):
            with open_binary(path) as f:
                for n, line in enumerate(f, 1):
                    try:
                        text = json.loads(line)["text"] if line.strip() else ""
                    except (ValueError, KeyError, TypeError):
                        raise DataError(f"lm_score reference {path}:{n}: not a JSON object with a \"text\"") from None
                    if isinstance(text, str) and text:
                        yield text
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def fingerprint(reference: str, order: int, unit: str, min_count: int) -> str:
    files = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in reference_files(reference)]
    doc = {"format": MODEL_FORMAT, "reference": reference, "files": files, "order": order, "unit": unit,
           "min_count": min_count}
    return sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def load_model(reference: str, order: int, unit: str, min_count: int, cache_dir: str = "") -> NgramModel:
    """The model for these options: from this process's memory, else the cache directory's pickle,
    else trained now (and pickled there, temp-then-rename). Memoised on the reference files'
    fingerprint, so a changed reference is trained again; one model per process (they are large)."""
    return _load_model(fingerprint(reference, order, unit, min_count), reference, order, unit, min_count, cache_dir)


@functools.lru_cache(maxsize=1)
def _load_model(fp: str, reference: str, order: int, unit: str, min_count: int, cache_dir: str) -> NgramModel:
    model = None
    path = Path(cache_dir) / f"ngram-{fp}.pkl" if cache_dir else None
    if path is not None and path.is_file():
        try:
            with open(path, "rb") as f:
                model = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            model = None  # a damaged cache file is retrained and replaced
    if model is None:
        model = train_model(reference_texts(reference), order, unit, min_count)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path, "wb") as f:
                pickle.dump(model, f, protocol=pickle.HIGHEST_PROTOCOL)
    return model

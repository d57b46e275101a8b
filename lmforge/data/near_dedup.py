"""Near-duplicate documents: MinHash + LSH to find candidates, exact Jaccard to decide.

LSH on MinHash signatures only says two documents *probably* share many shingles; taking its
candidates at face value removes documents that are not near-duplicates (false positives grow with
more bands / fewer rows). Here every candidate pair is verified by the exact Jaccard similarity of
the two shingle sets, and only verified pairs (Jaccard >= threshold) join documents into a cluster
(union-find). A cluster keeps its smallest id; every other member maps to that kept id.

Pipeline, per batch of `_BATCH_DOCS` documents as they stream in (shingles.py):
  text -> shingles (word n-grams or character n-grams, lower-cased) -> one stable 64-bit hash each
  (a polynomial of the code points of each word, or splitmix64 of each character, combined per
  window; never Python's salted `hash()`), kept as a sorted unique uint64 array for verification
  -> MinHash signature, (a*x + b) mod 2^32 on the low 32 bits, for the whole batch in numpy ->
  one 64-bit key per band -> buckets; a document is verified against the earlier members of
  every bucket it lands in, then its signature is dropped.

Memory: the shingle set, 8 bytes per distinct shingle (about 8 x words for word shingles), plus
about 100 bytes per band in the bucket dicts; signatures are transient (one batch). Measured on
200-word passages with 16 bands: ~4 KB per document in all (1.6 KB of it the set), so 10^6 such
documents need ~4 GB. Shingle sets are compared through their 64-bit hashes: two different
shingles colliding has probability ~2^-64, the only approximation in the verification.
Cost: verification is one sorted-array intersection per candidate pair; exact copies bypass LSH,
but a bucket flooded by k near-identical (not identical) documents still costs ~k^2/2 checks.
Speed (bench/data_pipeline.py, 2 Zen 3 cores, ~200-word passages of the embedded corpus with
injected near-duplicates): ~11,000-13,500 documents/s, one process, at recall 0.993 and
precision 1.000 at threshold 0.8 (docs/benchmarks.md compares it with datasketch and datatrove).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from lmforge.config.checks import require
from lmforge.data import shingles
from lmforge.data.errors import DataError
from lmforge.data.shingles import splitmix64

_MASK32 = np.uint64(0xFFFFFFFF)
# Shingles permuted at once: 128 perms x 1024 x 4 B = 512 KiB, one buffer that stays in L2.
_CHUNK_COLS = 1024
_BATCH_DOCS = 256
# ...or fewer when their texts reach this many characters: shingling a batch holds ~40 bytes per
# character at its peak (code points, positions, per-character terms), so ~160 MB at most here.
_BATCH_CHARS = 1 << 22
_EMPTY = np.zeros(0, dtype=np.uint64)


@dataclass(frozen=True)
class NearDedupConfig:
    """MinHash/LSH parameters. With bands b and rows r = num_perm / b, a pair of Jaccard s becomes a
    candidate with probability 1 - (1 - s^r)^b: 128/16 (r = 8) finds s = 0.8 with p ~0.95 and
    s = 0.85 with p ~0.99, while pairs at s = 0.1 almost never meet (verification cost stays low)."""

    shingle: str = "word"  # "word": n-grams of \\w+ tokens; "char": n-grams of characters
    ngram: int = 5  # shingle size in words or characters
    num_perm: int = 128
    bands: int = 16
    threshold: float = 0.8  # exact Jaccard a verified pair must reach
    seed: int = 1

    def __post_init__(self) -> None:
        key = "near_dedup"
        require(self.shingle in ("word", "char"), f"{key}.shingle", self.shingle, "must be 'word' or 'char'")
        for name in ("ngram", "num_perm", "bands"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{key}.{name}", v,
                    "must be an integer > 0")
        require(self.bands <= self.num_perm and self.num_perm % self.bands == 0, f"{key}.bands",
                self.bands, f"must divide num_perm = {self.num_perm}")
        t = self.threshold
        require(isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 < t <= 1.0,
                f"{key}.threshold", t, "must be a number in (0, 1]")
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
                f"{key}.seed", self.seed, "must be an integer >= 0")

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands


@dataclass
class NearDedupResult:
    """Outcome: which documents to drop and why.

    duplicate_of: dropped id -> the kept id of its cluster (the cluster's smallest id, so one lookup
        always lands on a kept document, whatever order the documents came in).
    similarity: dropped id -> exact Jaccard with that kept document. Clusters are built from
        verified pairs transitively (A~B, B~C), so this can be below the threshold; `chained`
        counts those drops.
    candidates: distinct pairs that shared at least one LSH bucket; verified: those with exact
        Jaccard >= threshold; rejected_candidates: the rest (LSH false positives, not merged).
        Only the first document of each distinct shingle set enters LSH, so these counts are
        about distinct sets and do not depend on the input order.
    """

    duplicate_of: dict[str, str] = field(default_factory=dict)
    similarity: dict[str, float] = field(default_factory=dict)
    documents: int = 0
    empty: int = 0  # documents without any shingle: never matched
    exact: int = 0  # same shingle set as an earlier document: merged without LSH (Jaccard 1)
    candidates: int = 0
    verified: int = 0
    rejected_candidates: int = 0
    chained: int = 0

    @property
    def kept(self) -> int:
        return self.documents - len(self.duplicate_of)


def shingle_hash_sets(texts: list[str], cfg: NearDedupConfig) -> list[np.ndarray]:
    """For each text, the sorted unique uint64 hashes of its shingles: the set verification
    compares. Stable across processes and machines (see shingles.py: one numpy pass per batch)."""
    return shingles.shingle_hash_sets(texts, cfg.shingle, cfg.ngram)


def shingle_hashes(text: str, cfg: NearDedupConfig) -> np.ndarray:
    """The shingle-hash set of one text (see `shingle_hash_sets`)."""
    return shingle_hash_sets([text], cfg)[0]


def permutations(cfg: NearDedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of h_k(x) = (a_k*x + b_k) mod 2^32: a_k odd (so h_k is a bijection of the
    32-bit values), b_k any, uint32; derived from the seed by blake2b so they are the same on
    every numpy version and machine."""
    a = np.empty(cfg.num_perm, dtype=np.uint32)
    b = np.empty(cfg.num_perm, dtype=np.uint32)
    for i in range(cfg.num_perm):
        d = hashlib.blake2b(f"lmforge-minhash32:{cfg.seed}:{i}".encode(), digest_size=8).digest()
        a[i] = int.from_bytes(d[:4], "little") | 1
        b[i] = int.from_bytes(d[4:], "little")
    return a, b


def minhash_signatures(hash_sets: list[np.ndarray], a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signatures (len(hash_sets), num_perm), uint32, of many documents in one pass.

    h_k(x) = (a_k*x + b_k) mod 2^32 for x the low 32 bits of each shingle hash (already a mixed
    64-bit hash, so x is uniform): the signature of a document is min_k over its shingles. Why
    32-bit multiply-add instead of the textbook (a*x + b) mod (2^61 - 1): the LSH only needs
    P(two signatures agree in a row) ~ Jaccard, which this gives on hashed inputs (on the 1,957
    injected pairs of bench/data_pipeline.py, Jaccard 0.66-0.95: agreement - Jaccard has mean
    -0.00004 and standard deviation 0.033, the binomial sqrt(J(1-J)/128) is 0.032; recall 0.993
    as with mod p), and every candidate is verified by exact Jaccard anyway. In uint32, numpy runs
    its two passes as 8-lane AVX2; the exact mod-p product needed 12 uint64 passes without a
    64-bit vector multiply, ~10x the time. Layout: permutations x shingles, so each document's shingles are a
    contiguous run of columns and one `minimum.reduceat` gives every document's minima.
    A document with no shingles gets all-max (it is never inserted in LSH).
    """
    sig = np.full((len(hash_sets), len(a)), np.iinfo(np.uint32).max, dtype=np.uint32)
    sizes = np.fromiter(map(len, hash_sets), dtype=np.int64, count=len(hash_sets))
    docs = np.flatnonzero(sizes)
    if not len(docs):
        return sig
    x = (np.concatenate([hash_sets[i] for i in docs.tolist()]) & _MASK32).astype(np.uint32)
    starts = np.cumsum(sizes[docs]) - sizes[docs]
    ac, bc = a.astype(np.uint32)[:, None], b.astype(np.uint32)[:, None]
    buf = np.empty((len(a), min(_CHUNK_COLS, len(x))), dtype=np.uint32)
    for lo in range(0, len(x), _CHUNK_COLS):
        hi = min(lo + _CHUNK_COLS, len(x))
        # the documents with a shingle in [lo, hi): first, and the last one that starts before hi
        d0 = int(np.searchsorted(starts, lo, side="right")) - 1
        d1 = int(np.searchsorted(starts, hi, side="left"))
        seg = np.maximum(starts[d0:d1], lo) - lo
        v = buf[:, :hi - lo]
        np.multiply(ac, x[None, lo:hi], out=v)
        v += bc
        mins = np.minimum.reduceat(v, seg, axis=1).T  # (documents in the chunk, num_perm)
        rows = docs[d0:d1]
        sig[rows] = np.minimum(sig[rows], mins)  # a document cut by a chunk edge: min of both parts
    return sig


def band_keys(sig: np.ndarray, bands: int) -> np.ndarray:
    """One 64-bit key per (document, band). A key collision only adds a candidate, which
    verification then rejects, so 64 bits are plenty."""
    n, p = sig.shape
    r = p // bands
    s = sig.reshape(n, bands, r).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = np.zeros((n, bands), dtype=np.uint64)
        for j in range(r):
            h = splitmix64(h ^ s[:, :, j])
        return h ^ np.arange(bands, dtype=np.uint64)[None, :]  # same rows in two bands: two keys


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    """Exact Jaccard of two sorted unique hash arrays."""
    if not len(x) and not len(y):
        return 0.0
    inter = len(np.intersect1d(x, y, assume_unique=True))
    return inter / (len(x) + len(y) - inter)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> None:
        self.parent.append(len(self.parent))

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


class NearDedup:
    """Streaming detector: `add` documents (shingle sets and signatures are computed in batches of
    `_BATCH_DOCS` documents or `_BATCH_CHARS` characters, so at most that many texts are held; a
    longer single text is one batch), then `result()`. Documents are verified against earlier
    ones as they are inserted, so the outcome depends only on the set of (id, text), not on their
    order."""

    def __init__(self, cfg: NearDedupConfig) -> None:
        self.cfg = cfg
        self._a, self._b = permutations(cfg)
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._sets: list[np.ndarray] = []
        # band key -> the one document in it, or a list once a second arrives (most buckets hold
        # one document; a one-element list would cost 88 bytes more per document and band)
        self._buckets: list[dict[int, int | list[int]]] = [{} for _ in range(cfg.bands)]
        self._pending: list[tuple[int, str]] = []  # (index, text) until the next flush
        self._pending_chars = 0
        self._uf = _UnionFind()
        self._verified = 0
        self._candidates = 0
        self._empty = 0
        self._exact: dict[bytes, int] = {}  # shingle-set digest -> first document with that set
        self._exact_hits = 0

    def add(self, doc_id: str, text: str) -> None:
        if doc_id in self._index:
            raise DataError(f"near-dedup: document id {doc_id!r} appears twice; ids must be unique")
        i = len(self._ids)
        self._index[doc_id] = i
        self._ids.append(doc_id)
        self._sets.append(_EMPTY)  # filled at the next flush
        self._uf.add()
        self._pending.append((i, text))
        self._pending_chars += len(text)
        if len(self._pending) >= _BATCH_DOCS or self._pending_chars >= _BATCH_CHARS:
            self._flush()

    def _flush(self) -> None:
        sets = shingle_hash_sets([t for _, t in self._pending], self.cfg)
        fresh: list[int] = []
        for (i, _), sh in zip(self._pending, sets):
            self._sets[i] = sh
            if not len(sh):
                self._empty += 1
                continue
            # Exact copies skip LSH: a bucket of k copies would otherwise cost k^2/2 verifications.
            first = self._exact.setdefault(hashlib.blake2b(sh.tobytes(), digest_size=16).digest(), i)
            if first != i:
                self._exact_hits += 1
                self._uf.union(i, first)
            else:
                fresh.append(i)
        self._pending = []
        self._pending_chars = 0
        sig = minhash_signatures([self._sets[i] for i in fresh], self._a, self._b)
        keys = band_keys(sig, self.cfg.bands).tolist()
        for i, row in zip(fresh, keys):
            seen: set[int] = set()
            for band, key in enumerate(row):
                bucket = self._buckets[band]
                members = bucket.setdefault(key, i)
                if isinstance(members, int):
                    if members != i:
                        seen.add(members)
                        bucket[key] = [members, i]
                else:
                    seen.update(members)
                    members.append(i)
            for j in sorted(seen):
                self._verify(j, i)

    def _verify(self, j: int, i: int) -> None:
        self._candidates += 1
        s = jaccard(self._sets[j], self._sets[i])
        if s >= self.cfg.threshold:
            self._verified += 1
            self._uf.union(i, j)

    def result(self) -> NearDedupResult:
        """Clusters of verified pairs; each keeps its smallest id (string order)."""
        self._flush()
        clusters: dict[int, list[int]] = {}
        for i in range(len(self._ids)):
            clusters.setdefault(self._uf.find(i), []).append(i)
        res = NearDedupResult(documents=len(self._ids), empty=self._empty, exact=self._exact_hits,
                              candidates=self._candidates, verified=self._verified,
                              rejected_candidates=self._candidates - self._verified)
        for members in clusters.values():
            keep, *dropped = sorted(members, key=lambda m: self._ids[m])
            for m in dropped:
                s = res.similarity[self._ids[m]] = jaccard(self._sets[m], self._sets[keep])
                res.duplicate_of[self._ids[m]] = self._ids[keep]
                res.chained += s < self.cfg.threshold
        res.duplicate_of = dict(sorted(res.duplicate_of.items()))
        res.similarity = dict(sorted(res.similarity.items()))
        return res


def find_near_duplicates(docs: Iterable[tuple[str, str]], cfg: NearDedupConfig | None = None
                         ) -> NearDedupResult:
    """(id, text) pairs -> which ids are near-duplicates of which kept id (see NearDedupResult)."""
    nd = NearDedup(cfg or NearDedupConfig())
    for doc_id, text in docs:
        nd.add(doc_id, text)
    return nd.result()


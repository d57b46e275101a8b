"""The `domain` step: TF-IDF features label each document's domain into `metadata["domain"]`.

A global step (base.py): the vectoriser and the domain centroids are fitted on the whole
corpus in `decide`, in one process, so the labels are the same for any worker count or executor;
every shard then applies them (a "keep" verdict whose score is the similarity margin between the
chosen domain and the runner-up, and whose detail names both). Nothing is dropped.

Features: scikit-learn's `TfidfVectorizer` over character n-grams inside words (`char_wb`, 1-3 by
default) of the first `max_chars` characters of each document, so a script without spaces
(Chinese) is featurised like English, and memory is bounded by documents x max_chars. Rows are
L2-normalised, so a dot product is a cosine similarity.

Two methods:
  keywords  each domain is seeded by a keyword list (`keywords = ["bible: lord god israel", ...]`):
            a document whose keyword hits name one domain strictly more than any other seeds it;
            the centroid of a domain's seeds labels every document by cosine similarity, and
            `rounds` refits recompute the centroids from all documents so labelled (k-means from
            keyword-seeded centres: a document without any keyword still gets the closest domain).
            Latin-script keywords match whole words, case-insensitively; others (Chinese) match
            as substrings.
  kmeans    `n_clusters` clusters (sklearn KMeans, fixed `seed`) of the documents' LSA vectors
            (TruncatedSVD to `svd_dims`, L2-normalised: on raw TF-IDF rows k-means split the
            Chinese documents in two and merged Shakespeare with the KJV), named by `names` in the
            order of each cluster's first document (else cluster0, cluster1, ...).

Statistics per domain (documents, characters, seed documents, mean margin) go to the step's
entry in stats.json. scikit-learn is imported only when the step runs (the `data` extra).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from lmforge.config.loader import ConfigError
from lmforge.data.errors import DataError
from lmforge.data.pipeline.base import Decisions, GlobalStep
from lmforge.data.pipeline.document import Document

__all__ = ["DomainConfig", "DomainStep", "parse_keywords"]

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def parse_keywords(entries: list[str]) -> dict[str, list[str]]:
    """["name: kw1 kw2", ...] -> {name: [kw1, kw2]} (ValueError naming the bad entry)."""
    out: dict[str, list[str]] = {}
    for entry in entries:
        name, sep, words = entry.partition(":")
        name, kws = name.strip(), words.split()
        if not sep or not _NAME.match(name) or not kws:
            raise ValueError(f"{entry!r} must be 'name: keyword keyword ...' (name: letters, digits, _ or -)")
        if name in out:
            raise ValueError(f"domain {name!r} is listed twice")
        out[name] = kws
    return out


@dataclass(frozen=True)
class DomainConfig:
    method: Literal["keywords", "kmeans"] = "keywords"
    keywords: list[str] = field(default_factory=list)  # keywords: "domain: kw kw ...", one entry per domain
    n_clusters: int = 0       # kmeans: how many domains
    names: list[str] = field(default_factory=list)  # kmeans: their names, in order of first document
    analyzer: Literal["char_wb", "char", "word"] = "char_wb"
    ngram_min: int = 1
    ngram_max: int = 3
    max_features: int = 20000
    max_chars: int = 1000     # features from each document's first max_chars characters
    rounds: int = 3           # keywords: centroid refits after the keyword seeding
    seed: int = 0             # kmeans
    svd_dims: int = 50        # kmeans: LSA dimensions

    def validate(self, prefix: str, where: str | None) -> None:
        if self.method == "keywords":
            try:
                domains = parse_keywords(self.keywords)
            except ValueError as e:
                raise ConfigError(prefix + "keywords", self.keywords, str(e), where) from None
            if not domains:
                raise ConfigError(prefix + "keywords", self.keywords,
                                  'method "keywords" needs at least one "domain: keyword ..." entry', where)
        else:
            if self.n_clusters < 2:
                raise ConfigError(prefix + "n_clusters", self.n_clusters, 'must be >= 2 with method "kmeans"', where)
            if self.names and (len(self.names) != self.n_clusters or len(set(self.names)) != len(self.names)
                               or not all(_NAME.match(n) for n in self.names)):
                raise ConfigError(prefix + "names", self.names, f"must be {self.n_clusters} distinct names "
                                  "(letters, digits, _ or -), or empty", where)
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(prefix + "ngram_max", self.ngram_max, f"must be >= ngram_min ({self.ngram_min}) >= 1",
                              where)
        for key in ("max_features", "max_chars"):
            if getattr(self, key) < 1:
                raise ConfigError(prefix + key, getattr(self, key), "must be >= 1", where)
        if self.svd_dims < 2:
            raise ConfigError(prefix + "svd_dims", self.svd_dims, "must be >= 2", where)
        if self.rounds < 0:
            raise ConfigError(prefix + "rounds", self.rounds, "must be >= 0", where)


def _keyword_pattern(words: list[str]) -> re.Pattern[str]:
    parts = [rf"\b{re.escape(w.lower())}\b" if w.isascii() and w.isalnum() else re.escape(w.lower())
             for w in sorted(set(words), key=lambda w: (-len(w), w))]
    return re.compile("|".join(parts))


def _margins(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: best column, runner-up column, best minus runner-up."""
    order = np.argsort(-sim, axis=1, kind="stable")
    best = order[:, 0]
    second = order[:, 1] if sim.shape[1] > 1 else order[:, 0]
    rows = np.arange(len(sim))
    margin = sim[rows, best] - (sim[rows, second] if sim.shape[1] > 1 else 0.0)
    return best, second, margin


class DomainStep(GlobalStep):
    """Labels every document's domain (see the module docstring); drops nothing."""

    name = "domain"

    def decide(self, docs: Iterable[Document], workdir: Path) -> Decisions:
        c: DomainConfig = self.config
        domains = parse_keywords(c.keywords) if c.method == "keywords" else {}
        patterns = {d: _keyword_pattern(kws) for d, kws in domains.items()}
        ids: list[str] = []
        heads: list[str] = []
        chars: list[int] = []
        seeds: list[int] = []  # index of the domain the keywords name, -1 when none or a tie
        for doc in docs:
            ids.append(doc.id)
            heads.append(doc.text[:c.max_chars])
            chars.append(len(doc.text))
            if patterns:
                low = doc.text.lower()
                hits = [len(p.findall(low)) for p in patterns.values()]
                top = max(hits)
                seeds.append(hits.index(top) if top > 0 and hits.count(top) == 1 else -1)
        if not ids:
            return Decisions(self.name, keep_detail="no documents", label_key="domain",
                             stats={"method": c.method, "documents": 0, "domains": {}})
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(analyzer=c.analyzer, ngram_range=(c.ngram_min, c.ngram_max),
                              max_features=c.max_features, sublinear_tf=True, dtype=np.float64)
        x = vec.fit_transform(heads)  # rows L2-normalised
        del heads
        if c.method == "keywords":
            names = list(domains)
            seed_arr = np.asarray(seeds)
            empty = [names[i] for i in range(len(names)) if not (seed_arr == i).any()]
            if empty:
                raise DataError(f"domain step: no document is seeded by the keywords of {', '.join(empty)} "
                                "(none has more hits for it than for any other domain); change its keywords")
            label = seed_arr
            sim = np.zeros((len(ids), len(names)))
            centroids = np.zeros((len(names), x.shape[1]))
            for _ in range(c.rounds + 1):  # round 0: every domain has seeds (checked above)
                for i in range(len(names)):
                    rows = np.flatnonzero(label == i)
                    if rows.size:  # a domain left empty by a refit keeps its previous centre
                        centroids[i] = np.asarray(x[rows].mean(axis=0)).ravel()
                centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
                sim = np.asarray(x @ centroids.T)
                label, _, _ = _margins(sim)
            best, second, margin = _margins(sim)
        else:
            from sklearn.cluster import KMeans
            from sklearn.decomposition import TruncatedSVD
            from sklearn.preprocessing import normalize

            dims = min(c.svd_dims, x.shape[1] - 1, len(ids) - 1)
            if dims < 1 or len(ids) < c.n_clusters:
                raise DataError(f"domain step: {len(ids)} documents and {x.shape[1]} features are too few for "
                                f"{c.n_clusters} k-means clusters")
            x = normalize(TruncatedSVD(dims, random_state=c.seed).fit_transform(x))
            km = KMeans(n_clusters=c.n_clusters, random_state=c.seed, n_init=4).fit(x)
            raw = km.labels_
            first = {int(k): int(np.argmax(raw == k)) for k in np.unique(raw)}
            order = sorted(first, key=first.get)  # clusters in order of their first document
            order += [k for k in range(c.n_clusters) if k not in first]
            names = list(c.names) or [f"cluster{i}" for i in range(c.n_clusters)]
            dist = km.transform(x)[:, order]  # columns in name order
            best, second, margin = _margins(-dist)
        d = Decisions(self.name, keep_detail="no domain", label_key="domain")
        per = {n: {"documents": 0, "chars": 0, "seed_documents": 0, "mean_margin": 0.0} for n in names}
        for i, doc_id in enumerate(ids):
            name, m = names[best[i]], float(margin[i])
            d.labels[doc_id] = (name, round(m, 6), f"domain {name} (margin {m:.4f} over {names[second[i]]})")
            s = per[name]
            s["documents"] += 1
            s["chars"] += chars[i]
            s["mean_margin"] += m
        for i, name in enumerate(names):
            s = per[name]
            s["mean_margin"] = round(s["mean_margin"] / max(s["documents"], 1), 6)
            if seeds:
                s["seed_documents"] = int(np.sum(np.asarray(seeds) == i))
        d.stats = {"method": c.method, "documents": len(ids), "features": int(x.shape[1]), "domains": per}
        return d

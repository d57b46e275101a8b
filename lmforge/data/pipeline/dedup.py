"""Deduplication steps: `exact_dedup` (content hash, across all shards and across runs) and
`near_dedup` (MinHash + LSH, every candidate pair verified by exact Jaccard: `data/near_dedup.py`).

Why these are "global" steps, unlike `normalize` or `quality`: whether a document is a duplicate
depends on every other document, in every shard. The executor therefore runs them in two halves
(base.py): `decide` sees the whole corpus once, in shard order, in one process, and writes
its decisions (which ids to drop, and the id each one duplicates) to a file; then every shard
applies them in parallel through `DecisionStep`, which leaves the same provenance verdicts as any
other step. The decisions depend only on the documents and their order, never on the worker count
or executor. `GLOBAL_STEP_TYPES` also registers `domain` (domains.py), a global step that labels.

Across runs: `exact_dedup` may name an `index` file of content hashes kept by earlier runs; a
document whose hash is there is dropped as a duplicate of that run's document. The run adds its
own first occurrences when it finishes (under a lock, temp-then-rename). Entries carry the run's
id, so a killed run that is resumed does not find its own documents in the index.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lmforge.config.loader import ConfigError
from lmforge.data.near_dedup import NearDedup, NearDedupConfig
from lmforge.data.pipeline.base import Decisions, DecisionStep, GlobalStep, load_decisions, save_decisions
from lmforge.data.pipeline.document import Document, content_hash
from lmforge.data.pipeline.domains import DomainConfig, DomainStep
from lmforge.data.pipeline.lm_score import LmScoreConfig, LmScoreGlobalStep
from lmforge.data.pipeline.synthetic import SyntheticConfig, SyntheticStep
from lmforge.storage.atomic import atomic_open

__all__ = ["GLOBAL_STEP_TYPES", "Decisions", "DecisionStep", "ExactDedupConfig", "GlobalStep",
           "NearDedupStepConfig", "load_decisions", "save_decisions"]


# ---------------------------------------------------------------- exact

FIRST_SEEN = "first_seen.jsonl"  # this run's first occurrence of each hash, added to the index at the end


@dataclass(frozen=True)
class ExactDedupConfig:
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("index",)  # relative to the TOML (config.py)
    index: str = ""  # a cross-run hash index file ("" = this run only); relative to the TOML file

    def validate(self, prefix: str, where: str | None) -> None:
        if self.index and Path(self.index).is_dir():
            raise ConfigError(prefix + "index", self.index, "must be a file path, not a directory", where)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the index, so two runs finishing together both add their hashes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_index(path: Path) -> dict[str, tuple[str, str]]:
    """content hash -> (document id, run id) of an index file (missing: empty)."""
    out: dict[str, tuple[str, str]] = {}
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                obj = json.loads(line)
                out.setdefault(obj["hash"], (obj["id"], obj["run"]))
            except (ValueError, KeyError, TypeError):
                from lmforge.data.errors import DataError

                raise DataError(f"{path}:{n}: not a line of an lmforge exact-dedup index; "
                                "restore the file or point exact_dedup.index elsewhere") from None
    return out


class ExactDedupStep(GlobalStep):
    """Drops every document whose normalised content hash (`document.content_hash`) was seen
    before: earlier in this run (shard order), or in an earlier run recorded in the index."""

    name = "exact_dedup"

    def decide(self, docs: Iterable[Document], workdir: Path) -> Decisions:
        index = Path(self.config.index) if self.config.index else None
        earlier = {h: v for h, v in read_index(index).items() if v[1] != self.run_id} if index else {}
        seen: dict[str, str] = {}
        d = Decisions(self.name, keep_detail="first of its content hash")
        for doc in docs:
            h = content_hash(doc.text)
            if h in earlier:
                first, run = earlier[h]
                d.drops[doc.id] = (first, 1.0, f"same content as {first} (earlier run {run[:12]})")
            elif h in seen:
                d.drops[doc.id] = (seen[h], 1.0, f"same content as {seen[h]}")
            else:
                seen[h] = doc.id
        d.stats = {"documents": len(seen) + len(d.drops), "unique": len(seen), "duplicates": len(d.drops),
                   "of_earlier_runs": sum(1 for v in d.drops.values() if "earlier run" in v[2])}
        if index:
            with atomic_open(workdir / FIRST_SEEN, "w", encoding="utf-8") as f:
                for h, i in seen.items():
                    f.write(json.dumps({"hash": h, "id": i}) + "\n")
        return d

    def finish_run(self, workdir: Path) -> None:
        if not self.config.index:
            return
        index = Path(self.config.index)
        with _locked(index):
            known = read_index(index)
            with open(workdir / FIRST_SEEN, encoding="utf-8") as f:
                first = (json.loads(line) for line in f)
                new = [(o["hash"], o["id"]) for o in first if o["hash"] not in known]
            if not new:
                return
            with atomic_open(index, "wb") as f:
                if index.exists():
                    with open(index, "rb") as old:
                        f.write(old.read())
                for h, i in new:
                    f.write((json.dumps({"hash": h, "id": i, "run": self.run_id}) + "\n").encode())


# ---------------------------------------------------------------- near


@dataclass(frozen=True)
class NearDedupStepConfig:
    """The `data/near_dedup.py` parameters (see `NearDedupConfig` for how bands and rows set the
    detection probability); every candidate is verified by exact Jaccard >= threshold."""

    shingle: str = "word"  # "word": runs of \w (a whole clause of Chinese); "char" for unspaced scripts
    ngram: int = 5
    num_perm: int = 128
    bands: int = 16
    threshold: float = 0.8
    seed: int = 1

    def validate(self, prefix: str, where: str | None) -> None:
        try:
            self.detector_config()
        except ConfigError as e:
            raise ConfigError(prefix + e.key.split(".", 1)[-1], e.value, e.allowed, where) from None

    def detector_config(self) -> NearDedupConfig:
        return NearDedupConfig(**dataclasses.asdict(self))


class NearDedupStep(GlobalStep):
    """Near-duplicates (verified Jaccard >= threshold, clustered transitively): each cluster keeps
    its smallest id; every other member is dropped naming it, with its exact Jaccard as score."""

    name = "near_dedup"

    def decide(self, docs: Iterable[Document], workdir: Path) -> Decisions:
        detector = NearDedup(self.config.detector_config())
        for doc in docs:
            detector.add(doc.id, doc.text)
        res = detector.result()
        d = Decisions(self.name, keep_detail="no verified near-duplicate kept before it")
        for dup, kept in res.duplicate_of.items():
            s = res.similarity[dup]
            d.drops[dup] = (kept, round(s, 6), f"jaccard {s:.4f} with {kept}")
        d.stats = {"documents": res.documents, "duplicates": len(res.duplicate_of), "candidates": res.candidates,
                   "verified": res.verified, "rejected_candidates": res.rejected_candidates,
                   "exact_shingle_sets": res.exact, "chained": res.chained}
        return d


GLOBAL_STEP_TYPES: dict[str, tuple[type[GlobalStep], type]] = {
    "exact_dedup": (ExactDedupStep, ExactDedupConfig),
    "near_dedup": (NearDedupStep, NearDedupStepConfig),
    "lm_score": (LmScoreGlobalStep, LmScoreConfig),  # with keep_top_fraction (`is_global`); else STEP_TYPES
    "domain": (DomainStep, DomainConfig),  # labels, drops nothing: domains.py
    "synthetic": (SyntheticStep, SyntheticConfig),  # P(machine-generated): synthetic.py
}

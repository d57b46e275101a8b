"""`harmful`: the safety filter's data gate: drops documents with harmful content of the policy's
categories (lmforge/safety: the same TOML, fold and matcher as the prompt and output gates).

    [[steps]]
    type = "harmful"
    filter = "safety/filter.toml"   # the filter TOML (relative to the pipeline TOML)
    categories = []                 # the categories that drop (empty: all of the policy's)
    max_hits = 0                    # drop when a document has more than this many matches

A drop's verdict names the categories and their counts ("harmful: violence x2"), never the
matched text or term: the lexicon is policy, and a rejects file should not teach its evasions.
Kept documents carry their match count as score (below max_hits, or 0).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from lmforge.config.loader import ConfigError
from lmforge.data.pipeline.base import DropSink, Step
from lmforge.data.pipeline.document import Document
from lmforge.safety.filter_config import load_filter_config
from lmforge.safety.gates import ContentFilter

__all__ = ["HarmfulConfig", "HarmfulStep"]


@dataclass(frozen=True)
class HarmfulConfig:
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("filter",)
    filter: str = ""
    categories: list[str] = field(default_factory=list)
    max_hits: int = 0

    def validate(self, prefix: str, where: str | None) -> None:
        if not self.filter or not Path(self.filter).is_file():
            raise ConfigError(prefix + "filter", self.filter, "must name a safety filter TOML file", where)
        if self.max_hits < 0:
            raise ConfigError(prefix + "max_hits", self.max_hits, "must be >= 0", where)
        known = [c.name for c in load_filter_config(self.filter).categories]
        for c in self.categories:
            if c not in known:
                raise ConfigError(prefix + "categories", c, f"not a category of {self.filter}: {', '.join(known)}",
                                  where)


@functools.lru_cache(maxsize=4)
def _filter(path: str, mtime_ns: int) -> ContentFilter:
    """The compiled filter, once per process while the file is unchanged (steps are built per shard)."""
    return ContentFilter(load_filter_config(path))


class HarmfulStep(Step):
    name = "harmful"

    def __init__(self, config: HarmfulConfig, drop: DropSink):
        super().__init__(config, drop)
        self._filter = _filter(config.filter, Path(config.filter).stat().st_mtime_ns)
        self._counted = set(config.categories)

    def process(self, doc: Document) -> bool:
        found = Counter(h.category for h in self._filter.hits(doc.text)
                        if not self._counted or h.category in self._counted)
        hits = sum(found.values())
        detail = ", ".join(f"{c} x{n}" for c, n in sorted(found.items())) or "no matches"
        if hits > self.config.max_hits:
            return self.reject(doc, "harmful", float(hits), detail)
        return self.keep(doc, float(hits), detail)

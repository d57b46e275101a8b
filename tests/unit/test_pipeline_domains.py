"""The `domain` pipeline step: TF-IDF labels seeded by keywords (or k-means) recover the sources of
a mixed Shakespeare / KJV / Chinese corpus, documents without any keyword included; the labels and
per-domain statistics do not depend on the worker count; bad options are one config error."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from lmforge.config import ConfigError
from lmforge.data.corpus import iter_chinese, iter_kjv, iter_shakespeare
from lmforge.data.pipeline.config import parse_pipeline
from lmforge.data.pipeline.executor import run_pipeline

KEYWORDS = ["shakespeare: thou thee thy sir enter exeunt", "bible: god israel unto begat",
            "chinese: 的 中国 发展"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("domains")
    docs = [*itertools.islice(iter_shakespeare(), 0, 1200, 20), *itertools.islice(iter_kjv(), 0, 1189, 20),
            *itertools.islice(iter_chinese(), 0, 300, 6)]
    with open(root / "in.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d["text"], "truth": d["source"]}, ensure_ascii=False) + "\n")
    return root


def _run(root: Path, out: str, step: dict, workers: int = 1) -> tuple[list[dict], dict]:
    cfg = parse_pipeline({"output_dir": out, "workers": workers, "docs_per_shard": 25,
                          "inputs": [{"path": "in.jsonl"}], "steps": [{"type": "domain", **step}]}, root, "test")
    res = run_pipeline(cfg)
    docs = [json.loads(line) for line in open(res.output, encoding="utf-8")]
    return docs, json.loads((root / out / "stats.json").read_text())["steps"]["domain"]["global"]


def _truth(root: Path) -> list[str]:
    names = {"shakespeare": "shakespeare", "kjv": "bible", "chinese": "chinese"}
    return [names[json.loads(line)["truth"]] for line in open(root / "in.jsonl", encoding="utf-8")]


def test_keyword_seeded_labels_recover_the_sources_for_any_worker_count(corpus: Path) -> None:
    docs, stats = _run(corpus, "one", {"keywords": KEYWORDS})
    truth = _truth(corpus)
    labels = [d["metadata"]["domain"] for d in docs]
    assert len(labels) == len(truth)
    wrong = [i for i, (a, b) in enumerate(zip(labels, truth)) if a != b]
    assert len(wrong) <= len(truth) // 50, wrong  # >= 98% agree with where the text came from
    verdict = docs[0]["provenance"][-1]
    assert verdict["step"] == "domain" and verdict["verdict"] == "keep" and verdict["score"] > 0
    assert verdict["detail"].startswith(f"domain {labels[0]} (margin ")
    # per-domain statistics: documents and characters add up to the corpus
    assert sum(s["documents"] for s in stats["domains"].values()) == len(truth)
    assert sum(s["chars"] for s in stats["domains"].values()) == sum(len(d["text"]) for d in docs)
    assert set(stats["domains"]) == {"shakespeare", "bible", "chinese"}
    assert all(s["seed_documents"] > 0 for s in stats["domains"].values())
    # fitted on the whole corpus once: identical bytes with 3 workers
    _run(corpus, "three", {"keywords": KEYWORDS}, workers=3)
    assert (corpus / "one" / "output.jsonl").read_bytes() == (corpus / "three" / "output.jsonl").read_bytes()


def test_documents_without_keywords_get_the_nearest_domain(corpus: Path) -> None:
    """One keyword per domain, one of them ambiguous ("thou" is in the KJV too): many documents
    have no keyword and some are seeded wrongly; the centroid refits label them as their source."""
    one = ["shakespeare: thou", "bible: israel", "chinese: 发展"]
    docs, stats = _run(corpus, "one-keyword", {"keywords": one})
    truth = _truth(corpus)
    seeded = sum(s["seed_documents"] for s in stats["domains"].values())
    assert seeded <= len(truth) - 20
    assert stats["domains"]["shakespeare"]["seed_documents"] > truth.count("shakespeare")  # KJV docs among them
    agree = sum(d["metadata"]["domain"] == t for d, t in zip(docs, truth))
    assert agree >= len(truth) * 0.98


def test_kmeans_clusters_the_sources(corpus: Path) -> None:
    docs, stats = _run(corpus, "km", {"method": "kmeans", "n_clusters": 3, "names": ["a", "b", "c"]})
    truth = _truth(corpus)
    # clusters are named in order of their first document: the corpus starts with Shakespeare, then KJV
    assert docs[0]["metadata"]["domain"] == "a"
    by_cluster: dict[str, list[str]] = {}
    for d, t in zip(docs, truth):
        by_cluster.setdefault(d["metadata"]["domain"], []).append(t)
    purity = sum(max(v.count(x) for x in set(v)) for v in by_cluster.values()) / len(truth)
    assert purity >= 0.95, {k: {x: v.count(x) for x in set(v)} for k, v in by_cluster.items()}
    assert stats["method"] == "kmeans" and set(stats["domains"]) == {"a", "b", "c"}


@pytest.mark.parametrize("step, key", [
    ({"keywords": []}, "steps[0].keywords"),
    ({"keywords": ["no colon here"]}, "steps[0].keywords"),
    ({"keywords": ["a: x", "a: y"]}, "steps[0].keywords"),
    ({"method": "kmeans", "n_clusters": 1}, "steps[0].n_clusters"),
    ({"method": "kmeans", "n_clusters": 2, "names": ["x"]}, "steps[0].names"),
    ({"keywords": ["a: x"], "ngram_min": 3, "ngram_max": 2}, "steps[0].ngram_max"),
])
def test_bad_options_are_one_config_error(corpus: Path, step: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_pipeline({"output_dir": "x", "inputs": [{"path": "in.jsonl"}], "steps": [{"type": "domain", **step}]},
                       corpus, "test")
    assert e.value.key == key

"""Near-dedup throughput at equal recall: lmforge.data.near_dedup against datasketch used naively
and against datatrove's MinHash pipeline, on the same corpus, in the same run.

Corpus: the embedded corpus (Shakespeare + KJV, `corpus.default_documents()`) cut into passages
of 100-300 words (~200 on average), and for every 4th passage one edited copy at Jaccard 0.95,
0.9, 0.85 or 0.68 with it (`lmforge.data.dup_injection`: exact Jaccard of word 5-grams, computed
with Python sets), placed after all originals. Full size: 7,825 passages + 1,957 copies = 9,782
documents; `--docs N` takes evenly spaced passages so that there are about N documents in all.

The three methods, all at threshold 0.8 with word 5-gram shingles of lower-cased `\\w+` words and
the same LSH design, 128 permutations in 16 bands of 8 rows (P(candidate | Jaccard 0.8) = 0.95;
datasketch's own choice for threshold 0.8 would be 9 bands x 13 rows, recall ~0.4 at 0.8):
  lmforge     `find_near_duplicates` (every candidate verified by exact Jaccard before a drop).
  datasketch  naive: per document, `MinHash(num_perm=128)` + `update_batch(shingles)`, then
              `MinHashLSH.query`; a document with a candidate is dropped, else inserted.
              `datasketch (shared perms)` is the same but builds each MinHash from one set of
              permutations (the constructor otherwise draws 128 of them per document): a stronger
              baseline, reported alongside, not the one the target is about.
  datatrove   `MinhashDedupSignature -> MinhashDedupBuckets -> MinhashDedupCluster ->
              MinhashDedupFilter`, each stage a `LocalPipelineExecutor` with 1 worker (stage 2: one
              task per band, 16 tasks run one after another), reading the corpus from a JsonlReader
              (the .jsonl is written before the clock starts), MinhashConfig(n_grams=5,
              num_buckets=16, hashes_per_bucket=8), default 64-bit xxhash. Its English word
              tokenizer is spaCy's; here a `\\w+` regex tokenizer is given instead (spaCy is not
              installed, and it would only make datatrove slower).
Every method keeps the first document of a cluster, so each should drop copies, never originals.
Recall = injected copies with Jaccard >= 0.8 that were dropped / all of them; precision = of the
dropped injected copies, those >= 0.8 (copies at ~0.68 must stay). The speed comparison is valid
only if every method's recall is >= `--min-recall` (default 0.95): equal recall within 0.05.

docs/s = documents / wall seconds of the whole method (shingling included), one process; with
`--repeat R` the methods take turns R times and the median is used. Exit 1 if lmforge is below
`--min-datasketch` (default 2) x datasketch naive or `--min-datatrove` (default 5) x datatrove, or
if recalls are not comparable.

    PYTHONPATH=. python bench/data_pipeline.py [--docs N] [--repeat 3] [--skip-datatrove]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lmforge.data.corpus import default_documents
from lmforge.data.dup_injection import InjectedCorpus, inject, passages
from lmforge.data.near_dedup import NearDedupConfig, find_near_duplicates

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402

THRESHOLD, NGRAM, NUM_PERM, BANDS = 0.8, 5, 128, 16
MIN_DATASKETCH, MIN_DATATROVE, MIN_RECALL = 2.0, 5.0, 0.95
_WORD = re.compile(r"\w+")


def build_corpus(docs: int | None = None) -> InjectedCorpus:
    """Passages of the embedded corpus + injected copies (1 per 4 passages): ~`docs` in all."""
    base = passages(d["text"] for d in default_documents())
    if docs is not None and docs * 4 // 5 < len(base):
        k = max(4, docs * 4 // 5)
        base = [base[i * len(base) // k] for i in range(k)]
    return inject(base, every=4, threshold=THRESHOLD, n=NGRAM)


def run_lmforge(corpus: InjectedCorpus) -> set[str]:
    cfg = NearDedupConfig(shingle="word", ngram=NGRAM, num_perm=NUM_PERM, bands=BANDS, threshold=THRESHOLD)
    return set(find_near_duplicates(corpus.docs, cfg).duplicate_of)


def _word_shingles(text: str) -> list[bytes]:
    w = _WORD.findall(text.lower())
    return list({" ".join(w[i:i + NGRAM]).encode() for i in range(max(1, len(w) - NGRAM + 1))})


def run_datasketch(corpus: InjectedCorpus, shared_permutations: bool = False) -> set[str]:
    """One MinHash per document, query the LSH, insert when nothing is found."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, params=(BANDS, NUM_PERM // BANDS))
    first = MinHash(num_perm=NUM_PERM)
    make = ((lambda: MinHash(num_perm=NUM_PERM, permutations=first.permutations, scheme=first.scheme))
            if shared_permutations else (lambda: MinHash(num_perm=NUM_PERM)))
    dropped: set[str] = set()
    for doc_id, text in corpus.docs:
        m = make()
        m.update_batch(_word_shingles(text))
        if lsh.query(m):
            dropped.add(doc_id)
        else:
            lsh.insert(doc_id, m)
    return dropped


def _regex_tokenizer():  # noqa: ANN202 - a datatrove class, imported lazily
    from datatrove.utils.word_tokenizers import WordTokenizer

    class RegexWords(WordTokenizer):
        """`\\w+` words (datatrove's English default is spaCy's tokenizer)."""

        def word_tokenize(self, text: str) -> list[str]:
            return _WORD.findall(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    return RegexWords()


def write_jsonl(corpus: InjectedCorpus, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, text in corpus.docs:
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")


def run_datatrove(inp: Path, work: Path, stage_seconds: dict[str, float] | None = None) -> set[str]:
    """The 4 MinHash stages on the .jsonl files in `inp`, 1 worker each, files under `work`. Its
    logs (loguru, tqdm) go to a buffer, shown only if a stage fails."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=NUM_PERM // BANDS)
    tok = _regex_tokenizer()
    stages = {
        "signatures": (1, [JsonlReader(str(inp)), MinhashDedupSignature(str(work / "sigs"), cfg, language=tok)]),
        "buckets": (BANDS, [MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=cfg)]),
        "cluster": (1, [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=cfg)]),
        "filter": (1, [JsonlReader(str(inp)), MinhashDedupFilter(str(work / "remove"), exclusion_writer=JsonlWriter(
            str(work / "removed"), compression=None))]),
    }
    log = io.StringIO()
    for name, (tasks, pipeline) in stages.items():
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stderr(log):
                LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(work / "logs" / name)).run()
        except Exception:
            print(log.getvalue()[-4000:], file=sys.stderr)
            raise
        if stage_seconds is not None:
            stage_seconds[name] = stage_seconds.get(name, 0.0) + time.perf_counter() - t0
    dropped = set()
    for f in sorted((work / "removed").glob("*.jsonl")):
        dropped |= {json.loads(line)["id"] for line in f.read_text().splitlines() if line.strip()}
    return dropped


def timed(fn: Callable[[int], set[str]], r: int) -> tuple[set[str], float]:
    t0 = time.perf_counter()
    out = fn(r)
    return out, time.perf_counter() - t0


def measure(corpus: InjectedCorpus, repeat: int, methods: list[str], tmp: Path) -> dict[str, dict]:
    """Each method `repeat` times, taking turns; its score (from the last run: all runs of a method
    are deterministic) and the median docs/s."""
    write_jsonl(corpus, tmp / "input" / "corpus.jsonl")
    stage_seconds: dict[str, float] = {}
    runs: dict[str, Callable[[int], set[str]]] = {
        "lmforge": lambda r: run_lmforge(corpus),
        "datasketch": lambda r: run_datasketch(corpus),
        "datasketch (shared perms)": lambda r: run_datasketch(corpus, shared_permutations=True),
        "datatrove": lambda r: run_datatrove(tmp / "input", tmp / f"dt{r}", stage_seconds),
    }
    out: dict[str, dict] = {m: {"seconds": []} for m in methods}
    for r in range(repeat):
        for m in methods:
            dropped, s = timed(runs[m], r)
            out[m]["seconds"].append(s)
            out[m].update(corpus.score(dropped))
    n = len(corpus.docs)
    for m in methods:
        out[m]["docs_per_s"] = n / statistics.median(out[m]["seconds"])
    if "datatrove" in out:
        out["datatrove"]["stages"] = {k: v / repeat for k, v in stage_seconds.items()}
    return out


def report(corpus: InjectedCorpus, res: dict[str, dict]) -> None:
    print(f"\ncorpus: {len(corpus.docs):,} documents ({len(corpus.docs) - len(corpus.truth):,} passages + "
          f"{len(corpus.truth):,} injected copies: {len(corpus.positives):,} at Jaccard >= {THRESHOLD}, "
          f"{len(corpus.negatives):,} below)")
    print(f"{'method':<26} {'docs/s':>9} {'seconds':>8} {'recall':>7} {'precision':>9} {'false drops':>11} "
          f"{'other drops':>11}")
    for m, r in res.items():
        print(f"{m:<26} {r['docs_per_s']:>9,.0f} {statistics.median(r['seconds']):>8.2f} {r['recall']:>7.3f} "
              f"{r['precision']:>9.3f} {r['false_drops']:>11.0f} {r['other_dropped']:>11.0f}")
    if "stages" in res.get("datatrove", {}):
        print("datatrove stages (s, mean per run): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                               res["datatrove"]["stages"].items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=None, help="about this many documents (default: all, 9,782)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per method, taking turns (median docs/s)")
    ap.add_argument("--skip-datatrove", action="store_true", help="compare with datasketch only")
    ap.add_argument("--min-datasketch", type=float, default=MIN_DATASKETCH)
    ap.add_argument("--min-datatrove", type=float, default=MIN_DATATROVE)
    ap.add_argument("--min-recall", type=float, default=MIN_RECALL)
    args = ap.parse_args(argv)
    corpus = build_corpus(args.docs)
    methods = ["lmforge", "datasketch", "datasketch (shared perms)"] + ([] if args.skip_datatrove else ["datatrove"])
    with tempfile.TemporaryDirectory(prefix="lmforge-dedup-bench-") as tmp:
        warm = build_corpus(200)
        measure(warm, 1, methods, Path(tmp) / "warm")  # imports, lazy tables, file caches
        res = measure(corpus, args.repeat, methods, Path(tmp) / "run")
    report(corpus, res)
    low = {m: r["recall"] for m, r in res.items() if r["recall"] < args.min_recall}
    if low:
        print(f"recall not comparable: {low} below {args.min_recall} - the speed ratios do not count")
    ours = res["lmforge"]["docs_per_s"]
    status = 0
    for base, target in [("datasketch", args.min_datasketch)] + ([] if args.skip_datatrove else
                                                                [("datatrove", args.min_datatrove)]):
        ratio = float("nan") if low else ours / res[base]["docs_per_s"]
        status |= verdict(f"data_pipeline ({base})", f"{base} near-dedup, same corpus, recall >= {args.min_recall}",
                          f"lmforge / {base} docs/s", ratio, target)
    if "datasketch (shared perms)" in res:
        print(f"(lmforge / datasketch with shared permutations: {ours / res['datasketch (shared perms)']['docs_per_s']:.2f}x)")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""The document pipeline: raw corpora (jsonl, .jsonl.gz, .jsonl.zst, parquet, directories of text
files) -> normalised, filtered documents with a provenance record per step, run shard by shard so
an interrupted run resumes where it stopped (`lmforge data run PIPELINE.toml`).

Modules, one concern each:
  document.py  the `Document` record, its provenance verdicts (a dedup drop names what it repeats)
  readers.py   streaming readers; every bad input becomes a counted `Reject`, never a crash
  base.py      the `Step` base class (per shard, per-step stats) and `GlobalStep` (sees every
               shard once; its `Decisions` are then applied per shard by a `DecisionStep`)
  steps.py     the per-shard registry `STEP_TYPES` and the steps `normalize` (unicode +
               whitespace), `quality` (heuristic filters, each drop naming its rule and value)
  dedup.py     the global registry `GLOBAL_STEP_TYPES`; global steps, which must see every shard:
               `exact_dedup` (content hash, across runs through an index file), `near_dedup`
               (MinHash + LSH, exact-Jaccard verified)
  lm_score.py  `lm_score`: perplexity under an n-gram model trained on a reference set (`ngram.py`,
               interpolated Kneser-Ney); `max_perplexity` per shard, or `keep_top_fraction` global
  domains.py   `domain`: TF-IDF labels metadata["domain"] (keyword-seeded centroids or k-means)
  lexicon.py   `lexicon`: whole-word, case-insensitive term/phrase matches from lexicon files
  harmful.py   `harmful`: the safety filter's data gate (lmforge/safety: obfuscation-folded categories)
  eda.py       `eda`: Easy Data Augmentation copies (synonym replacement/insertion, swap,
               deletion) emitted after each document, seeded by (seed, id)
  synthetic.py global step `synthetic`: P(machine-generated) of each document from a detector
               trained per run on reference human text vs samples of a model (`lmforge data
               sample`; the detector: `lmforge/data/synthetic.py`); `max_score` or `keep_top_fraction`
  writers.py   jsonl (optionally zstd) writers for kept documents and rejects, temp-then-rename
  config.py    the pipeline TOML -> `PipelineConfig`, refused in one line before any work
  executor.py  deterministic shards, stages cut at global steps, per-shard completion markers, merge
  workers.py   where shard tasks run: in process, local processes, or Ray tasks

Packed tokens trace back through the corpus to a pipeline record with `lmforge data trace`
(`data/trace.py`); `lmforge data report` describes a run (`data/report.py`). `lmforge data
prepare` sends the default corpus through `lmforge/data/default_pipeline.py` (this chain with a
domain step) before training its tokenizer; the packer groups training documents by domain and
the loader mixes domains by weight (`lmforge/data/mixing.py`). Erasure coding is of the packed
token shards (`lmforge/data/erasure.py`), not of pipeline outputs.
Submodules are imported explicitly (pyarrow only when a parquet input is read, ray only for
executor = "ray").
"""

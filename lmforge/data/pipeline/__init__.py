"""The document pipeline: raw corpora (jsonl, .jsonl.gz, .jsonl.zst, parquet, directories of text
files) -> normalised, filtered documents with a provenance record per step, run shard by shard so
an interrupted run resumes where it stopped (`lmforge data run PIPELINE.toml`).

Modules, one concern each:
  document.py  the `Document` record, its provenance verdicts, the content hash
  readers.py   streaming readers; every bad input becomes a counted `Reject`, never a crash
  steps.py     the `Step` base class and the steps: `normalize` (unicode + whitespace),
               `quality` (heuristic filters, each drop naming its rule and value)
  global_steps.py  steps that see the whole corpus first: `decide` once, then applied per shard
  dedup.py     `exact_dedup` (content hash, across runs via an index), `near_dedup` (verified
               MinHash/LSH); `GLOBAL_STEP_TYPES`
  domains.py   `domain`: TF-IDF labels metadata["domain"] (keyword-seeded centroids or k-means)
  writers.py   jsonl (optionally zstd) writers for kept documents and rejects, temp-then-rename
  config.py    the pipeline TOML -> `PipelineConfig`, refused in one line before any work
  executor.py  deterministic shards, N worker processes (or Ray), per-shard completion markers,
               global steps between stages, the merge

Not here yet (other parts of issue 12): language identification; erasure coding is of the packed
token shards (`lmforge/data/erasure.py`), not of pipeline outputs. Run reports:
`lmforge/data/report.py` (reads a finished run's outputs and `stats.json`). `lmforge data
prepare` sends the default corpus through `lmforge/data/default_pipeline.py` (this chain with
a domain step) before training its tokenizer; the packer groups training documents by domain and
the loader mixes domains by weight (`lmforge/data/mixing.py`).
Submodules are imported explicitly (pyarrow only when a parquet input is read).
"""

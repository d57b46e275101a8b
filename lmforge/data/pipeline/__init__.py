"""The document pipeline: raw corpora (jsonl, .jsonl.gz, .jsonl.zst, parquet, directories of text
files) -> normalised, filtered documents with a provenance record per step, run shard by shard so
an interrupted run resumes where it stopped (`lmforge data run PIPELINE.toml`).

Modules, one concern each:
  document.py  the `Document` record, its provenance verdicts (a dedup drop names what it repeats)
  readers.py   streaming readers; every bad input becomes a counted `Reject`, never a crash
  steps.py     the `Step` base class (per-step stats) and the steps: `normalize` (unicode +
               whitespace), `quality` (heuristic filters, each drop naming its rule and value)
  dedup.py     global steps, which must see every shard: `exact_dedup` (content hash, across runs
               through an index file), `near_dedup` (MinHash + LSH, exact-Jaccard verified)
  writers.py   jsonl (optionally zstd) writers for kept documents and rejects, temp-then-rename
  config.py    the pipeline TOML -> `PipelineConfig`, refused in one line before any work
  executor.py  deterministic shards, stages cut at global steps, per-shard completion markers, merge
  workers.py   where shard tasks run: in process, local processes, or Ray tasks

Packed tokens trace back through the corpus to a pipeline record with `lmforge data trace`
(`data/trace.py`); `lmforge data report` describes a run (`data/report.py`).
Submodules are imported explicitly (pyarrow only when a parquet input is read, ray only for
executor = "ray").
"""

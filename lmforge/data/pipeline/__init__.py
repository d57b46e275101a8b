"""The document pipeline: raw corpora (jsonl, .jsonl.gz, .jsonl.zst, parquet, directories of text
files) -> normalised, filtered documents with a provenance record per step, run shard by shard so
an interrupted run resumes where it stopped (`lmforge data run PIPELINE.toml`).

Modules, one concern each:
  document.py  the `Document` record, its provenance verdicts, the content hash
  readers.py   streaming readers; every bad input becomes a counted `Reject`, never a crash
  steps.py     the `Step` base class and the steps: `normalize` (unicode + whitespace),
               `quality` (heuristic filters, each drop naming its rule and value)
  dedup.py     global steps (see the whole corpus once, then applied per shard): `exact_dedup`,
               `near_dedup`
  synthetic.py global step `synthetic`: P(machine-generated) of each document from a detector
               trained per run on reference human text vs samples of a model (`lmforge data
               sample`; the detector: `lmforge/data/synthetic.py`); `max_score` or `keep_top_fraction`
  registry.py  every step type a pipeline TOML may name
  writers.py   jsonl (optionally zstd) writers for kept documents and rejects, temp-then-rename
  config.py    the pipeline TOML -> `PipelineConfig`, refused in one line before any work
  executor.py  deterministic shards, N worker processes, per-shard completion markers, the merge

Not here yet (other parts of issue 12): language identification, domain tagging and mixing,
erasure-coded outputs; the watermark detector (issue 18) joins `synthetic.py` (see its docstring). Run reports:
`lmforge/data/report.py` (reads a finished run's outputs and `stats.json`). The pipeline's output
is not yet chained into `data prepare`.
Submodules are imported explicitly (pyarrow only when a parquet input is read).
"""

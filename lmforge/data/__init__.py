"""Data path: corpus (corpus.py) -> byte-level BPE (tokenizer.py) -> token shards (pack.py) -> the
stateful, data-parallel training loader (loader.py). `pack.prepare_data` runs the three file stages,
each skipped when its output is current. `pipeline/` is the document pipeline run by
`lmforge data run` (raw corpora -> normalised, filtered, deduplicated jsonl with provenance; see
its docstring). near_dedup.py finds near-duplicate documents (MinHash + LSH, every candidate
verified by exact Jaccard; shingle hashing in shingles.py); the pipeline's `near_dedup` step uses
it. dup_injection.py plants near-duplicates of known Jaccard in a corpus, to score near-dedup
(tests, bench/data_pipeline.py). erasure.py stores a pack's token files as k data + m parity
Reed-Solomon pieces (data.erasure_k/m): the loader reads through up to m lost or corrupt pieces,
`lmforge data verify --repair` rewrites them. report.py (`lmforge data report`) writes one
self-contained HTML page about a pipeline run (profile.py: a streamed summary; report_plots.py:
the plots) and its distribution shift against another run or corpus (drift.py). synthetic.py is
the synthetic-text detector of the pipeline's `synthetic` step (human reference vs model samples,
which `lmforge/serve/sample.py` writes: this layer never loads a model). Submodules are
imported explicitly (no heavy imports here).
"""

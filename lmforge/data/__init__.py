"""Data path: corpus (corpus.py) -> byte-level BPE (tokenizer.py) -> token shards (pack.py) -> the
stateful, data-parallel training loader (loader.py). `pack.prepare_data` runs the three file stages,
each skipped when its output is current. A new pipeline step (filtering, deduplication, ...) is a
module here with one function from input files to output files, written temp-then-rename and
skipped when its output is current, chained in `pack.prepare_data`. `pipeline/` is the document
pipeline run by `lmforge data run` (raw corpora -> normalised, filtered jsonl; see its docstring
for what it does not do yet). near_dedup.py finds near-duplicate documents (MinHash + LSH, every
candidate verified by exact Jaccard); it is an in-memory API, not yet a step of `pipeline/` nor a
file stage in `prepare_data`. report.py (`lmforge data report`) writes one self-contained HTML
page about a pipeline run (profile.py: a streamed summary; report_plots.py: the plots) and its
distribution shift against another run or corpus (drift.py). Submodules are imported explicitly (no heavy imports here).
"""

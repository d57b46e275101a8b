"""Data path: corpus (corpus.py) -> byte-level BPE (tokenizer.py) -> token shards (pack.py) -> the
stateful, data-parallel training loader (loader.py). `pack.prepare_data` runs the three file stages,
each skipped when its output is current. Submodules are imported explicitly (no heavy imports here).
"""

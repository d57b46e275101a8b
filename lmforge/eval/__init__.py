"""Evaluation of trained models (`lmforge eval`): perplexity on the held-out split, overall, on
the trainer's validation sequences and per domain (perplexity.py, over heldout.py), a cloze task
built from held-out text (cloze.py), generation speed and memory (speed.py); runner.py puts them
together, report.py prints and writes them. Models are loaded as `lmforge generate` loads them
(lmforge.serve.generate); evaluation never trains and never writes into a run or a data dir.
"""

"""Evaluation of trained models: benchmark tasks scored on a checkpoint or a served model (perplexity
on held-out shards, multiple-choice and generation tasks), each task a module here that reads its
data from packages shipped with the install and writes its scores as strict JSON into the run
directory. Evaluation loads models through `lmforge.serve` or `lmforge.checkpoint`; it never trains.
"""

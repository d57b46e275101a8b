"""Which models continuous batching can serve, said before the server starts."""

from __future__ import annotations

from lmforge.config import ModelConfig
from lmforge.serve.server.errors import ServeError


def check_servable(cfg: ModelConfig, early_exit_threshold: float | None = None) -> None:
    """Top-k sparse attention keeps per-batch block state and "dynamic" RoPE rescales by the
    longest sequence: both would make a request's tokens depend on its batch neighbours. A
    server-wide early-exit threshold needs a model with exits."""
    if early_exit_threshold is not None and not cfg.early_exit.layers:
        raise ServeError(f"--early-exit-threshold {early_exit_threshold}: the model has no early exits "
                         "(model.early_exit.layers is empty); fine-tune it with exits or leave the flag out")
    topk = [i for i in range(cfg.n_layers) if cfg.attention.kind(i) == "topk"]
    if topk:
        raise ServeError(f"model.attention: layer {topk[0]} uses top-k block-sparse attention; lmforge serve "
                         "batches full and sliding-window attention only")
    if cfg.rope_scaling.type == "dynamic":
        raise ServeError("model.rope_scaling.type = 'dynamic': lmforge serve needs fixed RoPE tables "
                         "(none, linear, ntk, yarn, llama3)")

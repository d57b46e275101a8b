"""`lmforge serve`'s options: each out-of-range value is refused in one line naming the flag."""

from __future__ import annotations

import dataclasses

import pytest

from lmforge.config import ModelConfig
from lmforge.serve.server.errors import ServeError
from lmforge.serve.server.model_check import check_servable
from lmforge.serve.server.options import BreakerOptions, ServerOptions

GOOD = ServerOptions(model_name="m", max_tokens_limit=100)


@pytest.mark.parametrize(("change", "message"), [
    ({"slots": 0}, "--slots 0: must be >= 1"),
    ({"max_batch_tokens": 16}, "--max-batch-tokens 16: must exceed --slots 16"),
    ({"max_queue": -1}, "--max-queue -1: must be >= 0"),
    ({"default_deadline_s": 0.0}, "--default-deadline 0.0: must be in (0.0, 600.0]"),
    ({"max_tokens_limit": 128}, "--max-tokens-limit 128: must be in [1, 127]"),
    ({"default_max_tokens": 101}, "--default-max-tokens 101: must be in [1, 100]"),
    ({"max_n": 0}, "--max-n 0: must be >= 1"),
    ({"max_request_bytes": 10}, "--max-request-bytes 10: must be >= 256"),
    ({"api_keys": ("short",)}, "an API key must be at least 8 characters"),
    ({"api_keys": ("has space 123",)}, "no whitespace"),
    ({"breaker": BreakerOptions(error_rate=1.5)}, "--breaker-error-rate 1.5: must be in (0.0, 1.0]"),
    ({"breaker": BreakerOptions(probes=0)}, "--breaker-probes 0: must be >= 1"),
    ({"early_exit_threshold": -0.1}, "--early-exit-threshold -0.1: must be in [0.0, inf]"),
])
def test_bad_options_are_named(change, message):
    GOOD.check(max_seq_len=128)
    with pytest.raises(ServeError) as e:
        dataclasses.replace(GOOD, **change).check(max_seq_len=128)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_keys_are_not_in_the_repr():
    assert "sk-secret" not in repr(dataclasses.replace(GOOD, api_keys=("sk-secret-123",)))


def test_models_continuous_batching_cannot_serve_are_refused():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
    check_servable(cfg)
    topk = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, layers=["topk"]))
    with pytest.raises(ServeError, match="top-k"):
        check_servable(topk)


def test_a_server_wide_early_exit_threshold_needs_a_model_with_exits():
    from lmforge.config.model import EarlyExitConfig

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
    with pytest.raises(ServeError, match="--early-exit-threshold 0.9: the model has no early exits") as e:
        check_servable(cfg, 0.9)
    assert "\n" not in str(e.value)
    check_servable(dataclasses.replace(cfg, early_exit=EarlyExitConfig(layers=[1])), 0.9)

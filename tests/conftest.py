"""Shared fixtures: a small packed dataset built once per test session from the embedded corpus.
Fixtures and pytest hooks only: helpers live in tests/helpers/."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmforge.config import DataConfig, TokenizerConfig
    from lmforge.data.pack import prepare_data

    out = tmp_path_factory.mktemp("tiny-data")
    return prepare_data(DataConfig(corpus="default", dir=str(out), max_documents=120, val_fraction=0.05),
                        TokenizerConfig(vocab_size=512, min_frequency=2), log=lambda *_: None)

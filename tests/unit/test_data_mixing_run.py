"""Domain mixing in a real (debug-sized) run on the default corpus, which `data prepare` sends
through the default pipeline (its three domains labelled): the run header prints the weights,
config.json stores them, a resumed run continues with the identical batches (its losses equal an
uninterrupted run's), and weights naming a domain the data lacks are one config error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import ConfigError, load_job_config, parse_override_args
from lmforge.train.trainer import Trainer
from tests.helpers.cli import read_metrics, tiny_run_args


def run(data_dir: Path, out: Path, *extra: str, echo: bool = False) -> Trainer:
    args = tiny_run_args(data_dir, out, "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
                         "--train.eval_interval", "0", "--data.mixing_temperature", "2.0", *extra)
    trainer = Trainer(load_job_config(None, parse_override_args(args)), echo=echo)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def test_default_data_has_three_domains(tiny_data_dir: Path) -> None:
    m = json.loads((tiny_data_dir / "manifest.json").read_text())
    assert [d["name"] for d in m["splits"]["train"]["domains"]] == ["bible", "chinese", "shakespeare"]
    meta = json.loads((tiny_data_dir / "pipeline.meta.json").read_text())
    assert set(meta["stats"]["domains"]) == {"bible", "chinese", "shakespeare"}


def test_header_config_and_exact_resume(tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole = run(tiny_data_dir, tmp_path / "whole", "--train.steps", "6", "--checkpoint.enabled", "false", echo=True)
    header = capsys.readouterr().out
    line = next(ln for ln in header.splitlines() if ln.startswith("domains: "))
    assert line.endswith("(temperature 2)") and "bible 0." in line and "chinese 0." in line
    stored = json.loads((tmp_path / "whole" / "config.json").read_text())["data"]
    assert stored["mixing_resolved"] == line.removeprefix("domains: ") == whole.cfg.data.mixing_resolved

    out = tmp_path / "split"
    run(tiny_data_dir, out, "--train.steps", "6", "--train.stop_at", "3", "--checkpoint.interval", "3")
    run(tiny_data_dir, out, "--train.steps", "6", "--checkpoint.resume", "auto")
    losses = {r["step"]: r["loss"] for r in read_metrics(out)}
    reference = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "whole")}
    assert losses == pytest.approx(reference, rel=1e-6)


def test_weights_for_an_unknown_domain_are_a_config_error(tiny_data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown domain 'web'"):
        run(tiny_data_dir, tmp_path / "bad", "--train.steps", "4", "--data.domain_weights", "web:1,bible:1")


def test_a_rerun_with_unchanged_inputs_does_nothing(tiny_data_dir: Path) -> None:
    from lmforge.config import DataConfig, TokenizerConfig
    from lmforge.data.pack import prepare_data

    lines: list[str] = []
    before = (tiny_data_dir / "pipeline" / "output.jsonl").stat().st_mtime_ns
    prepare_data(DataConfig(corpus="default", dir=str(tiny_data_dir), max_documents=120, val_fraction=0.05),
                 TokenizerConfig(vocab_size=512, min_frequency=2), log=lines.append)
    assert len(lines) == 4 and all(" up to date" in ln for ln in lines), lines
    assert (tiny_data_dir / "pipeline" / "output.jsonl").stat().st_mtime_ns == before


def test_pipeline_none_packs_the_raw_corpus_without_domains(tmp_path: Path) -> None:
    from lmforge.config import DataConfig, TokenizerConfig
    from lmforge.data.pack import prepare_data

    out = prepare_data(DataConfig(corpus="default", dir=str(tmp_path), max_documents=30, val_fraction=0.1,
                                  pipeline="none"), TokenizerConfig(vocab_size=300), log=lambda *_: None)
    m = json.loads((out / "manifest.json").read_text())
    assert "domains" not in m["splits"]["train"] and not (out / "pipeline").exists()

"""`lmforge eval SOURCE --suite bias` end to end on a tiny random checkpoint (a Hugging Face
directory with its tokenizer, written in a temp dir): the table and the JSON with the four
dimensions, the same numbers on a second run and within `--suite default,bias`; a bad --suite
value is one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import trainers

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.data.tokenizer import EOS_TOKEN, new_byte_level_bpe
from lmforge.interop.hf.exporter import export_hf
from lmforge.models.registry import family_of

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bias-cli")
    tok = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS_TOKEN], show_progress=False)
    tok.train_from_iterator(["The man and the woman went to the market to buy bread and fish."] * 20, trainer=trainer)
    tok.save(str(tmp / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=320, multiple_of=32, max_seq_len=128)
    return export_hf(family_of(cfg).build(cfg, "cpu", 0).eval(), cfg, tmp / "hf", tmp / "tokenizer.json")


def eval_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_bias_suite_prints_and_writes_the_four_dimensions(checkpoint: Path, tmp_path: Path, capsys) -> None:
    code, out, err = eval_main([str(checkpoint), "--suite", "bias", "--out", str(tmp_path / "a.json")], capsys)
    assert code == 0, err
    for text in ("bias: stereotype-preference rate", "gender", "race/nationality", "religion", "age", "95% CI",
                 "Faker"):
        assert text in out, out
    assert "perplexity" not in out and "speed" not in out
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["suites"] == ["bias"] and a["timing"] is None and "perplexity" not in a["deterministic"]
    bias = a["deterministic"]["bias"]
    assert list(bias["dimensions"]) == ["gender", "race_nationality", "religion", "age"]
    for d in bias["dimensions"].values():
        assert d["pairs"] >= 150 and d["templates"] >= 14
        assert 0.0 <= d["ci_low"] <= d["rate"] <= d["ci_high"] <= 1.0
    assert sum(d["pairs"] for d in bias["dimensions"].values()) == bias["pairs"] == 1048
    # deterministic: a second run (here with the default suite too) gives the same bias section
    code, out, err = eval_main([str(checkpoint), "--suite", "default,bias", "--no-speed", "--out",
                                str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["suites"] == ["default", "bias"] and b["deterministic"]["bias"] == bias


@pytest.mark.parametrize(("suite", "why"), [("fairness", "unknown suite 'fairness'"),
                                            ("bias,bias", "a suite named twice"), ("", "unknown suite ''")])
def test_a_bad_suite_is_one_line_and_exit_2(checkpoint: Path, suite: str, why: str, capsys) -> None:
    code, out, err = eval_main([str(checkpoint), "--suite", suite], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and why in err and "allowed: default, bias" in err, err

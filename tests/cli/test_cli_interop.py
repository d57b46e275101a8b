"""The CLI path after training: export -> transformers loads it with equal logits; import back ->
the imported run generates the same greedy text as the original run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from lmforge.cli import main
from lmforge.models.llama.model import Transformer
from lmforge.serve.generate import load_for_generation
from tests.helpers.cli import tiny_run_args, train_in_process


@pytest.fixture(scope="module")
def trained_run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train_in_process(tiny_run_args(tiny_data_dir, run, "--train.steps", "3", "--train.global_batch_size", "2",
                                   "--train.micro_batch_size", "2", "--train.eval_interval", "0"))
    return run


def greedy(source: Path, capsys) -> str:
    assert main(["generate", str(source), "--prompt", "And God said", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    return capsys.readouterr().out


def test_export_loads_in_transformers_with_equal_logits(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    assert main(["export", str(trained_run), str(out)]) == 0
    ours, _, _ = load_for_generation(trained_run)
    assert isinstance(ours, Transformer)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok.encode("In the beginning")) == "In the beginning"


def test_import_round_trip_generates_identically(trained_run: Path, tmp_path: Path, capsys) -> None:
    hf_dir, imported = tmp_path / "hf", tmp_path / "imported"
    assert main(["export", str(trained_run), str(hf_dir)]) == 0
    assert main(["import", str(hf_dir), str(imported)]) == 0
    capsys.readouterr()
    a, b = greedy(trained_run, capsys), greedy(imported, capsys)
    assert a.startswith("And God said") and len(a) > len("And God said")
    assert a == b
    c = greedy(hf_dir, capsys)  # generation straight from the HF directory
    assert c == a


def test_export_refuses_non_empty_dir_in_one_line(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["export", str(trained_run), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0]
    assert (out / "keep.txt").read_text() == "precious"

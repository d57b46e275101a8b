"""`lmforge compress quantize` end to end in fresh processes: a trained run quantized to int4 (GPTQ on
its own data), then `lmforge eval` and `lmforge generate` on the directory with no extra flag; an
MoE checkpoint and an incomplete checkpoint refused in one line with exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmforge.config import ModelConfig, MoEConfig
from lmforge.interop.hf.exporter import export_hf
from lmforge.models.llama.model import build_model
from tests.helpers.cli import run_cli, run_process_group, tiny_run_args, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("quant-cli-run")
    train_in_process(tiny_run_args(tiny_data_dir, run, "--train.steps", "4", "--train.global_batch_size", "4",
                                   "--train.micro_batch_size", "4", "--train.eval_interval", "4",
                                   "--checkpoint.interval", "4"))
    return run


def lmforge_fails(*args: str) -> str:
    import os
    import sys

    proc = run_process_group([sys.executable, "-m", "lmforge", *args], {**os.environ, "OMP_NUM_THREADS": "1"}, 300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_quantize_then_eval_and_generate_with_no_flag(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "w4"
    res = run_cli(["compress", "quantize", str(run_dir), "--scheme", "int4-weight", "--group-size", "32",
                   "--calib-samples", "8", "--calib-seq-len", "32", "--out", str(out)])
    assert "int4-weight (runtime dequant)" in res.stdout and "gptq: output" in res.stdout
    assert res.stderr == "", res.stderr  # torchao's import notices (CUDA extensions, Triton) stay out of it
    assert sorted(p.name for p in out.iterdir()) == ["model.quantized.safetensors", "quantization.json",
                                                    "run_config.json", "tokenizer.json"]
    report = tmp_path / "eval.json"
    run_cli(["eval", str(out), "--items", "0", "--no-speed", "--max-batches", "2", "--out", str(report)])
    got = json.loads(report.read_text())
    assert got["source"]["kind"] == "quantized" and got["deterministic"]["perplexity"]["perplexity"] > 1
    gen = run_cli(["generate", str(out), "--prompt", "The king", "--max-new-tokens", "8", "--temperature", "0"])
    assert gen.stdout.strip() and gen.stderr == "", gen.stderr
    # a second quantize into the same --out is refused without --overwrite
    err = lmforge_fails("compress", "quantize", str(run_dir), "--scheme", "int8-weight", "--out", str(out))
    assert "already exists" in err and "--overwrite" in err


def test_hf_export_prints_no_library_output(run_dir: Path, tmp_path: Path) -> None:
    """--hf goes through transformers and torchao: their progress bars, import notices and
    deprecations are not the user's business; lmforge's summary is all the terminal shows."""
    out = tmp_path / "w8"
    res = run_cli(["compress", "quantize", str(run_dir), "--scheme", "int8-dynamic", "--hf", "--out", str(out)])
    assert res.stderr == "", res.stderr
    assert (out / "hf" / "config.json").is_file() and "int8-dynamic" in res.stdout


@pytest.mark.slow
def test_moe_and_incomplete_checkpoints_are_refused_in_one_line(run_dir: Path, tmp_path: Path) -> None:
    moe_cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                          max_seq_len=64, moe=MoEConfig(n_experts=4, top_k=2))
    moe_cfg.validate()
    export_hf(build_model(moe_cfg), moe_cfg, tmp_path / "moe-hf")
    err = lmforge_fails("compress", "quantize", str(tmp_path / "moe-hf"), "--scheme", "int8-dynamic",
                        "--out", str(tmp_path / "q-moe"))
    assert "Mixture-of-Experts" in err and "3-D expert weights" in err
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    step = next((broken / "checkpoints").iterdir())
    shard = next(p for p in step.iterdir() if p.suffix == ".distcp")
    shard.unlink()
    err = lmforge_fails("compress", "quantize", str(step), "--scheme", "int8-weight", "--out", str(tmp_path / "q"))
    assert str(step) in err or "checkpoint" in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q-moe").exists()


def test_a_missing_torchao_is_said_before_the_model_loads(run_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Without the `quant` extra, quantize used to load the model and run GPTQ (~10 s on the main
    job's run) before it said torchao was missing."""
    import sys

    import lmforge.serve.generate as generate
    from lmforge.cli import main

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before torchao was checked")

    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao...` raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    monkeypatch.setattr(generate, "load_source", no_load)
    code = main(["compress", "quantize", str(run_dir), "--scheme", "int4-weight", "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install -e '.[quant]'" in err, err
    assert not (tmp_path / "q").exists()

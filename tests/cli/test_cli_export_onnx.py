"""`lmforge export --format onnx` end to end on a trained run with sliding-window and full layers:
onnxruntime's greedy tokens with the exported KV cache equal `lmforge generate`'s (3 prompts x 32
tokens, past the window), its perplexity equals `lmforge eval`'s on the same windows, the int8
export stays within 2% of it at <= 0.30x the size, and what cannot be exported is refused in one
line (exit 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
import torch

from lmforge.cli import main
from lmforge.data.tokenizer import TextTokenizer
from lmforge.eval.heldout import open_heldout
from lmforge.eval.perplexity import Windows, heldout_perplexity
from lmforge.eval.runner import EvalOptions, evaluate
from lmforge.interop.onnx.runtime import OnnxLM
from lmforge.serve.generate import generate, load_for_generation
from tests.helpers.cli import tiny_run_args, train_in_process

PROMPTS = ["And God said", "ROMEO:", "The king of"]
NEW_TOKENS = 32
WINDOW = 8
MICRO, GLOBAL = 2, 2


@pytest.fixture(scope="module")
def window_run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train_in_process(tiny_run_args(tiny_data_dir, run, "--train.steps", "6", "--train.global_batch_size", str(GLOBAL),
                                   "--train.micro_batch_size", str(MICRO), "--train.eval_interval", "0",
                                   "--model.attention.layers", "window,full", "--model.attention.window", str(WINDOW)))
    return run


@pytest.fixture(scope="module")
def fp32_export(window_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    assert main(["export", str(window_run), str(out), "--format", "onnx"]) == 0
    return out


def test_onnx_greedy_equals_lmforge_generate(window_run: Path, fp32_export: Path, tiny_data_dir: Path) -> None:
    assert sorted(p.name for p in fp32_export.iterdir()) == ["model.onnx", "onnx_export.json", "tokenizer.json"]
    meta = json.loads((fp32_export / "onnx_export.json").read_text())
    assert meta["weights"] == "fp32" and meta["opset"] == 18 and meta["model"]["attention"]["layers"] == ["window", "full"]
    assert meta["source"]["checkpoint"].endswith("step-00000006") and meta["check"]["argmax_agrees"]
    graph = onnx.load(str(fp32_export / "model.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == ["batch", "seq"] and dims["past_key_values.1.value"] == ["batch", 2, "past", 16]
    assert [o.name for o in graph.output][:3] == ["logits", "present.0.key", "present.0.value"]

    model, cfg, _ = load_for_generation(window_run)
    lm = OnnxLM(fp32_export)
    tok = TextTokenizer.from_file(fp32_export / "tokenizer.json")
    for text in PROMPTS:
        ids = tok.encode(text)
        ref = generate(model, ids, NEW_TOKENS, temperature=0.0)[0]
        assert len(ref) == NEW_TOKENS and len(ids) + NEW_TOKENS > 2 * WINDOW
        assert lm.generate(ids, NEW_TOKENS) == [ref], text
    batch = [tok.encode(PROMPTS[0])] * 2  # the batch axis is dynamic too
    assert lm.generate(batch, 8) == generate(model, batch, 8)


@pytest.mark.slow
def test_onnx_perplexity_equals_lmforge_eval_and_int8_stays_within_2_percent(
        window_run: Path, fp32_export: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    """Also --overwrite: the int8 export replaces a copy of the fp32 one whole (a stale file goes,
    no temp directory stays)."""
    int8 = tmp_path / "int8"
    shutil.copytree(fp32_export, int8)
    (int8 / "stale.txt").write_text("from before")
    assert main(["export", str(window_run), str(int8), "--format", "onnx", "--int8", "--overwrite"]) == 0
    assert sorted(p.name for p in int8.iterdir()) == ["model.onnx", "onnx_export.json", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["int8"]
    meta = json.loads((int8 / "onnx_export.json").read_text())
    assert meta["weights"] == "int8" and meta["method"] == "onnxruntime.quantization.quantize_dynamic"
    # int8 weights (1 byte each) + fp32 norms, RoPE tables and the graph: at this tiny size the graph
    # is a larger share than in real models (tiny-dense: docs/benchmarks.md)
    assert (int8 / "model.onnx").stat().st_size <= 0.32 * (fp32_export / "model.onnx").stat().st_size

    ev = evaluate(window_run, EvalOptions(data_dir=tiny_data_dir, max_batches=4, items=0, speed=False),
                  say=lambda line: None)["deterministic"]["perplexity"]
    w = Windows(ev["seq_len"], MICRO, GLOBAL, 1, 4)
    eos = TextTokenizer.from_file(tiny_data_dir / "tokenizer.json").eos_id
    held = open_heldout(tiny_data_dir)
    got = {name: heldout_perplexity(OnnxLM(d), held, w, torch.device("cpu"), eos, lambda line: None)
           for name, d in (("fp32", fp32_export), ("int8", int8))}
    assert got["fp32"]["windows"] == ev["windows"] == 8
    assert got["fp32"]["perplexity"] == pytest.approx(ev["perplexity"], rel=1e-5)
    assert abs(got["int8"]["perplexity"] / got["fp32"]["perplexity"] - 1) <= 0.02
    assert got["int8"]["perplexity"] != got["fp32"]["perplexity"]  # the int8 graph is a different one


def _one_line_exit_2(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_what_cannot_be_exported_is_refused_in_one_line(window_run: Path, fp32_export: Path, tmp_path: Path,
                                                        capsys) -> None:
    topk = tmp_path / "topk-run"
    topk.mkdir()
    d = json.loads((window_run / "config.json").read_text())
    d["model"]["attention"]["layers"] = ["full", "topk"]  # same weights: the refusal is about the layer kind
    (topk / "config.json").write_text(json.dumps(d))
    (topk / "checkpoints").symlink_to(window_run / "checkpoints")
    (topk / "tokenizer.json").symlink_to(window_run / "tokenizer.json")
    out = tmp_path / "out"
    assert "top-k sparse attention layers are not exported" in _one_line_exit_2(
        ["export", str(topk), str(out), "--format", "onnx"], capsys)

    from lmforge.config import ModelConfig, MoEConfig
    from lmforge.interop.hf.exporter import export_hf
    from lmforge.models.llama.model import build_model

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=32,
                      moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32))
    export_hf(build_model(cfg), cfg, tmp_path / "mixtral")
    assert "Mixture-of-Experts blocks are not exported to ONNX" in _one_line_exit_2(
        ["export", str(tmp_path / "mixtral"), str(out), "--format", "onnx"], capsys)
    assert not out.exists()

    assert "is inside the source" in _one_line_exit_2(  # never over the source, even with --overwrite
        ["export", str(window_run), str(window_run / "onnx"), "--format", "onnx", "--overwrite"], capsys)
    assert "already exists and is not empty" in _one_line_exit_2(
        ["export", str(window_run), str(fp32_export), "--format", "onnx"], capsys)
    assert "--opset" in _one_line_exit_2(["export", str(window_run), str(out), "--format", "onnx", "--opset", "13"],
                                         capsys)
    assert "applies to --format onnx only" in _one_line_exit_2(["export", str(window_run), str(out), "--int8"], capsys)
    assert "must be fp32 with --format onnx" in _one_line_exit_2(
        ["export", str(window_run), str(out), "--format", "onnx", "--dtype", "bf16"], capsys)
    assert not out.exists()

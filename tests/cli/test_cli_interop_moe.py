"""The CLI path for an MoE run (Qwen2-MoE style: first layer dense, gated shared expert, q/k/v
bias): train -> `lmforge export` -> transformers loads Qwen2MoeForCausalLM with equal logits ->
`lmforge import` -> the imported run generates the same greedy text. A run HF cannot express is
refused by export in one line (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from lmforge.cli import main
from lmforge.serve.generate import generate, load_for_generation
from tests.helpers.cli import tiny_run_args, train_in_process

MOE = ["--model.qkv_bias", "true", "--model.moe.n_experts", "4", "--model.moe.top_k", "2",
       "--model.moe.expert_hidden", "32", "--model.moe.n_shared_experts", "1", "--model.moe.shared_expert_gate", "true",
       "--model.moe.first_k_dense", "1", "--model.moe.aux_loss_coef", "0.01"]


@pytest.fixture(scope="module")
def moe_run(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("moe-run")
    train_in_process(tiny_run_args(tiny_data_dir, run, "--train.steps", "3", "--train.global_batch_size", "2",
                                   "--train.micro_batch_size", "2", "--train.eval_interval", "0", *MOE))
    return run


def greedy(source: Path, capsys) -> str:
    assert main(["generate", str(source), "--prompt", "And God said", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    return capsys.readouterr().out


def test_moe_export_loads_in_transformers_and_import_generates_identically(moe_run: Path, tmp_path: Path,
                                                                           capsys) -> None:
    hf_dir, imported = tmp_path / "hf", tmp_path / "imported"
    assert main(["export", str(moe_run), str(hf_dir), "--max-shard-size", "100KB"]) == 0
    assert json.loads((hf_dir / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in hf_dir.glob("*.safetensors")) == shards
    assert f"(config.json, {len(shards)} weight shards + model.safetensors.index.json, tokenizer)" in \
        capsys.readouterr().out  # it said "model.safetensors", a file it had not written
    ours, cfg, _ = load_for_generation(moe_run)
    assert cfg.moe.n_experts == 4 and not cfg.is_moe_layer(0) and cfg.is_moe_layer(1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= 1e-5
    # KV-cached greedy decoding agrees with transformers' generate token for token.
    prompt = [int(t) for t in x[0, :8]]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(ours, prompt, max_new_tokens=10)[0] == theirs and len(theirs) == 10

    assert main(["import", str(hf_dir), str(imported)]) == 0
    capsys.readouterr()
    a, b = greedy(moe_run, capsys), greedy(imported, capsys)
    assert a.startswith("And God said") and len(a) > len("And God said")
    assert a == b


def test_export_refuses_a_bias_balanced_run_in_one_line(moe_run: Path, tmp_path: Path, capsys) -> None:
    """Edit the run's config to say it was trained with bias balancing: export exits 2, one line."""
    run = tmp_path / "run"
    run.mkdir()
    d = json.loads((moe_run / "config.json").read_text())
    d["model"]["moe"]["bias_update_rate"] = 0.001
    (run / "config.json").write_text(json.dumps(d))
    (run / "checkpoints").symlink_to(moe_run / "checkpoints")
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bias_update_rate" in err[0]
    assert not out.exists()

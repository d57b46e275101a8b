"""Generation: the KV-cache path gives the same tokens as recomputing everything, sampling filters
do what they say, and models load from runs, checkpoint step dirs and HF directories."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.manager import CheckpointManager
from lmforge.checkpoint.state import ModelOptimizerState
from lmforge.checkpoint.weights import save_model_weights
from lmforge.config import JobConfig, ModelConfig
from lmforge.interop.hf.exporter import export_hf
from lmforge.interop.hf.importer import import_to_run
from lmforge.models.llama import SIZES, build_model
from lmforge.serve.generate import (
    GenerationError,
    filter_logits,
    generate,
    load_for_generation,
    sample_next_token,
)
from lmforge.storage.layout import step_dir_name
from lmforge.storage.model_dir import ModelDirError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def small_model(seed: int = 0, **kw) -> torch.nn.Module:
    cfg = replace(SIZES["debug"], max_seq_len=64, **kw)  # GQA: 4 heads, 2 kv heads
    return build_model(cfg, seed=seed)


def prompts(batch: int, length: int, seed: int, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


# -- KV cache vs recompute -----------------------------------------------------------------------


@pytest.mark.parametrize("batch,length,seed", [(1, 1, 0), (3, 5, 1), (4, 17, 2)])
def test_greedy_with_cache_equals_without(batch: int, length: int, seed: int):
    model = small_model()
    p = prompts(batch, length, seed)
    cached = generate(model, p, max_new_tokens=24, use_cache=True)
    recomputed = generate(model, p, max_new_tokens=24, use_cache=False)
    assert cached == recomputed
    assert all(len(row) == 24 for row in cached)
    assert len({t for row in cached for t in row}) > 3  # a real sequence, not one token repeated
    # batched rows equal rows generated alone
    assert [generate(model, row, max_new_tokens=24)[0] for row in p] == cached


def test_sampling_with_same_seed_is_reproducible_with_and_without_cache():
    model = small_model(seed=1)
    p = prompts(3, 6, seed=5)
    kw = dict(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.95)
    a = generate(model, p, seed=7, use_cache=True, **kw)
    assert a == generate(model, p, seed=7, use_cache=False, **kw)
    assert a == generate(model, p, seed=7, use_cache=True, **kw)
    assert a != generate(model, p, seed=8, use_cache=True, **kw)
    assert a != generate(model, p, max_new_tokens=20)  # sampling differs from greedy


def test_generate_accepts_tensor_and_flat_list_and_restores_mode():
    model = small_model().train()
    p = prompts(2, 4, seed=3)
    assert generate(model, torch.tensor(p), 5) == generate(model, p, 5)
    assert generate(model, p[0], 5) == generate(model, [p[0]], 5)
    assert model.training  # generate switched to eval and back
    assert generate(model, p, 0) == [[], []]


def test_stops_at_eos_per_row_and_at_max_seq_len():
    model = small_model()
    p = prompts(2, 4, seed=4)
    full = generate(model, p, max_new_tokens=12)
    eos = full[0][5]
    cut = generate(model, p, max_new_tokens=12, eos_id=eos)
    assert cut[0] == full[0][: full[0].index(eos) + 1]  # eos kept as the last token
    row1 = full[1][: full[1].index(eos) + 1] if eos in full[1] else full[1]
    assert cut[1] == row1
    # the context ends at max_seq_len = 64: a 60-token prompt leaves room for 4 new tokens
    long = prompts(1, 60, seed=6)
    assert len(generate(model, long, max_new_tokens=50)[0]) == 4
    assert generate(model, long, 50) == generate(model, long, 50, use_cache=False)


def test_bad_arguments_are_one_line_errors():
    model = small_model()
    with pytest.raises(GenerationError, match="temperature"):
        generate(model, [1, 2], 3, temperature=-1.0)
    with pytest.raises(GenerationError, match="top_k"):
        generate(model, [1, 2], 3, temperature=1.0, top_k=0)
    with pytest.raises(GenerationError, match="top_p"):
        generate(model, [1, 2], 3, temperature=1.0, top_p=1.5)
    with pytest.raises(GenerationError, match="same length"):
        generate(model, [[1, 2], [3]], 3)
    with pytest.raises(GenerationError, match="max_seq_len"):
        generate(model, list(range(65)), 3)
    with pytest.raises(GenerationError, match=r"\[0, 512\)"):
        generate(model, [1, 512], 3)
    with pytest.raises(GenerationError, match="seq >= 1"):
        generate(model, [], 3)


# -- sampling ----------------------------------------------------------------------------------


def random_logits(batch: int = 8, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_temperature_zero_top_k_one_and_tiny_top_p_are_greedy():
    logits = random_logits()
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next_token(logits, 0.0), greedy)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(sample_next_token(logits, 1.0, top_k=1, generator=g), greedy)
        assert torch.equal(sample_next_token(logits, 1.0, top_p=1e-6, generator=g), greedy)
        assert torch.equal(sample_next_token(logits, 5.0, top_k=1, top_p=0.5, generator=g), greedy)


def test_top_k_restricts_support_to_the_k_largest():
    logits = random_logits(batch=4, vocab=50, seed=1)
    k = 5
    allowed = logits.topk(k, dim=-1).indices
    g = torch.Generator().manual_seed(1)
    many = logits.repeat(500, 1)  # 2000 draws per row
    drawn = sample_next_token(many, 2.0, top_k=k, generator=g).view(500, 4)
    for row in range(4):
        seen = set(drawn[:, row].tolist())
        assert seen <= set(allowed[row].tolist())
        assert len(seen) == k  # at temperature 2 every allowed token shows up


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: set(torch.isfinite(filter_logits(logits, None, p)).nonzero()[:, 1].tolist())  # noqa: E731
    assert kept(0.4) == {1}
    assert kept(0.75) == {1, 3}  # 0.5 < 0.75 <= 0.5 + 0.3
    assert kept(0.85) == {1, 3, 2}
    assert kept(0.99) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    g = torch.Generator().manual_seed(2)
    draws = sample_next_token(logits.repeat(20000, 1), 1.0, top_p=0.75, generator=g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert freq[0] == 0 and freq[2] == 0
    assert abs(freq[1].item() - 0.5 / 0.8) < 0.02
    # top-k applies first: with k=2 the nucleus is drawn from {1, 3} only, even at p=0.99
    assert set(torch.isfinite(filter_logits(logits, 2, 0.99)).nonzero()[:, 1].tolist()) == {1, 3}


def test_temperature_scales_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(3)
    for t in (0.5, 1.0, 3.0):
        draws = sample_next_token(logits.repeat(30000, 1), t, generator=g)
        freq = torch.bincount(draws, minlength=3).float() / draws.numel()
        expected = (logits[0] / t).softmax(-1)
        assert (freq - expected).abs().max().item() < 0.015, t
    low = sample_next_token(logits.repeat(1000, 1), 0.01, generator=g)
    assert (low == 2).all()


def test_seeded_generator_is_reproducible():
    logits = random_logits(batch=16)
    a = sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(5))
    b = sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(5))
    c = sample_next_token(logits, 1.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- loading -----------------------------------------------------------------------------------


def make_run(tmp_path: Path, cfg: ModelConfig, steps: dict[int, torch.nn.Module], trainer_style: bool) -> Path:
    """A run dir as the trainer writes it: config.json, tokenizer.json, checkpoints/step-N."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(asdict(JobConfig(model=cfg))))
    (run / "tokenizer.json").write_text("{}")
    manager = CheckpointManager(run / "checkpoints", keep_last=5)
    for step, model in steps.items():
        if trainer_style:  # model + optimizer, as Trainer.checkpoint_state() hands them over
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            manager.save(step, {"app": ModelOptimizerState(model, opt), "extra": {"step": torch.tensor(step)}})
        else:
            save_model_weights(run / "checkpoints" / step_dir_name(step), model)
    return run


@pytest.mark.parametrize("trainer_style", [False, True], ids=["weights-only", "trainer"])
def test_load_run_dir_takes_newest_checkpoint_and_step_dir_takes_that_one(tmp_path: Path, trainer_style: bool):
    cfg = replace(SIZES["debug"], max_seq_len=64, tie_embeddings=True)
    old, new = build_model(cfg, seed=1), build_model(cfg, seed=2)
    run = make_run(tmp_path, cfg, {100: old, 200: new}, trainer_style)
    x = torch.tensor([prompts(1, 10, seed=0)[0]])
    model, cfg2, tok = load_for_generation(run)
    assert cfg2 == cfg and tok == run / "tokenizer.json" and not model.training
    assert model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        assert torch.equal(model(x), new(x))
        model1, _, tok1 = load_for_generation(run / "checkpoints" / "step-00000100")
        assert torch.equal(model1(x), old(x)) and tok1 == tok
    # a corrupt newest checkpoint is skipped for the run dir, and refused when named directly
    data = next((run / "checkpoints" / "step-00000200").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-8])
    with torch.no_grad():
        assert torch.equal(load_for_generation(run)[0](x), old(x))
    with pytest.raises(CheckpointError, match="step-00000200"):
        load_for_generation(run / "checkpoints" / "step-00000200")


def test_load_hf_dir_and_import_to_run(tmp_path: Path):
    model = small_model(seed=4)
    cfg = model.cfg
    export_hf(model, cfg, tmp_path / "hf")
    loaded, cfg2, tok = load_for_generation(tmp_path / "hf")
    assert tok is None
    p = prompts(2, 6, seed=1)
    expected = generate(model, p, 10)
    assert generate(loaded, p, 10) == expected

    step_dir = import_to_run(tmp_path / "hf", tmp_path / "run")
    assert step_dir == tmp_path / "run" / "checkpoints" / "step-00000000"
    run_model, run_cfg, _ = load_for_generation(tmp_path / "run")
    assert generate(run_model, p, 10) == expected
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["dim"] == cfg.dim
    from lmforge.interop.hf.base import HFFormatError
    with pytest.raises(HFFormatError, match="not empty"):
        import_to_run(tmp_path / "hf", tmp_path / "run")


def test_load_errors_are_clear(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="No such file") as missing:
        load_for_generation(tmp_path / "nope")
    assert missing.value.filename == str(tmp_path / "nope")  # the CLI's line names it
    with pytest.raises(ModelDirError, match="not a Hugging Face directory"):
        load_for_generation(tmp_path)
    cfg = replace(SIZES["debug"], max_seq_len=64)
    run = make_run(tmp_path, cfg, {}, trainer_style=False)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load_for_generation(run)
    save_model_weights(run / "checkpoints" / "step-00000001", build_model(replace(cfg, dim=32)))
    with pytest.raises(CheckpointError, match="step-00000001") as e:  # names the checkpoint, in one line
        load_for_generation(run)
    assert "\n" not in str(e.value)
    (run / "config.json").write_text(json.dumps({"model": {"dim": "wide"}}))
    with pytest.raises(GenerationError, match="model.dim"):
        load_for_generation(run)

"""Pruning units: the masks (counts, which weights, ties), Wanda's scores, the sequential block pass
(each block's statistics come from the pruned blocks below), the recovery fine-tune holding the
masks, and the option checks (one line each)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmforge.compress.errors import CompressError
from lmforge.compress.prune_layers import check_prunable, prune_magnitude, prune_wanda, target_linears
from lmforge.compress.prune_masks import keep_mask, n_m_mask, unstructured_mask, wanda_scores
from lmforge.compress.prune_options import PruneOptions, parse_pattern, parse_targets
from lmforge.compress.prune_recover import RecoverySetup, recover, validation_loss
from lmforge.compress.train_data import calibration_windows, open_train_data
from lmforge.config import ModelConfig, MoEConfig
from lmforge.models.common.linear import MatmulKernels
from lmforge.models.common.sparse_attention import document_starts
from lmforge.models.llama.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512,
                          "multiple_of": 32, "max_seq_len": 64, **kw})


def tiny_model(**kw) -> torch.nn.Module:
    return build_model(tiny_cfg(**kw), "cpu", seed=0, kernels=MatmulKernels(enabled=False)).eval()


# -- masks -----------------------------------------------------------------------------------------


def test_per_row_mask_drops_exactly_the_lowest_half_of_each_row() -> None:
    scores = torch.rand(8, 10, generator=torch.Generator().manual_seed(0)).double()
    keep = unstructured_mask(scores, 0.5, per_row=True)
    assert keep.sum(1).tolist() == [5] * 8
    for row, k in zip(scores, keep):
        assert row[~k].max() < row[k].min()


def test_layer_mask_compares_the_whole_layer() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]]).double()
    keep = unstructured_mask(scores, 0.5, per_row=False)
    assert keep.tolist() == [[False, False, False, False], [True, True, True, True]]
    keep = unstructured_mask(scores, 0.5, per_row=True)
    assert keep.tolist() == [[False, False, True, True], [False, False, True, True]]


def test_n_m_mask_keeps_the_best_n_of_every_m_consecutive_inputs() -> None:
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]]).double()
    assert n_m_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]
    assert n_m_mask(scores, 1, 4).tolist() == [[True, False, False, False, False, True, False, False]]
    with pytest.raises(CompressError, match="not a multiple of 3"):
        n_m_mask(scores, 2, 3, "layers.0.attention.wq")


def test_ties_are_broken_by_position_so_masks_are_reproducible() -> None:
    keep = unstructured_mask(torch.ones(2, 6).double(), 0.5, per_row=True)
    assert keep.tolist() == [[False, False, False, True, True, True]] * 2


def test_wanda_keeps_a_small_weight_on_a_loud_input_that_magnitude_drops() -> None:
    w = torch.tensor([[0.1, 1.0, 0.9, 0.8]])
    loud_first = torch.tensor([10_000.0, 1.0, 1.0, 1.0])  # sum of squares: ||X_0|| = 100
    wanda = keep_mask(wanda_scores(w, loud_first), 0.5, None, per_row=True)
    magnitude = keep_mask(w.abs().double(), 0.5, None, per_row=False)
    assert wanda.tolist() == [[True, True, False, False]]
    assert magnitude.tolist() == [[False, True, True, False]]
    assert wanda_scores(w, loud_first)[0, 0].item() == pytest.approx(0.1 * 100)


# -- options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    ({"sparsity": 0.0}, r"--sparsity 0.0: must be in \(0, 1\)"),
    ({"sparsity": 1.0}, r"--sparsity 1.0: must be in \(0, 1\)"),
    ({"sparsity": -0.2}, r"--sparsity -0.2"),
    ({"sparsity": math.nan}, r"--sparsity nan"),
    ({}, "exactly one of --sparsity"),
    ({"sparsity": 0.5, "pattern": (2, 4)}, "exactly one of --sparsity"),
    ({"sparsity": 0.5, "calib_samples": 0}, "--calib-samples 0"),
    ({"sparsity": 0.5, "recover_steps": -1}, "--recover-steps -1"),
    ({"sparsity": 0.5, "recover_lr": math.inf}, "--recover-lr inf"),
])
def test_bad_options_are_one_line(kw: dict, match: str) -> None:
    with pytest.raises(CompressError, match=match) as e:
        PruneOptions(method="wanda", **kw).check()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["4:2", "2:2", "0:4", "2-4", "a:b", "2:4:8", ""])
def test_bad_patterns(text: str) -> None:
    with pytest.raises(CompressError, match="must be N:M with 0 < N < M"):
        parse_pattern(text)


def test_patterns_and_targets_parse() -> None:
    assert parse_pattern("2:4") == (2, 4) and parse_pattern(" 1 : 8 ") == (1, 8)
    assert parse_targets("w2,wq") == ("wq", "w2")  # block order
    with pytest.raises(CompressError, match="unknown wx, tok_embeddings; allowed: wq"):
        parse_targets("wq,wx,tok_embeddings")


def test_moe_models_and_untileable_patterns_are_refused() -> None:
    cfg = tiny_cfg(moe=MoEConfig(n_experts=4, top_k=2))
    with pytest.raises(CompressError, match=r"model has MoE layers \(4 experts in layers 0, 1\)"):
        check_prunable(build_model(cfg, "cpu", seed=0), cfg, PruneOptions("magnitude", sparsity=0.5))
    cfg = tiny_cfg()
    with pytest.raises(CompressError, match=r"layers.0.attention.wq: 64 input features are not a multiple of 5"):
        check_prunable(tiny_model(), cfg, PruneOptions("magnitude", pattern=(2, 5)))


# -- layers ----------------------------------------------------------------------------------------


def test_magnitude_prunes_only_the_targets_to_the_asked_sparsity() -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = prune_magnitude(model, PruneOptions("magnitude", sparsity=0.5, targets=("wq", "w2")))
    assert sorted(masks) == ["layers.0.attention.wq.weight", "layers.0.feed_forward.w2.weight",
                             "layers.1.attention.wq.weight", "layers.1.feed_forward.w2.weight"]
    for name, value in model.state_dict().items():
        if name in masks:
            assert (value == 0).sum().item() == value.numel() // 2
            assert torch.equal(value[masks[name]], before[name][masks[name]])  # kept weights untouched
            dropped, kept = before[name][~masks[name]].abs(), before[name][masks[name]].abs()
            assert dropped.max() <= kept.min()  # layer-wise: the smallest half of the whole layer
        else:
            assert torch.equal(value, before[name]), name


def test_wanda_is_sequential_each_block_scored_on_the_pruned_blocks_outputs() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (10, 32))
    tokens[:, 13] = 3  # an end-of-text id: document masking as in training
    opts = PruneOptions("wanda", sparsity=0.5)
    masks, outliers = prune_wanda(model, cfg, opts, tokens, eos_id=3)
    assert set(outliers) == {n for n in target_linears(model, opts.targets)}
    # block 1's statistics, recomputed from the *pruned* block 0's outputs
    with torch.no_grad():
        doc = document_starts(tokens, 3)
        h = model.layers["0"](model.tok_embeddings(tokens), model.rope_cos, model.rope_sin, None, doc)
        x = model.layers["1"].attention_norm(h)
        sq = x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
    w = model.layers["1"].attention.wq.weight
    expected = keep_mask(wanda_scores(w, sq), 0.5, None, per_row=True)
    assert torch.equal(masks["layers.1.attention.wq.weight"], expected)
    for name, mask in masks.items():
        weight = dict(model.named_parameters())[name]
        assert torch.equal(weight == 0, ~mask), name
        assert (~mask).sum(1).tolist() == [weight.shape[1] // 2] * weight.shape[0]  # per output row


def test_two_four_wanda_leaves_two_zeros_in_every_group_of_four() -> None:
    model = tiny_model()
    masks, _ = prune_wanda(model, model.cfg, PruneOptions("wanda", pattern=(2, 4)),
                           torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1)), None)
    for name in masks:
        w = dict(model.named_parameters())[name]
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name


# -- data and recovery -----------------------------------------------------------------------------


def test_calibration_windows_are_seeded_train_windows(tiny_data_dir: Path) -> None:
    cfg = tiny_cfg()
    data = open_train_data(tiny_data_dir, "--calib-data", cfg, None, None)
    first = calibration_windows(data, 10, 32, seed=0)
    a, info = first.tokens, first.provenance
    b = calibration_windows(data, 10, 32, seed=0).tokens
    c = calibration_windows(data, 10, 32, seed=1).tokens
    assert a.shape == (10, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert first.eos_id == data.eos_id
    assert info["split"] == "train" and info["tokens"] == 320 and len(info["manifest_sha256"]) == 64
    assert info["sampling"] == "uniform over the split's windows"
    run_data = {"dir": str(tiny_data_dir), "mixing_temperature": 2.0}
    mixed = open_train_data(tiny_data_dir, "data.dir", cfg, None, run_data)
    info = calibration_windows(mixed, 10, 32, seed=0).provenance
    assert info["sampling"].startswith("the run's domain mixture: ") and "temperature 2" in info["sampling"]


def test_recovery_holds_the_masks_and_lowers_the_loss(tiny_data_dir: Path) -> None:
    model = tiny_model()
    data = open_train_data(tiny_data_dir, "--calib-data", model.cfg, None, None)
    masks = prune_magnitude(model, PruneOptions("magnitude", sparsity=0.5))
    pruned = {k: v.clone() for k, v in model.named_parameters()}
    setup = RecoverySetup(steps=8, lr=3e-3, seq_len=32, micro_batch_size=4, eval_micro_batches=4)
    result = recover(model, masks, data, setup, eos_id=data.eos_id)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert (params[name][~mask] == 0).all(), name  # pruned weights exactly zero
        assert not torch.equal(params[name][mask], pruned[name][mask])  # kept weights trained
    assert result["val_loss_after"] < result["val_loss_before"]
    assert result["val_loss_after"] == pytest.approx(validation_loss(model, data, setup, data.eos_id), rel=1e-6)
    assert result["steps"] == 8 and math.isfinite(result["train_loss_last"])


def planted_outlier_model(scale: float = 50.0, channel: int = 5) -> torch.nn.Module:
    """The tiny model with RMSNorm channel `channel` scaled by `scale` and column `channel` of the
    q/k/v weights divided by it: the same function, now with an outlier input feature on tiny weights."""
    model = tiny_model()
    with torch.no_grad():
        for block in model.layers.values():
            block.attention_norm.weight[channel] *= scale
            for lin in (block.attention.wq, block.attention.wk, block.attention.wv):
                lin.weight[:, channel] /= scale
    return model


def test_wanda_is_blind_to_a_function_preserving_outlier_feature_that_misleads_magnitude() -> None:
    """What large LLMs show (a few loud input features read by small weights), planted without
    changing the function: Wanda's scores |W_ij| * ||X_j|| do not change, so neither do its masks;
    magnitude drops the loud feature's whole column."""
    tokens = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(2))
    plain, planted = tiny_model(), planted_outlier_model()
    with torch.no_grad():
        assert torch.allclose(plain(tokens), planted(tokens), atol=1e-4)
    opts = PruneOptions("wanda", sparsity=0.5, targets=("wq", "wk", "wv"))
    a, _ = prune_wanda(plain, plain.cfg, opts, tokens, None)
    b, outliers = prune_wanda(planted, planted.cfg, opts, tokens, None)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert outliers["layers.0.attention.wq"] > 30
    magnitude = PruneOptions("magnitude", sparsity=0.5, targets=("wq",))
    kept_plain = prune_magnitude(tiny_model(), magnitude)["layers.0.attention.wq.weight"][:, 5]
    kept_planted = prune_magnitude(planted_outlier_model(), magnitude)["layers.0.attention.wq.weight"][:, 5]
    assert kept_plain.float().mean() > 0.2 and not kept_planted.any()  # planted: the whole column dropped


def test_the_pruning_bench_model_is_the_main_job_with_only_its_optimiser_and_length_changed() -> None:
    """recipes/prune-bench.toml claims the main job's shape and data, 3x its learning rate, no
    weight decay, 3,000 steps (what docs/benchmarks.md measured): anything else changed would
    make the gate's figures about another model."""
    import dataclasses

    from lmforge.config.job import load_job_config

    recipes = Path(__file__).resolve().parents[2] / "recipes"
    main, bench = (load_job_config(str(recipes / f"{n}.toml")) for n in ("tiny-dense", "prune-bench"))
    assert bench.model == main.model and bench.data == main.data and bench.tokenizer == main.tokenizer
    assert bench.scheduler == main.scheduler
    assert bench.optimizer == dataclasses.replace(main.optimizer, lr=3 * main.optimizer.lr, weight_decay=0.0)
    changed = {f.name for f in dataclasses.fields(main.train) if getattr(main.train, f.name) != getattr(bench.train, f.name)}
    assert changed == {"steps", "eval_interval", "output_dir"} and bench.train.steps == 3000

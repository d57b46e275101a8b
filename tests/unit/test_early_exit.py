"""Adaptive depth (issue 17): the exit loss joins training with gradients into the early blocks;
threshold >= 1 is the full model exactly, threshold 0 always takes the first exit; the blocks a
token skipped are computed later, so the KV cache holds the full model's keys and the decoded
logits are what one parallel forward says (the basis of perplexity under early exit);
self-speculative greedy decoding gives the full model's greedy tokens; bad settings are refused
in one line.

Random models run in float64 where two computations of one number are compared across different
kernel shapes (a chunk of rows against one row at a time): fp32 rounding could flip a near-tied
argmax, fp64 makes a flip from rounding practically impossible, so a mismatch means a bug."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmforge.config import ConfigError, load_job_config, parse_override_args
from lmforge.config.model import AttentionConfig, EarlyExitConfig
from lmforge.models.common.cross_entropy import cross_entropy
from lmforge.models.common.rope import apply_rope
from lmforge.models.llama import SIZES, build_model
from lmforge.serve.early_exit import (
    DeferredDepth,
    EarlyExitDecoder,
    EarlyExitError,
    ExitPolicy,
    check_threshold,
    confidence,
    exit_choice,
    slot_exit_forward,
)
from lmforge.serve.generate import generate
from lmforge.serve.speculative import SpeculationStats, self_speculative_generate
from lmforge.train.trainer import Trainer
from tests.helpers.cli import read_metrics, tiny_run_args
from tests.helpers.config import BASE

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def exit_model(seed: int = 0, exits: tuple[int, ...] = (1, 2), dtype: torch.dtype = torch.float64, **kw):
    """debug size with 4 blocks (GQA: 4 heads, 2 kv heads), vocab 512, exits after `exits` blocks."""
    cfg = replace(SIZES["debug"], n_layers=4, max_seq_len=96, early_exit=EarlyExitConfig(layers=list(exits)), **kw)
    return build_model(cfg, seed=seed).to(dtype)


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n, length), generator=g).tolist()


# -- training ------------------------------------------------------------------------------------


def test_exit_logits_are_the_shared_head_on_the_early_blocks_state():
    model = exit_model(dtype=torch.float32)
    x = torch.tensor(prompts(2, 9, 0))
    logits, exits = model(x, exits=True)
    assert torch.equal(logits, model(x)) and len(exits) == 2
    h = model.tok_embeddings(x)
    for j in range(2):
        h = model.layers[str(j)](h, model.rope_cos, model.rope_sin)
        if j == 0:
            torch.testing.assert_close(exits[0], model.output(model.norm(h)), rtol=0, atol=1e-6)
    torch.testing.assert_close(exits[1], model.output(model.norm(h)), rtol=0, atol=1e-6)


def test_exit_loss_is_added_and_trains_the_early_blocks(tiny_data_dir: Path, tmp_path: Path):
    """One micro-batch through the trainer: the gradient is that of CE(final) + w x sum CE(exits),
    recomputed here by hand; the exit's part reaches block 0 and nothing above the exit."""
    args = tiny_run_args(tiny_data_dir, tmp_path / "run", "--model.n_layers", "3", "--model.early_exit.layers", "1",
                         "--model.early_exit.loss_weight", "0.7", "--train.steps", "2", "--train.global_batch_size",
                         "2", "--train.micro_batch_size", "2", "--train.eval_interval", "0", "--checkpoint.enabled",
                         "false", "--model.attention.doc_mask", "false")
    trainer = Trainer(load_job_config(None, parse_override_args(args)), echo=False)
    try:
        model = trainer.model
        x, y = trainer.train_loader.next_batch()
        logged = trainer._forward_backward(x, y, last=True)
        got = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        logits, (exit1,) = model(x, exits=True)
        final, aux = cross_entropy(logits, y), cross_entropy(exit1, y)
        assert float(logged) == pytest.approx(final.item(), rel=1e-6)  # the logged loss stays the LM loss
        (final + 0.7 * aux).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
        model.zero_grad(set_to_none=True)
        model(x, exits=True)[1][0].logsumexp(-1).mean().backward()  # the exit alone
        assert model.layers["0"].feed_forward.w2.weight.grad.abs().sum() > 0
        assert model.layers["1"].feed_forward.w2.weight.grad is None  # blocks above the exit: untouched
        model.zero_grad(set_to_none=True)
        trainer.fit()
    finally:
        trainer.close()
    rows = [r for r in read_metrics(tmp_path / "run") if r.get("prefix") == "train"]
    assert rows and all(math.isfinite(r["exit_loss_1"]) and r["exit_loss_1"] > 0 for r in rows)


@pytest.mark.parametrize("overrides,key,phrase", [
    (["--model.early_exit.layers", "0"], "model.early_exit.layers", "each exit must be after 1 .. 3 blocks"),
    (["--model.early_exit.layers", "4"], "model.early_exit.layers", "each exit must be after 1 .. 3 blocks"),
    (["--model.early_exit.layers", "2,1"], "model.early_exit.layers", "distinct and increasing"),
    (["--model.early_exit.layers", "1", "--model.early_exit.loss_weight", "-1"], "model.early_exit.loss_weight",
     "must be in [0, 10]"),
])
def test_bad_exit_settings_are_refused_in_one_line(overrides: list[str], key: str, phrase: str):
    with pytest.raises(ConfigError) as err:
        load_job_config(None, parse_override_args(BASE + overrides))
    msg = str(err.value)
    assert "\n" not in msg and f"{key} = " in msg and phrase in msg, msg


@pytest.mark.parametrize("layout,key", [(["--parallel.tp", "2"], "parallel.tp"),
                                        (["--parallel.pp", "2", "--model.tie_embeddings", "false"], "parallel.pp")])
def test_exit_loss_under_tp_or_pp_is_refused(layout: list[str], key: str):
    with pytest.raises(ConfigError) as err:
        load_job_config(None, parse_override_args(BASE + ["--model.early_exit.layers", "2", *layout]), world_size=2)
    msg = str(err.value)
    assert "\n" not in msg and f"{key} = 2" in msg and "model.early_exit.layers" in msg, msg
    # untrained exits (weight 0) ask nothing of the layout
    load_job_config(None, parse_override_args(BASE + ["--model.early_exit.layers", "2",
                                                      "--model.early_exit.loss_weight", "0", *layout]), world_size=2)


# -- decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1.0, math.inf])
@pytest.mark.parametrize("batch", [1, 3])
def test_threshold_one_or_more_is_the_full_model_exactly(threshold: float, batch: int):
    model = exit_model(dtype=torch.float32)
    p = prompts(batch, 6, batch)
    depths: list[int] = []
    assert generate(model, p, 24, early_exit=ExitPolicy(threshold), exit_depths=depths) == generate(model, p, 24)
    assert depths == [4] * 23
    sampled = generate(model, p, 12, temperature=1.0, seed=3, early_exit=ExitPolicy(threshold))
    assert sampled == generate(model, p, 12, temperature=1.0, seed=3)


def test_threshold_zero_always_takes_the_first_exit():
    model = exit_model()
    p = prompts(1, 5, 7)
    depths: list[int] = []
    out = generate(model, p, 30, early_exit=ExitPolicy(0.0), exit_depths=depths)[0]
    assert depths == [1] * 29
    # each decoded token is the argmax of exit 1 (the first token: of the full-depth prefill)
    seq = torch.tensor([p[0] + out])
    logits, (exit1, _) = model(seq, exits=True)
    n = len(p[0])
    assert out[0] == int(logits[0, n - 1].argmax())
    assert out[1:] == exit1[0, n:-1].argmax(-1).tolist()
    assert out != generate(model, p, 30)[0]  # exit 1 of a random model is not the full model


@pytest.mark.parametrize("layers,measure,threshold", [(["full"], "max_prob", 0.02),
                                                      (["window", "full"], "margin", 0.025)])
def test_skipped_blocks_are_filled_and_decoding_matches_one_parallel_forward(layers: list[str], measure: str,
                                                                             threshold: float):
    """A mid threshold makes some steps exit after 1 or 2 blocks and some run all 4. Afterwards
    (i) every cached key and value equals the full model's (a prefill of the whole sequence), and
    (ii) every decoded token's logits are those `exit_choice` picks from one parallel forward,
    which is what eval/early_exit.py computes perplexity from."""
    model = exit_model(seed=3, attention=AttentionConfig(layers=layers, window=8))
    p = prompts(1, 6, 11)
    g = torch.Generator().manual_seed(0)
    feed = torch.randint(0, 512, (40,), generator=g).tolist()  # teacher-forced tokens
    policy = ExitPolicy(threshold, measure)
    dec = EarlyExitDecoder(model, 1, 96, policy)
    with torch.inference_mode():
        step_logits = [dec.prefill(torch.tensor(p))]
        step_logits += [dec.step(torch.tensor([[t]])) for t in feed]
    assert {1, 2, 4} <= set(dec.depths), dec.depths  # the threshold really mixes depths
    seq = torch.tensor([p[0] + feed])
    with torch.inference_mode():
        logits, exits = model(seq, exits=True)
        chosen, depth = exit_choice(exits, logits, (1, 2), 4, policy.threshold, policy.measure)
        n = len(p[0])
        torch.testing.assert_close(step_logits[0][0], logits[0, n - 1], rtol=1e-9, atol=1e-9)  # prefill: full depth
        torch.testing.assert_close(torch.cat(step_logits[1:]), chosen[0, n:], rtol=1e-9, atol=1e-9)
        assert depth[0, n:].tolist() == dec.depths
        ref = model.new_kv_cache(1, 96)
        model(seq, cache=ref)
        dec.depth.deepen(4)  # the last token's skipped blocks too
    for j in range(4):
        if dec.depth.cache.ring[j]:  # rolling buffer: slot = position % window, the same in both
            assert dec.depth.cache.slot_pos[j].tolist() == ref.slot_pos[j].tolist()
        torch.testing.assert_close(dec.depth.cache.k[j], ref.k[j], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(dec.depth.cache.v[j], ref.v[j], rtol=1e-9, atol=1e-9)


def test_deferred_blocks_run_later_in_one_forward():
    model = exit_model()
    d = DeferredDepth(model, 1, 32)
    with torch.inference_mode():
        d.extend(torch.tensor([[1, 2, 3]]))
        d.deepen(4)
        for t in (4, 5, 6):
            d.extend(torch.tensor([[t]]))
            d.deepen(1)
        assert [d.depth_of(i) for i in range(6)] == [4, 4, 4, 1, 1, 1]
        assert d.deepen(4).shape[1] == 3  # the three waiting positions, brought to full depth together
        d.truncate(4)
    assert d.filled == [4, 4, 4, 4] and d.length == 4


def test_confidence_measures():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.4, 0.4, 0.2]]))
    torch.testing.assert_close(confidence(logits, "max_prob"), torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(confidence(logits, "margin"), torch.tensor([0.3, 0.0]), atol=1e-6, rtol=0)


# -- self-speculation ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_speculative_greedy_equals_full_greedy(seed: int):
    model = exit_model(seed=seed)
    stats = SpeculationStats()
    for i, length in enumerate((1, 5, 20)):
        p = prompts(1, length, 100 * seed + i)[0]
        full = generate(model, [p], 40)[0]
        for draft_layer, k in ((1, 1), (1, 4), (2, 3)):
            assert self_speculative_generate(model, p, 40, draft_layer, k, stats=stats) == full, (length, k)
    assert 0 < stats.accepted < stats.drafted  # drafts both accepted and rejected: both paths ran


def test_self_speculation_stops_at_eos_and_budget():
    model = exit_model(seed=4)
    p = prompts(1, 4, 9)[0]
    full = generate(model, [p], 30)[0]
    eos = full[12]
    want = generate(model, [p], 30, eos_id=eos)[0]
    assert want[-1] == eos and len(want) <= 13
    assert self_speculative_generate(model, p, 30, draft_tokens=5, eos_id=eos) == want
    assert self_speculative_generate(model, p, 7, draft_tokens=5) == full[:7]
    assert self_speculative_generate(model, p[:1] * 95, 30, draft_tokens=5) == generate(model, [p[:1] * 95], 30)[0]


# -- refusals ----------------------------------------------------------------------------------------


def test_refusals_are_one_line():
    plain = exit_model(exits=())
    for call in (lambda: generate(plain, [[1, 2]], 4, early_exit=ExitPolicy(0.5)),
                 lambda: self_speculative_generate(plain, [1, 2], 4)):
        with pytest.raises(EarlyExitError, match="no early exits|has none") as err:
            call()
        assert "\n" not in str(err.value)
    for bad in (-0.1, math.nan, "0.5", True):
        with pytest.raises(EarlyExitError, match="early_exit_threshold"):
            check_threshold(bad)  # type: ignore[arg-type]
    with pytest.raises(EarlyExitError, match="measure"):
        generate(exit_model(), [[1, 2]], 4, early_exit=ExitPolicy(0.5, "entropy"))
    windowed = exit_model(attention=AttentionConfig(layers=["window"], window=8))
    with pytest.raises(EarlyExitError, match="sliding-window layer"):
        self_speculative_generate(windowed, [1, 2], 30)
    with pytest.raises(EarlyExitError, match="top-k"):
        generate(exit_model(attention=AttentionConfig(layers=["topk"])), [[1]], 2, early_exit=ExitPolicy(0.5))


# -- the server engine's step (SlotKVCache, a threshold per row) ------------------------------------


def _slot_caches(model, lengths: list[int]):
    """Two identical slot caches holding prompts of `lengths` in slots 0.., and the next tokens."""
    caches = [model.new_slot_cache(4, 64) for _ in range(2)]
    for slot, n in enumerate(lengths):
        p = torch.tensor(prompts(1, n, 50 + slot))
        for c in caches:
            c.bind([slot], n)
            with torch.inference_mode():
                model(p, cache=c)
    return caches, torch.tensor(prompts(len(lengths), 1, 99))


def test_slot_step_without_thresholds_is_the_model_and_per_row_thresholds_exit_alone():
    model = exit_model(dtype=torch.float32)
    rows = [0, 1, 2]
    (ref, got), tokens = _slot_caches(model, [3, 7, 5])
    with torch.inference_mode():
        ref.bind(rows, 1)
        want = model(tokens, cache=ref)[:, -1]
        got.bind(rows, 1)
        logits, depths = slot_exit_forward(model, tokens, got, [None, 1.0, None])
        assert torch.equal(logits, want) and depths == [4, 4, 4] and got.lens[:3] == ref.lens[:3] == [4, 8, 6]
        for j in range(4):
            assert torch.equal(got.k[j], ref.k[j]) and torch.equal(got.v[j], ref.v[j])

    (ref, got), tokens = _slot_caches(model, [3, 7, 5])
    with torch.inference_mode():
        ref.bind(rows, 1)
        want = model(tokens, cache=ref)[:, -1]
        got.bind(rows, 1)
        logits, depths = slot_exit_forward(model, tokens, got, [None, 0.0, None])  # row 1 leaves at exit 1
        assert depths == [4, 1, 4] and got.lens[:3] == [4, 8, 6]
        torch.testing.assert_close(logits[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-5)
        seq = torch.cat([torch.tensor(prompts(1, 7, 51)), tokens[1:2]], dim=1)  # slot 1: its prompt + token
        h = model.layers["0"](model.tok_embeddings(seq), model.rope_cos, model.rope_sin)[:, -1:]
        torch.testing.assert_close(logits[1], model.head(h[0, -1]), rtol=1e-5, atol=1e-5)
        for j in (1, 2, 3):  # the skipped blocks hold keys and values of the exit state (CALM)
            attn = model.layers[str(j)].attention
            x = model.layers[str(j)].attention_norm(h)
            k = apply_rope(attn.wk(x).view(1, 1, -1, attn.head_dim), model.rope_cos[7:8], model.rope_sin[7:8])
            torch.testing.assert_close(got.k[j][1, 7], k[0, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.v[j][1, 7], attn.wv(x)[0, 0].view(-1, attn.head_dim), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.k[j][[0, 2]], ref.k[j][[0, 2]], rtol=1e-5, atol=1e-6)  # the others


def test_training_flops_count_the_exit_heads():
    from lmforge.observability.flops import training_flops_per_token
    from lmforge.observability.step_flops import StepFlops

    plain = SIZES["debug"]
    exits = replace(plain, n_layers=3, early_exit=EarlyExitConfig(layers=[1, 2]))
    three = replace(plain, n_layers=3)
    head = 3 * 2 * plain.dim * plain.vocab_size  # forward + backward of one more head per token
    assert training_flops_per_token(exits, 32) == pytest.approx(training_flops_per_token(three, 32) + 2 * head)
    untrained = replace(exits, early_exit=EarlyExitConfig(layers=[1, 2], loss_weight=0))
    assert training_flops_per_token(untrained, 32) == training_flops_per_token(three, 32)
    flops = StepFlops(exits, 32)
    flops.add(torch.zeros((2, 32), dtype=torch.long))  # one document per row: the per-token count
    assert flops.take(None, torch.device("cpu")) == pytest.approx(64 * training_flops_per_token(exits, 32))

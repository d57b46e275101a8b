"""Mixture-of-Experts: routers on hand-made scores (experts, weights, aux / z loss, drops, bias
update), grouped expert compute against the loop reference, the layer against a per-token
reference, model integration (dense/MoE stacks, meta init, KV cache) and the config checks."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ConfigError, ModelConfig, MoEConfig
from lmforge.models.common.mlp import SwiGLU
from lmforge.models.common.moe import (
    ExpertChoiceRouter,
    GroupedExperts,
    MoE,
    TokenChoiceRouter,
    combine,
    load_stats,
    padded_bmm,
)
from lmforge.models.llama import Transformer, build_model, count_params
from lmforge.train.router_balance import moe_layers, moe_metrics, router_loss, update_expert_biases

DIM = 16


def router(**kw) -> TokenChoiceRouter:
    return TokenChoiceRouter(DIM, MoEConfig(**{"n_experts": 4, "top_k": 2, **kw}))


def assignments(r) -> list[tuple[int, int, float]]:
    """(expert, token, weight) triples from a Routing, in its (expert-sorted) order."""
    experts = torch.repeat_interleave(torch.arange(r.counts.numel()), r.counts)
    return [(int(e), int(t), float(w)) for e, t, w in zip(experts, r.token_idx, r.weights)]


# -- token choice ------------------------------------------------------------------------------


def test_token_choice_softmax_topk_weights_aux_and_z_loss():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0],
                           [0.0, 3.0, 2.5, 0.0],
                           [1.2, 1.0, 4.0, 0.5]])
    scores = logits.softmax(-1)
    r = router().route(logits, scores)
    # token 0 -> experts 0, 1; token 1 -> 1, 2; token 2 -> 2, 0. Sorted by expert, and within an
    # expert first choices before second choices.
    got = assignments(r)
    assert [(e, t) for e, t, _ in got] == [(0, 0), (0, 2), (1, 1), (1, 0), (2, 2), (2, 1)]
    assert r.counts.tolist() == [2, 2, 2, 0]
    # weights: the two chosen softmax scores renormalised to sum to 1 per token
    w0 = scores[0, [0, 1]] / scores[0, [0, 1]].sum()
    assert got[0][2] == pytest.approx(float(w0[0])) and got[3][2] == pytest.approx(float(w0[1]))
    assert got[0][2] == pytest.approx(1 / (1 + math.exp(-1)))
    per_token = torch.zeros(3)
    for _, t, w in got:
        per_token[t] += w
    assert per_token.tolist() == pytest.approx([1.0, 1.0, 1.0])
    # aux = E * sum_i f_i P_i, f = counts / (T k) = [2, 2, 2, 0] / 6, P = mean softmax over tokens
    f = torch.tensor([2, 2, 2, 0]) / 6
    assert float(r.aux_loss) == pytest.approx(float(4 * (f * scores.mean(0)).sum()), rel=1e-6)
    assert float(r.z_loss) == pytest.approx(float(torch.logsumexp(logits, -1).square().mean()), rel=1e-6)
    assert r.load.tolist() == [2, 2, 2, 0] and int(r.dropped) == 0


def test_aux_loss_is_one_when_uniform_and_grows_when_collapsed():
    e = 4
    uniform = torch.zeros(8, e)
    r = router().route(uniform, uniform.softmax(-1))
    # ties: every token picks experts 0 and 1, f = [.5, .5, 0, 0], P = 1/4 each -> 4 * (1/4) = 1
    assert float(r.aux_loss) == pytest.approx(1.0)
    collapsed = torch.tensor([[10.0, 9.0, 0.0, 0.0]]).repeat(8, 1)
    rc = router().route(collapsed, collapsed.softmax(-1))
    assert float(rc.aux_loss) > 1.9  # -> 2 = E * (0.5 * ~0.73 + 0.5 * ~0.27) as probabilities concentrate


def test_sigmoid_scores_with_selection_bias_do_not_change_weights():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    scores = logits.sigmoid()
    r = router(score_func="sigmoid")
    plain = assignments(r.route(logits, scores))
    assert [e for e, _, _ in plain] == [0, 3]
    r.expert_bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]))  # lifts expert 1 above expert 0 for selection
    biased = assignments(r.route(logits, scores))
    assert [e for e, _, _ in biased] == [1, 3]
    s1, s3 = float(scores[0, 1]), float(scores[0, 3])
    assert [w for _, _, w in biased] == pytest.approx([s1 / (s1 + s3), s3 / (s1 + s3)])  # unbiased scores
    r.norm_topk = False
    r.route_scale = 2.5
    raw = assignments(r.route(logits, scores))
    assert [w for _, _, w in raw] == pytest.approx([2.5 * s1, 2.5 * s3])


def test_capacity_drops_overflow_first_choices_win():
    # 4 tokens, k = 2, E = 4, factor 0.5 -> capacity ceil(0.5 * 4 * 2 / 4) = 1 per expert.
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0],   # first 0, second 1
                           [2.0, 3.0, 0.0, 0.0],   # first 1, second 0
                           [3.0, 0.0, 2.0, 0.0],   # first 0 (full: dropped), second 2
                           [0.0, 0.0, 2.0, 3.0]])  # first 3, second 2 (full after token 2: dropped)
    r = router(capacity_factor=0.5).route(logits, logits.softmax(-1))
    assert [(e, t) for e, t, _ in assignments(r)] == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert int(r.dropped) == 4 and r.counts.tolist() == [1, 1, 1, 1]
    assert r.load.tolist() == [3, 2, 2, 1]  # the demand, before dropping
    dropless = router().route(logits, logits.softmax(-1))
    assert int(dropless.dropped) == 0 and int(dropless.counts.sum()) == 8


def test_bias_update_moves_towards_the_mean_load():
    r = router()
    r.update_bias(torch.tensor([10.0, 2.0, 4.0, 0.0]), rate=0.01)  # mean 4
    assert r.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.01])
    r.update_bias(torch.tensor([10.0, 2.0, 4.0, 0.0]), rate=0.01)
    assert r.expert_bias.tolist() == pytest.approx([-0.02, 0.02, 0.0, 0.02])


# -- expert choice -----------------------------------------------------------------------------


def test_expert_choice_each_expert_takes_its_top_tokens():
    cfg = MoEConfig(n_experts=2, top_k=1, router="expert_choice", capacity_factor=1.0)
    r = ExpertChoiceRouter(DIM, cfg)
    # 4 tokens, capacity ceil(1.0 * 4 * 1 / 2) = 2 tokens per expert
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    out = r.route(scores.log(), scores)
    got = assignments(out)
    assert [(e, t) for e, t, _ in got] == [(0, 0), (0, 1), (1, 3), (1, 2)]
    assert [w for _, _, w in got] == pytest.approx([0.9, 0.8, 0.6, 0.3])
    assert out.counts.tolist() == [2, 2]
    # token 2 got only expert 1; with capacity 2.0 every expert takes every token (token gets E experts)
    r.capacity_factor = 2.0
    assert r.route(scores.log(), scores).counts.tolist() == [4, 4]
    # a token nobody picks is passed by the residual: combine gives it 0
    r.capacity_factor = 0.25  # capacity 1: experts take tokens 0 and 3
    one = r.route(scores.log(), scores)
    y = combine(torch.ones(2, 3), one, 4)
    assert y[:, 0].tolist() == pytest.approx([0.9, 0.0, 0.0, 0.6])


# -- grouped experts ---------------------------------------------------------------------------


def experts_and_input(dtype=torch.float32, dim=16, hidden=32, e=4, counts=(5, 0, 9, 2), seed=0):
    torch.manual_seed(seed)
    ex = GroupedExperts(dim, hidden, e)
    ex.init_weights(0.2, 0.2)
    ex = ex.to(dtype)
    x = torch.randn(sum(counts), dim, dtype=dtype)
    return ex, x, torch.tensor(counts)


@pytest.mark.parametrize("path", ["grouped", "padded_bmm"])
def test_grouped_equals_loop_exactly_fp32_forward_and_grads(path, monkeypatch):
    ex, x, counts = experts_and_input()
    if path == "padded_bmm":
        monkeypatch.setattr("lmforge.models.common.moe._grouped_ok", lambda *a: False)
    else:
        assert hasattr(torch, "_grouped_mm")
    g = torch.randn(x.shape[0], 16, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for fn in (ex.forward, ex.forward_loop):
        ex.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi, counts)
        y.backward(g)
        outs.append(y.detach())
        grads.append([xi.grad, ex.w1.grad, ex.w3.grad, ex.w2.grad])
    if path == "grouped":
        assert torch.equal(outs[0], outs[1])
        for a, b in zip(*grads):
            assert torch.equal(a, b)
    else:  # bmm over padded groups: same math, MKL may block the sums differently
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert grads[0][1][1].abs().sum() == 0  # expert 1 got no tokens: zero gradient, not garbage


def test_grouped_bf16_and_autocast_close_to_fp32():
    ex, x, counts = experts_and_input()
    ref = ex.forward_loop(x, counts)
    # Measured (torch 2.13 CPU, AMD EPYC Zen 3): the largest difference from fp32 is 0.0162, 0.5% of
    # the largest output (3.25), the same in both paths; allowed: 3x that. A wrong expert or weight
    # moves outputs by O(1).
    allowed = 3 * 0.0162
    bf = ex.to(torch.bfloat16)(x.bfloat16(), counts)
    assert bf.dtype == torch.bfloat16
    err = (bf.float() - ref).abs().max().item()
    assert 0 < err <= allowed, err
    ex.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ex(x, counts)
    assert auto.dtype == torch.bfloat16
    err = (auto.float() - ref).abs().max().item()
    assert 0 < err <= allowed, err


def test_padded_bmm_handles_odd_widths():
    w = torch.randn(3, 5, 7)
    x = torch.randn(6, 7)
    counts = torch.tensor([1, 0, 5])
    ref = torch.cat([x[:1] @ w[0].T, x[1:] @ w[2].T])
    torch.testing.assert_close(padded_bmm(x, w, counts), ref)


# -- the layer ---------------------------------------------------------------------------------


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert: weight * SwiGLU_e(x) (+ gated shared expert)."""
    flat = x.reshape(-1, x.shape[-1])
    r = moe.router(flat)
    out = torch.zeros_like(flat)
    experts = torch.repeat_interleave(torch.arange(r.counts.numel()), r.counts)
    ex = moe.experts
    for e, t, w in zip(experts.tolist(), r.token_idx.tolist(), r.weights):
        h = F.silu(flat[t] @ ex.w1[e].T) * (flat[t] @ ex.w3[e].T)
        out[t] += w * (h @ ex.w2[e].T)
    if moe.shared_experts is not None:
        shared = moe.shared_experts(flat)
        if moe.shared_expert_gate is not None:
            shared = shared * torch.sigmoid(moe.shared_expert_gate(flat))
        out += shared
    return out.reshape(x.shape)


@pytest.mark.parametrize("kw", [
    {},
    {"score_func": "sigmoid", "n_shared_experts": 2, "shared_expert_gate": True, "capacity_factor": 0.75},
    {"router": "expert_choice", "capacity_factor": 1.0, "top_k": 2},
])
def test_moe_layer_equals_per_token_reference(kw):
    torch.manual_seed(0)
    moe = MoE(DIM, 32, MoEConfig(**{"n_experts": 4, "top_k": 2, **kw}))
    moe.init_weights(0.3, 0.3)
    x = torch.randn(2, 6, DIM)
    torch.testing.assert_close(moe(x), reference_moe(moe, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe(x), moe(x, loop=True), rtol=0, atol=0)


def test_layer_records_stats_and_router_loss_with_grad():
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=4, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001, bias_update_rate=0.1)
    moe = MoE(DIM, 32, cfg)
    moe.init_weights(0.3, 0.3)
    moe(torch.randn(3, 4, DIM))
    s = moe.last_stats
    assert float(s["tokens_per_expert"].sum()) == 3 * 4 * 2
    expected = 0.01 * float(s["aux_loss"]) + 0.001 * float(s["z_loss"])
    layers = [(1, moe)]
    loss = router_loss(layers)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    # the bias moves against the observed load (one rank: no group), then the counter resets
    load = moe.load_sum.clone()
    update_expert_biases(layers)
    assert torch.equal(moe.router.expert_bias, 0.1 * torch.sign(load.mean() - load))
    assert moe.load_sum is None
    moe.eval()
    moe(torch.randn(1, 2, DIM))
    assert moe.load_sum is None  # eval forwards do not count


def test_moe_metrics_from_hand_set_stats():
    moe = MoE(DIM, 32, MoEConfig(n_experts=4))
    moe.last_stats = {"tokens_per_expert": torch.tensor([4.0, 4.0, 2.0, 6.0]), "dropped": torch.tensor(3),
                      "aux_loss": torch.tensor(1.25), "z_loss": torch.tensor(0.5)}
    m = moe_metrics([(2, moe)])
    std = math.sqrt((0 + 0 + 4 + 4) / 4)
    assert m["moe2_load_cv"] == pytest.approx(std / 4)
    assert m["moe2_load_max_over_mean"] == pytest.approx(1.5)
    assert m["moe2_dropped"] == 3 and m["moe2_aux_loss"] == 1.25 and m["moe2_z_loss"] == 0.5
    assert m["moe2_tokens_e3"] == 6 and m["moe_load_cv"] == m["moe2_load_cv"]
    assert load_stats(torch.tensor([5.0, 5.0])) == {"load_cv": 0.0, "load_max_over_mean": 1.0}


# -- model integration ---------------------------------------------------------------------------

MOE_MODEL = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                        max_seq_len=64, moe=MoEConfig(n_experts=4, top_k=2, n_shared_experts=1, expert_hidden=32,
                                                      first_k_dense=1, bias_update_rate=0.01))


def test_first_k_dense_layers_stay_dense_and_counts_match():
    with torch.device("meta"):
        model = Transformer(MOE_MODEL)
    kinds = [type(b.feed_forward) for b in model.layers.values()]
    assert kinds == [SwiGLU, MoE, MoE]
    assert sum(p.numel() for p in model.parameters()) == count_params(MOE_MODEL)["total"]
    every_other = replace(MOE_MODEL, n_layers=4, moe=replace(MOE_MODEL.moe, first_k_dense=0, layer_interval=2))
    assert [every_other.is_moe_layer(i) for i in range(4)] == [True, False, True, False]
    # active: router 64*4 + 2 routed + 1 shared expert of 3*64*32 each, instead of 4 routed + 1 shared
    c = count_params(MOE_MODEL)
    assert c["total"] - c["active"] == 2 * (2 * 3 * 64 * 32)
    assert [i for i, _ in moe_layers(model)] == [1, 2]


def test_meta_build_init_is_seeded_and_bias_is_state():
    a, b = build_model(MOE_MODEL, seed=3), build_model(MOE_MODEL, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert "layers.1.feed_forward.router.expert_bias" in sa
    assert "layers.1.feed_forward.experts.w1" in sa and sa["layers.1.feed_forward.experts.w1"].shape == (4, 32, 64)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert float(sa["layers.1.feed_forward.router.expert_bias"].abs().sum()) == 0
    assert 0.01 < float(sa["layers.2.feed_forward.experts.w3"].std()) < 0.03


def test_kv_cache_generation_matches_full_pass():
    model = build_model(MOE_MODEL, seed=0).eval()
    toks = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    full = model(toks)
    cache = model.new_kv_cache(2, 16)
    parts = [model(toks[:, :5], cache)] + [model(toks[:, i:i + 1], cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_meta_forward_and_bf16_autocast():
    with torch.device("meta"):
        model = Transformer(MOE_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.zeros(2, 8, dtype=torch.long, device="meta"))
    assert out.shape == (2, 8, 256)
    real = build_model(MOE_MODEL, seed=0)
    toks = torch.randint(0, 256, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = real(toks)
    torch.testing.assert_close(low.float(), real(toks), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("key,value,match", [
    ("top_k", 5, "model.moe.top_k"),
    ("aux_loss_coef", -1.0, "model.moe.aux_loss_coef"),
    ("shared_expert_gate", True, "model.moe.shared_expert_gate"),
    ("router", "expert_choice", "model.moe.capacity_factor"),
    ("first_k_dense", 3, "model.moe.first_k_dense"),
])
def test_bad_moe_config_is_one_clear_line(key, value, match):
    cfg = replace(MOE_MODEL, moe=replace(MOE_MODEL.moe, n_shared_experts=0, bias_update_rate=0.0,
                                         **{key: value}))
    with pytest.raises(ConfigError, match=match) as e:
        cfg.validate()
    assert "\n" not in str(e.value)


def test_flops_count_active_parameters_by_hand():
    from lmforge.observability.flops import flops_breakdown, matmul_params

    cfg = replace(MOE_MODEL, moe=replace(MOE_MODEL.moe, shared_expert_gate=True))
    assert cfg.ffn_hidden_size == 192
    dense_ffn = 3 * 64 * 192
    router = 64 * 4
    routed = 2 * 3 * 64 * 32  # top_k = 2 experts of width 32
    shared = 3 * 64 * 32 + 64  # one shared expert + its gate (dim x 1)
    attn = 64 * 64 + 2 * 64 * 32 + 64 * 64
    assert matmul_params(cfg) == 3 * attn + dense_ffn + 2 * (router + routed + shared) + 64 * 256
    assert flops_breakdown(cfg, 16)["ffn"] == 2 * (dense_ffn + 2 * (router + routed + shared))
    # expert choice: capacity_factor * top_k experts per token on average
    ec = replace(cfg, moe=replace(cfg.moe, router="expert_choice", capacity_factor=1.5, bias_update_rate=0.0))
    assert flops_breakdown(ec, 16)["ffn"] == 2 * (dense_ffn + 2 * (router + 1.5 * routed + shared))


def test_sizes_lists_moe_models_with_active_params(capsys):
    from lmforge.cli import main

    assert main(["sizes"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.strip().startswith("mixtral-8x7b"))
    # Mixtral 8x7B: 46.7B parameters, 12.9B active (Mistral AI's published figures)
    assert "46,702,792,704" in line and "12,879,925,248" in line and "2/8" in line


def test_hf_export_refuses_moe_clearly():
    from lmforge.interop.hf.base import HFFormatError
    from lmforge.interop.hf.registry import to_hf_config

    with pytest.raises(HFFormatError, match="Mixture-of-Experts"):
        to_hf_config(MOE_MODEL)


# -- which forwards count for bias balancing -------------------------------------------------------


def _balancing_layer() -> MoE:
    torch.manual_seed(0)
    moe = MoE(DIM, 32, MoEConfig(n_experts=4, top_k=2, bias_update_rate=0.1))
    moe.init_weights(0.3, 0.3)
    return moe


def test_load_counts_only_forwards_that_are_backpropagated():
    """A training forward's load counts when its backward runs, once; a forward that is never
    backpropagated (no_grad, or torch pipelining's shape inference: autograd.grad towards the
    input only) does not count."""
    moe = _balancing_layer()
    x = torch.randn(3, 4, DIM, requires_grad=True)
    out = moe(x)
    assert moe.load_sum is None  # not before the backward
    out.sum().backward()
    once = moe.load_sum.clone()
    assert float(once.sum()) == 3 * 4 * 2
    moe(x).sum().backward()
    assert torch.equal(moe.load_sum, 2 * once)  # two trained micro-batches, same tokens

    moe.load_sum = None
    with torch.no_grad():
        moe(x)
    (grad_x,) = torch.autograd.grad(moe(x).sum(), x)  # shape inference: input gradients only
    assert grad_x.abs().sum() > 0 and moe.load_sum is None
    moe(x)  # a forward whose graph is dropped
    assert moe.load_sum is None


@pytest.mark.parametrize("mode", ["full", "op"])
def test_load_counts_once_under_activation_checkpointing(mode: str):
    """The recomputed forward does not count again: the same load as without checkpointing."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    from lmforge.parallel.ac import _save_matmuls

    moe = _balancing_layer()
    x = torch.randn(3, 4, DIM, requires_grad=True)
    moe(x).sum().backward()
    plain = moe.load_sum.clone()
    moe.load_sum = None
    kwargs = {"context_fn": partial(create_selective_checkpoint_contexts, _save_matmuls)} if mode == "op" else {}
    checkpoint(moe, x, use_reentrant=False, **kwargs).sum().backward()
    assert torch.equal(moe.load_sum, plain)


@pytest.mark.parametrize("device, dtype, compiling, capability, want", [
    ("cuda", torch.bfloat16, False, (9, 0), "grouped"),      # H100: the CUTLASS kernel
    ("cuda", torch.bfloat16, True, (10, 0), "grouped"),      # B200, compiled: bf16 has a meta kernel
    ("cuda", torch.bfloat16, False, (8, 0), "padded_bmm"),   # A100: torch's fallback loops with host syncs
    ("cuda", torch.float16, False, (9, 0), "padded_bmm"),    # fp16 (GPUs without bf16 run fp16)
    ("cuda", torch.float32, False, (9, 0), "padded_bmm"),
    ("cpu", torch.float32, False, None, "grouped"),
    ("cpu", torch.float32, True, None, "padded_bmm"),        # compile: the meta kernel is bf16-only
    ("cpu", torch.bfloat16, True, None, "grouped"),
    ("meta", torch.bfloat16, False, None, "padded_bmm"),
])
def test_grouped_mm_path_by_device_and_dtype(device, dtype, compiling, capability, want):
    from lmforge.models.common.moe import grouped_mm_path

    assert grouped_mm_path(device, dtype, compiling, capability) == want


def test_grouped_mm_takes_the_chosen_path(monkeypatch):
    """`grouped_mm` follows `grouped_mm_path`: forced to the padded bmm it never calls
    torch._grouped_mm (and gives the same result)."""
    import lmforge.models.common.moe as moe_mod

    ex, x, counts = experts_and_input()
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    want = moe_mod.grouped_mm(x, ex.w1.detach(), counts)
    assert calls  # fp32 on CPU, eager: grouped
    calls.clear()
    monkeypatch.setattr(moe_mod, "grouped_mm_path", lambda *a, **k: "padded_bmm")
    got = moe_mod.grouped_mm(x, ex.w1.detach(), counts)
    assert not calls
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_number_of_rows_takes_the_grouped_kernel_on_cpu(dtype, monkeypatch):
    """Under expert parallelism a rank receives a different number of rows each step (11 here,
    not a multiple of 4 or 8): on CPU they still take torch._grouped_mm, not the padded bmm that
    pays for the busiest expert, and give the loop's outputs and gradients."""
    import lmforge.models.common.moe as moe_mod

    ex, x, counts = experts_and_input(dtype, counts=(3, 0, 7, 1))
    assert x.shape[0] == 11 and moe_mod._grouped_ok(x, ex.w1, ex.w3, ex.w2)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.randn(11, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    results = []
    for fn in (ex.forward, ex.forward_loop):
        ex.zero_grad()
        xi = x.clone().requires_grad_()
        fn(xi, counts).backward(g)
        results.append([xi.grad, ex.w1.grad, ex.w2.grad])
    assert len(calls) == 3  # w1, w3, w2: all grouped
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0) if dtype == torch.float32 else \
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_compiled_blocks_count_the_same_load_and_print_nothing(capfd):
    """torch.compile per block (as lmforge.parallel.compile): the load counted for balancing
    equals eager's, and no graph-break warning reaches the terminal (the counting node and the
    padded bmm run eagerly on purpose)."""
    from lmforge.models.llama import build_model
    from lmforge.parallel.compile import apply_compile
    from lmforge.train.router_balance import moe_layers

    torch._dynamo.reset()
    x = torch.randint(0, MOE_MODEL.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    loads = {}
    for mode in ("eager", "compiled"):
        model = build_model(MOE_MODEL, "cpu", seed=0)
        if mode == "compiled":
            apply_compile(model)
        for _ in range(2):
            model(x).float().sum().backward()
        loads[mode] = [m.load_sum for _, m in moe_layers(model)]
    assert len(loads["eager"]) == 2 and all(torch.equal(a, b) for a, b in zip(loads["eager"], loads["compiled"]))
    assert float(loads["eager"][0].sum()) == 2 * 2 * 32 * 2  # two micro-batches, once each
    err = capfd.readouterr().err
    assert "Graph break" not in err and "Warning" not in err, err[-2000:]

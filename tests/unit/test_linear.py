"""models/common/linear.py: fused projections and per-shape matmul kernels compute what F.linear does.

Tolerances are fp32's own: each path's outputs and gradients are compared elementwise with an fp64
reference and must stay within the rounding bound of a sum of fp32 products in any order (Higham's
gamma_n), which F.linear meets too. A multiple of F.linear's error on the same data was tried first;
it read 4.8x on one thread with AVX2 kernels, where MKL's blocking happened to sum more accurately."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.models.common import linear as linear_mod
from lmforge.models.common.linear import KERNELS, MIN_MACS, Linear, MatmulKernels, fast_path_ok, fused_linear
from lmforge.models.llama import Transformer, build_model

onednn = pytest.mark.skipif(not linear_mod._onednn_available(), reason="torch built without oneDNN")


class Forced(MatmulKernels):
    """Every shape on one kernel (no timing), to test each kernel on its own."""

    def __init__(self, name: str):
        super().__init__(cache_path=None, enabled=True)
        self.name = name
        self.used: list[str] = []

    def _measure(self, a, b, bias) -> str:
        self.used.append(self.name)
        return self.name


U32 = 2.0**-24  # fp32's unit roundoff


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): a sum of n fp32 products is off by at most gamma_n times
    the sum of their magnitudes, whatever order a kernel sums them in (Higham, Accuracy and
    Stability of Numerical Algorithms, 2nd ed., section 3.1)."""
    return n * U32 / (1 - n * U32)


def rounding_bounds(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor] | None,
                    dy: torch.Tensor) -> list[torch.Tensor]:
    """Elementwise bound on the fp32 error of y, dx, each dW (and db): gamma of the summed length
    times the same sums over the operands' magnitudes. A kernel that sums in any order meets it; one
    that rounds operands below fp32 (tf32, bf16) or drops or repeats a term does not."""
    ax, ady = x.double().abs().flatten(0, -2), dy.double().abs().flatten(0, -2)  # (M, K), (M, N)
    aw = torch.cat(ws).double().abs()  # (N, K)
    (m, k), n = ax.shape, aw.shape[0]
    split = [w.shape[0] for w in ws]
    y = ax @ aw.T + (torch.cat(bs).double().abs() if bs else 0)
    out = [gamma(k + 1) * y, gamma(n) * (ady @ aw), *(gamma(m) * (ady.T @ ax)).split(split)]
    if bs:
        out += list((gamma(m) * ady.sum(0)).split(split))
    return out


def plain_linears(xx: torch.Tensor, ww: list[torch.Tensor], bb: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """F.linear, projection by projection: the reference path."""
    return [F.linear(xx, w, b) for w, b in zip(ww, bb or [None] * len(ww))]


def outputs_and_grads(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor] | None, dy: torch.Tensor,
                      dtype: torch.dtype, fn) -> list[torch.Tensor]:
    """y and dx as (M, .) matrices, then each dW (and db), of `fn(x, ws, bs)` run in `dtype` on copies."""
    xx = x.to(dtype, copy=True).requires_grad_()
    ww = [w.to(dtype, copy=True).requires_grad_() for w in ws]
    bb = [b.to(dtype, copy=True).requires_grad_() for b in bs] if bs else None
    y = torch.cat(fn(xx, ww, bb), -1)
    y.backward(dy.to(dtype))
    return [y.flatten(0, -2), xx.grad.flatten(0, -2), *(w.grad for w in ww), *((b.grad for b in bb) if bb else ())]


def abs_errors(got: list[torch.Tensor], x, ws, bs, dy) -> list[torch.Tensor]:
    """Elementwise abs error of each of `got` against fp64 autograd through F.linear."""
    exact = outputs_and_grads(x, ws, bs, dy, torch.float64, plain_linears)
    return [(a.double() - e).abs() for a, e in zip(got, exact)]


def errors(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor] | None, dy: torch.Tensor,
           fn) -> list[torch.Tensor]:
    """Elementwise abs error of y, dx, each dW (and db) of `fn(x, ws, bs)` in fp32 against fp64 autograd."""
    return abs_errors(outputs_and_grads(x, ws, bs, dy, torch.float32, fn), x, ws, bs, dy)


def modules(ws: list[torch.Tensor], bs: list[torch.Tensor] | None, kernels: MatmulKernels | None):
    lins = []
    for i, w in enumerate(ws):
        lin = Linear(w.shape[1], w.shape[0], bias=bs is not None, kernels=kernels)
        lin.weight = torch.nn.Parameter(w)
        if bs is not None:
            lin.bias = torch.nn.Parameter(bs[i])
        lins.append(lin)
    return lins


# (M, K, [N per projection]): q/k/v with GQA, gate/up, and a single big projection (the head)
SHAPES = [(512, 192, [192, 64, 64]), (600, 128, [352, 352]), (256, 96, [2048])]


@onednn
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_fused_outputs_and_gradients_match_f_linear(kernel: str, shape, bias: bool) -> None:
    m, k, ns = shape
    assert m * k * sum(ns) >= MIN_MACS  # large enough to take the kernel path
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, m // 2, k, generator=g)
    ws = [torch.randn(n, k, generator=g) / k**0.5 for n in ns]
    bs = [torch.randn(n, generator=g) for n in ns] if bias else None
    dy = torch.randn(2, m // 2, sum(ns), generator=g)
    kernels = Forced(kernel)

    bounds = rounding_bounds(x, ws, bs, dy)
    err_ours = errors_through_params(x, ws, bs, dy, kernels)
    err_ref = errors(x, ws, bs, dy, plain_linears)
    assert kernels.used == [kernel] * 3  # forward, input gradient, weight gradient
    for i, (a, r, bound) in enumerate(zip(err_ours, err_ref, bounds)):
        assert (r <= bound).all(), f"output {i}: F.linear itself is off by {(r / bound).max():.3g}x the bound"
        worst = (a / bound).max().item()
        assert worst <= 1, f"output {i}: error {worst:.3g}x fp32's rounding bound (F.linear's {(r / bound).max():.3g}x)"


@onednn
def test_the_rounding_bound_catches_a_kernel_that_rounds_below_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: the same matmuls with operands rounded to bf16 (a reduced-precision
    kernel, as oneDNN's or MKL's fast fp32 modes would be) exceed the bound in every output."""
    m, k, ns = SHAPES[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, m // 2, k, generator=g)
    ws = [torch.randn(n, k, generator=g) / k**0.5 for n in ns]
    dy = torch.randn(2, m // 2, sum(ns), generator=g)

    def rounded(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear_mod._aten(a.bfloat16().float(), b.bfloat16().float(), bias)
    monkeypatch.setitem(linear_mod._IMPLS, "aten", rounded)
    bounds = rounding_bounds(x, ws, None, dy)
    for i, (a, bound) in enumerate(zip(errors_through_params(x, ws, None, dy, Forced("aten")), bounds)):
        assert (a / bound).max() > 10, f"output {i}: a bf16-rounded kernel stays within the fp32 bound"


def errors_through_params(x, ws, bs, dy, kernels) -> list[torch.Tensor]:
    """Like `errors` for the module path: the fp32 run reads gradients off the modules' parameters."""
    xx = x.clone().requires_grad_()
    lins = modules([w.clone() for w in ws], [b.clone() for b in bs] if bs else None, kernels)
    assert fast_path_ok(xx, tuple(lins), kernels)
    y = torch.cat(fused_linear(xx, tuple(lins), kernels), -1)
    y.backward(dy)
    got = [y.flatten(0, -2), xx.grad.flatten(0, -2), *(lin.weight.grad for lin in lins),
           *((lin.bias.grad for lin in lins) if bs else ())]
    return abs_errors(got, x, ws, bs, dy)


@onednn
@pytest.mark.parametrize("kernel", KERNELS)
def test_single_linear_module_matches_f_linear(kernel: str) -> None:
    lin = Linear(256, 1024, bias=True, kernels=Forced(kernel))
    ref = torch.nn.Linear(256, 1024)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(4, 100, 256)
    xr = x.clone().requires_grad_()
    x.requires_grad_()
    dy = torch.randn(4, 100, 1024)
    out = lin(x)
    assert out._base is None  # not a view, like F.linear's output (FSDP2 warns on a module returning a view)
    out.backward(dy)
    ref(xr).backward(dy)
    assert lin.kernels.used == [kernel] * 3  # fwd, dgrad, wgrad all measured (forced) once
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-4)


CFG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, multiple_of=64, max_seq_len=64)


@onednn
@pytest.mark.parametrize("kernel", KERNELS)
def test_whole_model_matches_the_plain_model(kernel: str) -> None:
    """The same weights through the fused/kernel path and through plain F.linear modules: logits
    and every parameter's gradient agree to fp32 rounding."""
    with torch.device("meta"):
        fast, plain = Transformer(CFG, kernels=Forced(kernel)), Transformer(CFG, kernels=Forced(kernel))
    for mod in plain.modules():  # plain: no kernels anywhere -> F.linear, module by module
        if hasattr(mod, "kernels"):
            mod.kernels = None
    for m in (fast, plain):
        m.to_empty(device="cpu")
        torch.manual_seed(0)
        m.init_weights()
    x = torch.randint(0, CFG.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    lf, lp = fast(x), plain(x)
    torch.testing.assert_close(lf, lp, rtol=1e-4, atol=1e-5)
    F.cross_entropy(lf.flatten(0, 1), x.flatten()).backward()
    F.cross_entropy(lp.flatten(0, 1), x.flatten()).backward()
    assert fast.kernels.used, "no matmul was large enough to take the kernel path"
    assert fast.state_dict().keys() == plain.state_dict().keys()
    for (n, a), (_, b) in zip(fast.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_fallbacks_take_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """autocast, compile tracing, other dtypes, hooks, no kernels: the module path (F.linear)."""
    kernels = MatmulKernels(cache_path=None, enabled=True)
    lins = tuple(Linear(64, 64, bias=False, kernels=kernels) for _ in range(3))
    x = torch.randn(8, 64)
    assert fast_path_ok(x, lins, kernels)
    assert not fast_path_ok(x, lins, None)
    assert not fast_path_ok(x.double(), lins, kernels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast_path_ok(x, lins, kernels)
        assert fused_linear(x, lins, kernels)[0].dtype == torch.bfloat16  # autocast applied as by F.linear
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fast_path_ok(x, lins, kernels)
    monkeypatch.undo()
    handle = lins[1].register_forward_hook(lambda mod, inp, out: out * 2)
    assert not fast_path_ok(x, lins, kernels)
    torch.testing.assert_close(fused_linear(x, lins, kernels)[1], 2 * F.linear(x, lins[1].weight))
    handle.remove()
    assert fast_path_ok(x, lins, kernels)


def test_dtensor_parameters_fall_back(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        kernels = MatmulKernels(cache_path=None, enabled=True)
        lin = Linear(64, 32, bias=False, kernels=kernels)
        ref = F.linear(torch.ones(4, 64), lin.weight)
        lin.weight = torch.nn.Parameter(distribute_tensor(lin.weight.detach(), mesh, [Replicate()]))
        x = distribute_tensor(torch.ones(4, 64), mesh, [Replicate()])
        assert not fast_path_ok(x, (lin,), kernels)
        assert not fast_path_ok(torch.ones(4, 64), (lin,), kernels)
        torch.testing.assert_close(lin(x).full_tensor(), ref)
    finally:
        dist.destroy_process_group()


@onednn
def test_choices_are_timed_once_and_shared_through_the_disk_cache(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "k.json"
    first = MatmulKernels(cache_path=path, trials=1, enabled=True)
    a, b = torch.randn(512, 256), torch.randn(256, 256)
    torch.testing.assert_close(first.matmul("fwd", a, b), a @ b.t(), rtol=1e-5, atol=1e-4)
    key = "fwd 512x256x256"
    assert first.choices[key] in KERNELS
    stored = json.loads(path.read_text())
    assert list(stored.values()) == [{key: first.choices[key]}]
    # a new process (object) reads it and never times that shape again
    second = MatmulKernels(cache_path=path, enabled=True)
    monkeypatch.setattr(second, "_measure", lambda *args: pytest.fail("timed a cached shape"))
    second.matmul("fwd", a, b)
    assert second.choices == first.choices
    # small matmuls are not timed at all
    tiny = MatmulKernels(cache_path=path, enabled=True)
    monkeypatch.setattr(tiny, "_measure", lambda *args: pytest.fail("timed a tiny matmul"))
    tiny.matmul("fwd", torch.randn(8, 8), torch.randn(8, 8))
    # an unreadable cache is ignored and rewritten
    path.write_text("{not json")
    third = MatmulKernels(cache_path=path, trials=1, enabled=True)
    third.matmul("fwd", a, b)
    assert key in json.loads(path.read_text())[third._key]
    # choices timed with the instruction sets capped (AVX2 paths forced) are another machine's
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "SSE41")  # only the key is read: oneDNN read its cap at first use
    capped = MatmulKernels(cache_path=path, enabled=True)
    assert capped._key != third._key and "DNNL_MAX_CPU_ISA=SSE41" in capped._key and capped.choices == {}


def test_build_model_keeps_nn_linear_names_and_types() -> None:
    model = build_model(CFG)
    lins = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "layers.0.attention.wq" in lins and "layers.1.feed_forward.w3" in lins and "output" in lins
    assert all(isinstance(m.kernels, MatmulKernels) for m in model.modules() if isinstance(m, Linear))


@pytest.mark.parametrize("capability, on", [("DEFAULT", False), ("AVX2", False), ("AVX512", True), ("AMX", True)])
def test_the_fast_path_is_on_by_default_only_where_it_paid_off(monkeypatch: pytest.MonkeyPatch,
                                                               capability: str, on: bool) -> None:
    """AVX2-only CPUs: plain F.linear (the fused/kernel path trained 3-7% slower on a Zen 3)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    kernels = MatmulKernels(cache_path=None)
    assert kernels.enabled is (on and linear_mod._onednn_available())
    lins = tuple(Linear(64, 64, bias=False, kernels=kernels) for _ in range(2))
    assert fast_path_ok(torch.randn(8, 64), lins, kernels) is kernels.enabled
    assert not MatmulKernels(cache_path=None, enabled=False).enabled


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_fused_path_saves_no_more_activation_bytes_than_separate_projections(n_kv_heads: int) -> None:
    """q, k, v from the fused projection are views of one output: v saved as a view would keep q's
    and k's bytes alive through backward (7% more activation memory on tiny-dense, which the
    planner's memory model, plan/memory.py, does not count). Equal bytes with the path on and off."""
    from lmforge.models.common.cross_entropy import cross_entropy
    from lmforge.observability.memory import ActivationMeter

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=512, max_seq_len=64)
    saved = {}
    for name, kernels in (("fused", Forced("aten")), ("plain", MatmulKernels(cache_path=None, enabled=False))):
        torch.manual_seed(0)
        model = Transformer(cfg, kernels)
        x = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(1))
        meter = ActivationMeter([model])
        with meter.measure():
            cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
        saved[name] = meter.bytes
    assert saved["fused"] == saved["plain"] > 0, saved


@pytest.mark.parametrize("setting", ["auto", "plain"])
def test_train_matmul_kernels_setting_reaches_the_model(setting: str, tiny_data_dir, tmp_path: Path) -> None:
    """train.matmul_kernels = "plain" builds a one-process model on F.linear (what the parallel
    layouts run, for comparisons); "auto" on the timed kernels where this CPU gains from them."""
    from lmforge.config import load_job_config, parse_override_args
    from lmforge.train.trainer import Trainer
    from tests.helpers.cli import tiny_run_args

    args = tiny_run_args(tiny_data_dir, tmp_path, "--train.steps", "2", "--checkpoint.enabled", "false",
                         "--train.matmul_kernels", setting)
    trainer = Trainer(load_job_config(None, parse_override_args(args)), echo=False)
    try:
        kernels = {id(m.kernels): m.kernels for m in trainer.model.modules() if isinstance(m, Linear)}
        assert len(kernels) == 1
        (k,) = kernels.values()
        want = setting == "auto" and linear_mod.kernel_choice_pays_off() and linear_mod._onednn_available()
        assert k.enabled is want
    finally:
        trainer.close()


def test_train_matmul_kernels_refuses_other_values(tmp_path: Path) -> None:
    from lmforge.config import ConfigError, load_job_config, parse_override_args

    with pytest.raises(ConfigError, match="train.matmul_kernels"):
        load_job_config(None, parse_override_args(["--train.matmul_kernels", "fast"]))

"""Linear layers for fp32 training on CPU: fused projections and the faster matmul kernel per shape.

Two things make a CPU fp32 step faster without changing what is computed:

- Projections that read the same input (q/k/v, SwiGLU's gate/up) run as ONE matmul over their
  weights concatenated on the fly (a copy of a few MB per step): one bigger matmul is more
  efficient than three small ones, and backward gets the input gradient from one matmul instead of
  three plus two additions. The parameters stay separate `nn.Linear` weights, so state dicts,
  checkpoints, the HF mapping and tensor-parallel plans see no difference.
- Each of the three matmuls of a linear layer (forward x @ W^T, input gradient dy @ W, weight
  gradient dy^T @ x) can run on torch's default GEMM (MKL / OpenBLAS) or on oneDNN's dense fp32
  kernel (`torch.ops.mkldnn._linear_pointwise` on ordinary tensors: no mkldnn-layout conversions).
  Which is faster depends on the CPU and the shape (oneDNN was 2.2x faster on a Zen 5, and on a
  Zen 3 faster for some of this model's shapes and slower for others), so `MatmulKernels` times
  both the first time it meets a shape and keeps the winner. On CPUs without AVX512 both libraries
  run AVX2 code and the timed choice did not survive in context: on a quiet Zen 3 the whole model
  trained 3-7% slower with the fused/kernel path than with plain `F.linear` (docs/benchmarks.md),
  so there (`cpu_capability` AVX2 or less) the layers take plain `F.linear` unless forced. The choice is cached on disk per CPU
  (model, generation and any instruction-set cap: tensors/cpu_features.py cpu_key), thread count and torch version, so every later process (a resumed run, the other ranks)
  uses the same kernels and stays bit-for-bit reproducible.

Everything else takes the plain `F.linear` path: DTensor parameters or inputs (TP, FSDP with TP),
other devices or dtypes, autocast, torch.compile tracing, modules with hooks, and tiny matmuls.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmforge.storage.atomic import write_text_atomic
from lmforge.tensors.cpu_features import cpu_key

log = logging.getLogger(__name__)

CACHE_ENV = "LMFORGE_CACHE_DIR"
CACHE_FILE = "linear_kernels.json"
KERNELS = ("aten", "onednn")
# Below this many multiply-adds a matmul takes torch's default kernel untimed: too small to gain.
MIN_MACS = 2**24


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T [+ bias] with oneDNN on dense tensors (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [None], "")


def _aten(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T [+ bias] with torch's default GEMM."""
    return torch.addmm(bias, a, b.t()) if bias is not None else torch.mm(a, b.t())


_IMPLS = {"aten": _aten, "onednn": _onednn}


def kernel_choice_pays_off() -> bool:
    """True on CPUs with AVX512 (torch's dispatch capability AVX512 or AMX), where oneDNN's kernels
    can beat MKL's AVX2 path; measured to lose end to end on AVX2-only CPUs."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def default_cache_path() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() / CACHE_FILE if root else Path.home() / ".cache" / "lmforge" / CACHE_FILE


class MatmulKernels:
    """The faster of torch's GEMM and oneDNN's for each fp32 CPU matmul shape, decided by timing both.

    Each call is `a (M, K) @ b (N, K)^T`; the three matmuls of a linear layer are expressed that way
    (the input gradient as dy @ (W^T)^T, the weight gradient as dy^T @ (x^T)^T), so their operand
    layouts are part of the key. Timing: `trials` interleaved runs of each kernel on random
    operands of that shape, the minimum wins (robust to a shared machine's noise). `cache_path=None`
    keeps choices in memory only. `enabled=None` (the default) turns the fast path on where
    `kernel_choice_pays_off()`; True forces it on (tests), False off: plain `F.linear` everywhere.
    """

    def __init__(self, cache_path: Path | None = None, trials: int = 3, enabled: bool | None = None):
        self.cache_path = cache_path
        self.trials = trials
        wanted = kernel_choice_pays_off() if enabled is None else enabled
        self.enabled = wanted and _onednn_available()
        self._key = f"{cpu_key()} | threads={torch.get_num_threads()} | torch={torch.__version__}"
        self._choice: dict[str, str] = {}
        if self.enabled and cache_path is not None:
            self._choice = {k: v for k, v in self._read_cache().get(self._key, {}).items() if v in KERNELS}

    @classmethod
    def with_disk_cache(cls) -> MatmulKernels:
        return cls(default_cache_path())

    @property
    def choices(self) -> dict[str, str]:
        """shape key ("fwd 2048x384x1152") -> kernel name, as decided so far."""
        return dict(self._choice)

    def matmul(self, op: str, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """a (M, K) @ b (N, K)^T [+ bias]; `op` names the role (fwd, dgrad, wgrad) for the key."""
        m, k = a.shape
        n = b.shape[0]
        if not self.enabled or m * k * n < MIN_MACS:
            return _aten(a, b, bias)
        key = f"{op} {m}x{k}x{n}{' bias' if bias is not None else ''}"
        name = self._choice.get(key)
        if name is None:
            name = self._choice[key] = self._measure(a, b, bias)
            self._save(key, name)
        return _IMPLS[name](a, b, bias)

    def _measure(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> str:
        """Time both kernels on operands with a's and b's shapes and strides (random values)."""
        gen = torch.Generator().manual_seed(0)  # the training RNG stream must not depend on timing

        def like(t: torch.Tensor) -> torch.Tensor:  # same strides: backward passes transposed views
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).normal_(generator=gen)
        ra, rb = like(a), like(b)
        rbias = None if bias is None else like(bias)
        best = {name: float("inf") for name in KERNELS}
        with torch.no_grad():
            for name in KERNELS:  # warm-up (oneDNN builds its primitive on first use)
                _IMPLS[name](ra, rb, rbias)
            for _ in range(self.trials):
                for name in KERNELS:
                    t0 = time.perf_counter()
                    _IMPLS[name](ra, rb, rbias)
                    best[name] = min(best[name], time.perf_counter() - t0)
        return min(KERNELS, key=best.__getitem__)

    # -- disk cache ------------------------------------------------------------------------------

    def _read_cache(self) -> dict:
        assert self.cache_path is not None
        try:
            data = json.loads(self.cache_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable matmul kernel cache %s (%s); it will be rewritten", self.cache_path, e)
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, key: str, name: str) -> None:
        """Merge into the file (another process may have added shapes) and replace it atomically.
        Choices another process made for the same shape win, so all processes agree."""
        if self.cache_path is None:
            return
        try:
            data = self._read_cache()
            mine = data.setdefault(self._key, {})
            if isinstance(mine.get(key), str) and mine[key] in KERNELS:
                self._choice[key] = mine[key]
                return
            mine[key] = name
            write_text_atomic(self.cache_path, json.dumps(data, indent=1, sort_keys=True))
        except OSError as e:  # a read-only home: choices stay in memory for this process
            log.info("matmul kernel cache %s not written (%s)", self.cache_path, e)


class _FusedLinear(torch.autograd.Function):
    """y = x @ cat(W_1..W_n)^T + bias, with the three matmuls on `kernels`. The concatenated weight
    is rebuilt in backward from the parameters (not saved: no second copy of the weights lives
    between forward and backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, kernels: MatmulKernels,
                *weights: torch.Tensor) -> torch.Tensor:
        w = weights[0] if len(weights) == 1 else torch.cat(weights)
        x2 = x.reshape(-1, x.shape[-1])
        y = kernels.matmul("fwd", x2, w, bias)
        ctx.save_for_backward(x2, *weights)
        ctx.kernels, ctx.x_shape, ctx.has_bias = kernels, x.shape, bias is not None
        # Not a view (as F.linear's output is not): FSDP2 warns when a wrapped module returns a view,
        # since an in-place op on it would skip its pre-backward hook.
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], w.shape[0]))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, *weights = ctx.saved_tensors
        kernels: MatmulKernels = ctx.kernels
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dbias = None
        dws: list[torch.Tensor | None] = [None] * len(weights)
        if ctx.needs_input_grad[0]:
            w = weights[0] if len(weights) == 1 else torch.cat(weights)
            dx = kernels.matmul("dgrad", dy2, w.t()).view(ctx.x_shape)
        if any(ctx.needs_input_grad[3:]):
            dw = kernels.matmul("wgrad", dy2.t(), x2.t())
            dws = list(dw.split([w.shape[0] for w in weights])) if len(weights) > 1 else [dw]
        if ctx.has_bias and ctx.needs_input_grad[1]:
            dbias = dy2.sum(0)
        return dx, dbias, None, *dws


def _plain(t: torch.Tensor) -> bool:
    return not isinstance(t, DTensor) and t.device.type == "cpu" and t.dtype == torch.float32


def fast_path_ok(x: torch.Tensor, linears: tuple[nn.Linear, ...], kernels: MatmulKernels | None) -> bool:
    """True where the fused / kernel-chosen path is on (`kernels.enabled`) and computes exactly what
    the modules would: plain fp32 CPU tensors, no autocast, no compile tracing, no hooks on the modules (TP plans, user
    hooks), and the same bias presence on all."""
    if kernels is None or not kernels.enabled or not _plain(x) or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    has_bias = linears[0].bias is not None
    for lin in linears:
        if lin._forward_hooks or lin._forward_pre_hooks or not _plain(lin.weight):
            return False
        if (lin.bias is not None) != has_bias or (has_bias and not _plain(lin.bias)):
            return False
    return True


def fused_linear(x: torch.Tensor, linears: tuple[nn.Linear, ...], kernels: MatmulKernels | None
                 ) -> tuple[torch.Tensor, ...]:
    """(lin(x) for lin in linears), as one matmul where `fast_path_ok`, else module by module."""
    if not fast_path_ok(x, linears, kernels):
        return tuple(lin(x) for lin in linears)
    bias = None
    if linears[0].bias is not None:
        bias = linears[0].bias if len(linears) == 1 else torch.cat([lin.bias for lin in linears])
    y = _FusedLinear.apply(x, bias, kernels, *(lin.weight for lin in linears))
    if len(linears) == 1:
        return (y,)
    return y.split([lin.out_features for lin in linears], dim=-1)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict and type for TP plans) whose fp32 CPU matmuls run on
    the kernels `MatmulKernels` picked; F.linear wherever `fast_path_ok` says no."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 kernels: MatmulKernels | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fast_path_ok(x, (self,), self.kernels):
            return super().forward(x)
        return _FusedLinear.apply(x, self.bias, self.kernels, self.weight)

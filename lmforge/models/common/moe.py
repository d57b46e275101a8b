"""Mixture-of-Experts feed-forward: a router picks experts per token (or tokens per expert), the
routed experts (SwiGLUs) run as grouped matmuls, optional shared experts see every token.

Plain single-device PyTorch (no process groups). One forward is four steps, each a function, so
expert parallelism can put its all-to-all between `dispatch` and the expert compute::

    routing = router(x)                           # Routing: assignments sorted by expert
    xs      = dispatch(x, routing)                # (assignments, dim), grouped by expert
    ys      = experts(xs, routing.counts)         # grouped SwiGLU: one matmul per weight for all experts
    out     = combine(ys, routing, n_tokens)      # weighted scatter-add back to the tokens

Layout (names are stable; HF adapters and expert parallel rely on them)::

    MoE.router.gate           nn.Linear(dim, n_experts, bias=False)
    MoE.router.expert_bias    (n_experts,) persistent buffer: selection bias (aux-loss-free balancing)
    MoE.experts.w1, .w3       (n_experts, hidden, dim)  gate / up, nn.Linear layout per expert
    MoE.experts.w2            (n_experts, dim, hidden)  down
    MoE.shared_experts        SwiGLU(dim, n_shared * hidden) or None
    MoE.shared_expert_gate    nn.Linear(dim, 1, bias=False) or None (Qwen2-MoE)

Dim 0 of w1/w3/w2 is the expert: expert parallel shards it (DTensor Shard(0)).

Routers:
- `TokenChoiceRouter`: each token takes its top-k experts by softmax or sigmoid score (plus the
  selection-only `expert_bias`); weights are the unbiased scores, optionally renormalised over
  the top k. Switch/GShard load-balancing loss and router z-loss are computed on the way.
  Dropless unless `capacity_factor` > 0 (then first choices win over second choices, earlier
  tokens over later ones, and what exceeds an expert's capacity is dropped: the residual carries
  the token).
- `ExpertChoiceRouter` (Zhou et al., 2022): each expert takes its top-c tokens of the whole
  batch, c = ceil(capacity_factor * tokens * top_k / n_experts), so a token gets 0..E experts and
  the load is balanced by construction. It looks at all tokens of the batch at once: NOT causal
  (a token's experts depend on later tokens), and at generation time (one token per step) every
  expert takes that token. Use it for training experiments, token choice for causal inference.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import MoEConfig
from lmforge.models.common.eager import eager_under_compile
from lmforge.models.common.mlp import SwiGLU, silu_mul
from lmforge.models.common.router_stats import PendingLoad, RouterStats, counting_gate_weight
from lmforge.tensors.dtensor import local_shard


@dataclass
class Routing:
    """The router's decision for a flat batch of tokens, assignments sorted by expert.

    token_idx (A,) int64: the token of each assignment; weights (A,) fp32: its combine weight;
    counts (E,) int64: assignments per expert (the groups of the sorted order). load (E,) fp32:
    tokens that chose each expert before capacity dropping (the demand; what balancing acts on).
    dropped: assignments dropped for capacity (0-dim). aux_loss / z_loss: 0-dim fp32, with grad.
    """

    token_idx: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    load: torch.Tensor
    dropped: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Router math in fp32: a bf16 softmax over experts flips near-ties between runs."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # meta: no autocast there


def count_per_expert(expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert (int64). bincount on CPU only (there the scatter-add into few bins is
    ~6x slower); elsewhere a scatter-add: no meta kernel for bincount, and on CUDA it reads the
    input's max on the host (a sync per call)."""
    flat = expert_idx.reshape(-1)
    if flat.device.type == "cpu":
        return torch.bincount(flat, minlength=n_experts)
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch/GShard auxiliary loss E * sum_i f_i * P_i.

    f_i = fraction of the T*k assignments that chose expert i (`counts`: before dropping; no
    gradient), P_i = mean router probability of expert i over the T tokens. 1.0 when perfectly
    uniform. `probs` (T, E) must sum to 1 per token (sigmoid scores are normalised by the caller).
    """
    counts = counts.to(probs.dtype)
    f = counts / counts.sum()
    return probs.shape[-1] * (f * probs.mean(0)).sum()


def _sort_by_expert(expert_idx: torch.Tensor, token_idx: torch.Tensor, weights: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of assignments by expert -> (token_idx, weights) grouped by expert."""
    order = torch.argsort(expert_idx, stable=True)
    return token_idx[order], weights[order]


def capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """Assignments one expert may take: ceil(factor * tokens * top_k / n_experts), at most n_tokens."""
    return min(n_tokens, max(1, math.ceil(factor * n_tokens * top_k / n_experts)))


class TokenChoiceRouter(nn.Module):
    """Each token picks top_k experts; see the module docstring."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.score_func, self.norm_topk, self.route_scale = cfg.score_func, cfg.norm_topk, cfg.route_scale
        self.capacity_factor = cfg.capacity_factor
        self.gate = nn.Linear(dim, cfg.n_experts, bias=False)
        # Selection-only bias (aux-loss-free balancing). Persistent: it is training state.
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts), persistent=True)

    def init_weights(self, std: float) -> None:
        nn.init.trunc_normal_(self.gate.weight, std=std, a=-3 * std, b=3 * std)
        self.expert_bias.zero_()

    def scores(self, x: torch.Tensor, gate_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, scores) in fp32 for flat tokens x (T, dim). `gate_weight`: the gate's weight as
        the MoE layer hands it in (see `MoE.forward`), `self.gate.weight` by default."""
        w = self.gate.weight if gate_weight is None else gate_weight
        with _no_autocast(x.device):
            logits = F.linear(x.float(), w.float())
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        return logits, scores

    def forward(self, x: torch.Tensor, gate_weight: torch.Tensor | None = None) -> Routing:
        logits, scores = self.scores(x, gate_weight)
        return self.route(logits, scores)

    def route(self, logits: torch.Tensor, scores: torch.Tensor) -> Routing:
        """Routing from given (T, E) logits and scores: exposed so tests can hand-make them."""
        t, e, k = scores.shape[0], self.n_experts, self.top_k
        select = scores + self.expert_bias.to(scores.dtype) if self.expert_bias is not None else scores
        expert_idx = select.topk(k, dim=-1).indices  # (T, k), the bias only picks
        weights = scores.gather(-1, expert_idx)  # unbiased scores weigh
        if self.norm_topk and k > 1:  # top-1 renormalised would be 1.0: no gradient to the gate
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.route_scale
        probs = scores if self.score_func == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        counts = count_per_expert(expert_idx, e)  # counted once: aux loss, load, dispatch groups
        aux = load_balancing_loss(probs, counts)
        z = router_z_loss(logits)
        load = counts.float()
        # k-major order: all first choices, then all second choices (GShard priority under capacity).
        flat_expert = expert_idx.t().reshape(-1)
        flat_token = torch.arange(t, device=scores.device).repeat(k)
        flat_weight = weights.t().reshape(-1)
        dropped = torch.zeros((), dtype=torch.long, device=scores.device)
        if self.capacity_factor > 0 and scores.device.type != "meta":  # meta: shapes only, keep all
            cap = capacity(t, k, e, self.capacity_factor)
            order = torch.argsort(flat_expert, stable=True)
            sorted_expert = flat_expert[order]
            starts = torch.cumsum(counts, 0) - counts  # flat_expert holds the same assignments
            rank_sorted = torch.arange(order.numel(), device=scores.device) - starts[sorted_expert]
            keep = torch.empty_like(flat_expert, dtype=torch.bool)
            keep[order] = rank_sorted < cap
            dropped = (~keep).sum()
            flat_expert, flat_token, flat_weight = flat_expert[keep], flat_token[keep], flat_weight[keep]
            counts = counts.clamp(max=cap)  # each expert keeps its first `cap` assignments
        token_idx, w = _sort_by_expert(flat_expert, flat_token, flat_weight)
        return Routing(token_idx, w, counts, load, dropped, aux, z)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3 aux-loss-free update: bias += rate * sign(mean load - load). `load` must be
        the tokens per expert summed over every data-parallel rank (see lmforge.train.router_balance)."""
        self.expert_bias.add_(rate * torch.sign(load.float().mean() - load.float()))


class ExpertChoiceRouter(nn.Module):
    """Each expert picks its top-c tokens of the batch (not causal; see the module docstring)."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.capacity_factor, self.route_scale = cfg.capacity_factor, cfg.route_scale
        self.gate = nn.Linear(dim, cfg.n_experts, bias=False)
        self.register_buffer("expert_bias", None)

    def init_weights(self, std: float) -> None:
        nn.init.trunc_normal_(self.gate.weight, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: torch.Tensor, gate_weight: torch.Tensor | None = None) -> Routing:
        w = self.gate.weight if gate_weight is None else gate_weight
        with _no_autocast(x.device):
            logits = F.linear(x.float(), w.float())
        return self.route(logits, logits.softmax(-1))

    def route(self, logits: torch.Tensor, scores: torch.Tensor) -> Routing:
        t, e = scores.shape
        c = capacity(t, self.top_k, e, self.capacity_factor)
        top = scores.t().topk(c, dim=-1)  # (E, c): each expert's best tokens, already grouped by expert
        token_idx = top.indices.reshape(-1)
        weights = top.values.reshape(-1) * self.route_scale
        counts = torch.full((e,), c, dtype=torch.long, device=scores.device)
        zero = torch.zeros((), device=scores.device)
        return Routing(token_idx, weights, counts, counts.float(), torch.zeros((), dtype=torch.long,
                                                                                  device=scores.device),
                       zero, router_z_loss(logits))


def dispatch(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Gather the token of every assignment, grouped by expert: (A, dim)."""
    return x.index_select(0, routing.token_idx)


def combine(ys: torch.Tensor, routing: Routing, n_tokens: int) -> torch.Tensor:
    """Scatter-add weight * expert output back onto the tokens: (n_tokens, dim). Tokens with no
    assignment (dropped, or unpicked under expert choice) get 0: the residual carries them."""
    out = ys.new_zeros(n_tokens, ys.shape[-1])
    return out.index_add(0, routing.token_idx, ys * routing.weights.to(ys.dtype)[:, None])


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0).to(torch.int32)


def grouped_mm_path(device_type: str, dtype: torch.dtype, compiling: bool = False,
                    cuda_capability: tuple[int, int] | None = None) -> str:
    """"grouped" (torch._grouped_mm) or "padded_bmm" for expert matmuls on this device and dtype.

    - CUDA (GPU-only rules; lmforge's CI has no GPU, scripts/gpu_check.sh runs them): torch's
      fast grouped kernel (CUTLASS, no host sync) takes bf16 on compute capability 9.0 and newer
      only. Other dtypes (fp16, fp32) and older GPUs get torch's fallback, a per-expert loop that
      copies the group offsets to the host: the padded bmm (one batched matmul) is used instead.
      A cast to bf16 would change the numerics the user chose, so it is not done.
    - CPU: torch's composite kernel takes every float dtype, but its meta / fake-tensor kernel
      (what torch.compile traces with) follows the CUDA rule (bf16 only): other dtypes take the
      padded bmm under compile.
    - meta and other devices: padded bmm (meta has no group sizes to run on).
    """
    if not hasattr(torch, "_grouped_mm"):
        return "padded_bmm"
    if device_type == "cuda":
        major = cuda_capability[0] if cuda_capability is not None else 0
        return "grouped" if dtype == torch.bfloat16 and major >= 9 else "padded_bmm"
    if device_type == "cpu":
        return "grouped" if dtype == torch.bfloat16 or not compiling else "padded_bmm"
    return "padded_bmm"


def _grouped_ok(x: torch.Tensor, *ws: torch.Tensor) -> bool:
    """`grouped_mm_path` allows torch._grouped_mm here, and the operands have the 16-byte aligned
    strides it needs. On CPU that is the strides alone: any number of rows and any group sizes run
    forward and backward (tested), which matters under expert parallelism, where the rows a rank
    receives vary every step (requiring a multiple of 4 sent 3 calls in 4 to the padded bmm, which
    pays for the busiest expert: 2.7x the rows early in training). On CUDA the last two dimensions
    of every operand, rows included, stay 16-byte multiples."""
    cap = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
    if grouped_mm_path(x.device.type, x.dtype, torch.compiler.is_compiling(), cap) != "grouped":
        return False
    if x.device.type == "cpu":
        return all(s * t.element_size() % 16 == 0 for t in (x, *ws) for s in t.stride()[:-1])
    return all(t.shape[-1] * t.element_size() % 16 == 0 and t.shape[-2] * t.element_size() % 16 == 0
               for t in (x, *ws))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (A, in) grouped by `counts` (E,) times the matching expert's w (E, out, in)^T ->
    (A, out). torch._grouped_mm when usable (see `grouped_mm_path`), else a padded bmm; never a
    loop over experts."""
    if _grouped_ok(x, w):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=_offsets(counts))
    return padded_bmm(x, w, counts)


@eager_under_compile
def padded_bmm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Fallback: scatter rows into (E, max_count, in), one bmm, gather back. Pads to the busiest
    expert, so it costs E * max_count rows instead of A. Eager under torch.compile: the padded
    width is read from the data (a host sync); traced, it would break the graph with a warning
    and recompile for every new width."""
    e = w.shape[0]
    a = x.shape[0]
    expert = torch.repeat_interleave(torch.arange(e, device=x.device), counts, output_size=a)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(a, device=x.device) - starts[expert]
    width = int(counts.max()) if a else 0
    padded = x.new_zeros(e, width, x.shape[-1])
    padded = padded.index_put((expert, pos), x)
    out = torch.bmm(padded, w.transpose(-2, -1))
    return out[expert, pos]


class GroupedExperts(nn.Module):
    """E SwiGLU experts as 3-D weights; inputs arrive grouped by expert (see `dispatch`)."""

    def __init__(self, dim: int, hidden: int, n_experts: int):
        super().__init__()
        self.n_experts, self.dim, self.hidden = n_experts, dim, hidden
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))

    def init_weights(self, std: float, out_std: float) -> None:
        for w, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            nn.init.trunc_normal_(w, std=s, a=-3 * s, b=3 * s)

    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cast to the autocast dtype by hand: torch._grouped_mm has no autocast rule. Under expert
        parallel (lmforge.parallel.ep) the weights are Shard(0) DTensors and the tokens that arrive
        are those of this rank's experts: compute on the local experts."""
        w1, w3, w2 = (local_shard(w) for w in (self.w1, self.w3, self.w2))
        dev = x.device.type
        if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            return x.to(dt), w1.to(dt), w3.to(dt), w2.to(dt)
        return x, w1, w3, w2

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        x, w1, w3, w2 = self._weights(x)
        if x.device.type == "meta":  # shape inference (pipeline stages): group sizes are unknown
            return F.linear(F.silu(F.linear(x, w1[0])) * F.linear(x, w3[0]), w2[0])
        h = silu_mul(grouped_mm(x, w1, counts), grouped_mm(x, w3, counts))
        return grouped_mm(h, w2, counts)

    def forward_loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Reference: a Python loop over experts (tests and bench/moe_experts.py)."""
        x, w1, w3, w2 = self._weights(x)
        outs, start = [], 0
        for i, n in enumerate(counts.tolist()):
            xi = x[start:start + n]
            outs.append(F.linear(F.silu(F.linear(xi, w1[i])) * F.linear(xi, w3[i]), w2[i]))
            start += n
        return torch.cat(outs) if outs else x.new_zeros(0, self.dim)


class MoE(nn.Module):
    """Router + grouped routed experts + optional shared experts, on (batch, seq, dim).

    Each forward in training mode reports to `router_stats` (a `RouterStats`, under `layer_id`):
    the weighted router loss, detached figures, and (from its backward) the load for the bias
    update. `aux_loss`, `last_stats` and `load_sum` are this layer's entries there (None / {} when
    absent), for single-layer use; lmforge.train.router_balance reads the collector itself.
    """

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, layer_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        router = ExpertChoiceRouter if cfg.router == "expert_choice" else TokenChoiceRouter
        self.router = router(dim, cfg)
        self.experts = GroupedExperts(dim, hidden, cfg.n_experts)
        self.shared_experts = SwiGLU(dim, cfg.n_shared_experts * hidden) if cfg.n_shared_experts else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None
        # A plain attribute, not a buffer: DDP would overwrite buffers with rank 0's at each forward.
        self.router_stats = RouterStats()

    def report_to(self, stats: RouterStats) -> None:
        """Report to `stats` from now on (the trainer's collector)."""
        self.router_stats = stats

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return self.router_stats.aux_loss.get(self.layer_id)

    @property
    def last_stats(self) -> dict[str, torch.Tensor]:
        return self.router_stats.last.get(self.layer_id, {})

    @last_stats.setter
    def last_stats(self, figures: dict[str, torch.Tensor]) -> None:
        self.router_stats.last[self.layer_id] = figures

    @property
    def load_sum(self) -> torch.Tensor | None:
        return self.router_stats.load.get(self.layer_id)

    @load_sum.setter
    def load_sum(self, load: torch.Tensor | None) -> None:
        if load is None:
            self.router_stats.load.pop(self.layer_id, None)
        else:
            self.router_stats.load[self.layer_id] = load

    def init_weights(self, std: float, out_std: float) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
        if self.shared_expert_gate is not None:
            nn.init.trunc_normal_(self.shared_expert_gate.weight, std=std, a=-3 * std, b=3 * std)
        self.load_sum = None

    def forward(self, x: torch.Tensor, loop: bool = False) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        gate_weight = self.router.gate.weight
        pending = None
        if self.training and torch.is_grad_enabled() and gate_weight.requires_grad and x.device.type != "meta":
            pending = PendingLoad(self.router_stats, self.layer_id)
            gate_weight = counting_gate_weight(gate_weight, pending)
        routing = self.router(x, gate_weight)
        xs = dispatch(x, routing)
        ys = self.experts.forward_loop(xs, routing.counts) if loop else self.experts(xs, routing.counts)
        out = combine(ys, routing, x.shape[0])
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(x))
            out = out + shared
        if self.training:
            self._record(routing, pending)
        return out.reshape(shape)

    def _record(self, routing: Routing, pending: PendingLoad | None) -> None:
        stats = self.router_stats
        stats.aux_loss[self.layer_id] = self.cfg.aux_loss_coef * routing.aux_loss + self.cfg.z_loss_coef * routing.z_loss
        if routing.load.device.type == "meta":
            return
        with torch.no_grad():
            if pending is not None:
                pending.load = routing.load.detach()
            stats.last[self.layer_id] = {"tokens_per_expert": routing.load.detach(),
                                         "dropped": routing.dropped.detach(),
                                         "aux_loss": routing.aux_loss.detach(), "z_loss": routing.z_loss.detach()}


def load_stats(tokens_per_expert: torch.Tensor) -> dict[str, float]:
    """Balance figures of one layer: coefficient of variation (std / mean, population std) and
    max / mean of the tokens per expert. 0 and 1 when perfectly balanced."""
    load = tokens_per_expert.double()
    mean = load.mean()
    if mean <= 0:
        return {"load_cv": 0.0, "load_max_over_mean": 0.0}
    return {"load_cv": float(load.std(unbiased=False) / mean), "load_max_over_mean": float(load.max() / mean)}

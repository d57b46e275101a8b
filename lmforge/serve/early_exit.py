"""Adaptive depth at inference (issue 17): a token may stop at an early exit (model.early_exit:
after k blocks, through the shared final norm and LM head) when the exit is confident enough.

Confidence (CALM, Schuster et al., 2022) of the exit's next-token distribution p: "max_prob" is
max_i p_i, "margin" is p_top1 - p_top2; a token exits at the first exit whose confidence is
>= the threshold. Threshold 0 always exits at the first exit; a threshold >= 1 never exits (a
saturated fp32 softmax can read exactly 1.0, so 1 is "off", not "only certain tokens"): the
full model, exactly. In a batch the rows share their positions, so the batch exits only where
every row is confident.

The blocks a token skipped still owe the KV cache its keys and values there. CALM fills them from
the exit's hidden state (an approximation). Here they are computed later, exactly: the skipped
positions wait, and the next token that goes deeper runs each such block over the waiting
positions and itself in one forward (`DeferredDepth`). At batch 1 a block costs about the same
for a few rows as for one (its time is per-kernel overhead), so the deferred work is nearly free,
and every position's hidden states and keys are the full model's: the only thing early exit
changes is the distribution a token is drawn from. That also makes perplexity under early exit
computable in one parallel forward (`exit_choice` over the exits' logits; eval/early_exit.py),
with no approximation. Self-speculative decoding (serve/speculative.py) drafts with the same
structure. The server's engine, whose rows sit at different positions in a SlotKVCache, cannot
leave a row's positions waiting at some blocks: there a row that exits fills its skipped blocks'
keys and values at once from its exit state (`slot_exit_forward`; CALM's propagation, an
approximation of the full model's keys), and each row has its own threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.config import ModelConfig
from lmforge.models.common.kv_cache import KVCache, SlotKVCache
from lmforge.models.common.rope import apply_rope
from lmforge.models.llama.model import Transformer
from lmforge.serve.exit_gate import ExitGates

MEASURES = ("max_prob", "margin", "learned")


class EarlyExitError(ValueError):
    """An early-exit or self-speculation request the model or the arguments cannot serve (one line)."""


@dataclass(frozen=True)
class ExitPolicy:
    """Exit at the first of `layers` (None: the model's model.early_exit.layers) whose confidence
    `measure` is >= `threshold`. threshold 0 always exits at the first exit; >= 1 never exits.
    Measure "learned" reads `gates` (serve/exit_gate.py) and calls the LM head only to leave."""

    threshold: float
    measure: str = "max_prob"
    layers: tuple[int, ...] | None = None
    gates: ExitGates | None = None

    @property
    def active(self) -> bool:
        """False for thresholds >= 1: no exit is checked (the full model, at its own cost)."""
        return self.threshold < 1

    def exit_layers(self, cfg: ModelConfig) -> tuple[int, ...]:
        return tuple(self.layers) if self.layers is not None else tuple(cfg.early_exit.layers)


def check_threshold(value: float, name: str = "early_exit_threshold") -> None:
    """A threshold is a number >= 0 (not NaN); >= 1 (inf too) means "never exit"."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value < 0:
        raise EarlyExitError(f"{name} = {value!r}: must be a number >= 0 (0: always exit at the first exit; "
                             ">= 1: never exit)")


def check_early_exit(cfg: ModelConfig, policy: ExitPolicy) -> tuple[int, ...]:
    """The exits the policy uses, after checking it against the model (one-line EarlyExitError)."""
    check_threshold(policy.threshold)
    if policy.measure not in MEASURES:
        raise EarlyExitError(f"early-exit measure {policy.measure!r}: must be one of {', '.join(MEASURES)}")
    layers = policy.exit_layers(cfg)
    if not layers:
        raise EarlyExitError("the model has no early exits (model.early_exit.layers is empty): fine-tune it with "
                             "exits, e.g. lmforge train RECIPE --train.init_from RUN --model.early_exit.layers 2")
    bad = [k for k in layers if not 1 <= k < cfg.n_layers]
    if bad:
        raise EarlyExitError(f"early-exit layers {list(layers)}: each must be in 1 .. {cfg.n_layers - 1} "
                             f"(model.n_layers = {cfg.n_layers})")
    check_depth_model(cfg, "early exit")
    if policy.measure == "learned":
        if policy.gates is None:
            raise EarlyExitError("early-exit measure 'learned' needs exit gates (lmforge exit-gates fit SOURCE)")
        policy.gates.check(cfg.dim, layers, "early-exit gates")
    return layers


def check_depth_model(cfg: ModelConfig, what: str) -> None:
    """What `DeferredDepth` runs: full and sliding-window attention with fixed RoPE tables."""
    if any(cfg.attention.kind(i) == "topk" for i in range(cfg.n_layers)):
        raise EarlyExitError(f"{what} supports full and sliding-window attention, not top-k layers "
                             "(model.attention.layers)")
    if cfg.rope_scaling.type == "dynamic":
        raise EarlyExitError(f"{what} needs fixed RoPE tables: model.rope_scaling.type 'dynamic' is not supported")


def confidence(logits: torch.Tensor, measure: str) -> torch.Tensor:
    """(..., vocab) logits -> (...) confidence in [0, 1] of their softmax (see the module docstring)."""
    if measure not in ("max_prob", "margin"):
        raise EarlyExitError(f"confidence measure {measure!r} is not a softmax measure (max_prob, margin)")
    probs = logits.float().softmax(dim=-1)
    if measure == "max_prob":
        return probs.amax(dim=-1)
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def exit_index(confidences: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """Per position, which exit an early-exiting model takes: the index of the first of
    `confidences` (one (...) tensor per exit, in layer order) that is >= threshold, or
    len(confidences) (the final layer) when none is, or when threshold >= 1."""
    shape = confidences[0].shape if confidences else ()
    index = torch.full(shape, len(confidences), dtype=torch.long)
    if threshold >= 1:
        return index
    for i in reversed(range(len(confidences))):  # the first confident exit wins
        index = torch.where(confidences[i].cpu() >= threshold, torch.full_like(index, i), index)
    return index


def exit_choice(exit_logits: list[torch.Tensor], final: torch.Tensor, layers: tuple[int, ...], n_layers: int,
                threshold: float, measure: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the logits an early-exiting model emits and the blocks it ran: the first exit
    whose confidence >= threshold, else the final layer. exit_logits: one (..., vocab) per exit in
    `layers`; final (..., vocab). Returns (logits (..., vocab), depth (...) in layers or n_layers)."""
    index = exit_index([confidence(z, measure) for z in exit_logits], threshold).to(final.device)
    candidates = torch.stack([*exit_logits, final])  # (exits + 1, ..., vocab)
    chosen = candidates.gather(0, index[None, ..., None].expand(1, *final.shape))[0]
    depth = torch.tensor([*layers, n_layers], device=final.device)[index]
    return chosen, depth


class DeferredDepth:
    """A KV cache whose positions may have run fewer blocks than the model has.

    `extend(tokens)` appends positions (embedded, depth 0); `deepen(d)` runs every position through
    the first d blocks. Block j always runs over the contiguous positions it has not seen yet (a
    token that exited early waits there) in one forward: the same causal attention as one token
    at a time, so keys, values and hidden states are the full model's. `truncate(n)` forgets
    positions n and later (rejected speculative drafts); ring (sliding-window) caches cannot take
    positions back, so a model with them refuses truncation at construction (`rollback=True`).
    """

    def __init__(self, model: Transformer, batch: int, max_len: int, rollback: bool = False):
        cfg = model.cfg
        check_depth_model(cfg, "adaptive depth")
        self.model, self.n_layers = model, cfg.n_layers
        self.cache: KVCache = model.new_kv_cache(batch, max_len)
        if rollback and any(self.cache.ring):
            raise EarlyExitError("self-speculative decoding needs full-attention caches: a sliding-window layer's "
                                 "rolling cache cannot take rejected draft tokens back (model.attention.layers)")
        p = next(model.parameters())
        self.states = torch.zeros((batch, max_len, cfg.dim), dtype=p.dtype, device=p.device)
        self.filled = [0] * cfg.n_layers  # positions block j has run (a prefix: deeper blocks <= shallower)
        self.length = 0  # positions appended
        self.blocks = list(model.layers.values())

    def extend(self, tokens: torch.Tensor) -> None:
        """Append (batch, s) token ids at the next positions (their embeddings: depth 0)."""
        s = tokens.shape[1]
        if self.length + s > self.cache.max_len:
            raise EarlyExitError(f"adaptive-depth cache overflow: {self.length + s} positions > {self.cache.max_len}")
        self.states[:, self.length:self.length + s] = self.model.tok_embeddings(tokens)
        self.length += s

    def deepen(self, depth: int) -> torch.Tensor:
        """Run every position through blocks 0 .. depth - 1; the hidden states (batch, rows, dim) of
        the positions this call brought to `depth` (the last row: the newest position)."""
        first = self.filled[depth - 1]
        end = self.length
        cos, sin = self.model.rope_cos, self.model.rope_sin
        for j in range(depth):
            lo = self.filled[j]
            if lo == end:
                continue
            self.cache.pos = lo  # block j continues from its own length (KVCache.update, Attention)
            out = self.blocks[j](self.states[:, lo:end], cos[lo:], sin[lo:], self.cache)
            self.states[:, lo:end] = out
            self.filled[j] = end
        self.cache.pos = end
        return self.states[:, first:end]

    def depth_of(self, position: int) -> int:
        """How many blocks `position` has run."""
        return sum(f > position for f in self.filled)

    def truncate(self, length: int) -> None:
        """Forget positions `length` and later (their cached keys are overwritten when reused)."""
        self.filled = [min(f, length) for f in self.filled]
        self.length = min(self.length, length)
        self.cache.pos = self.length


class EarlyExitDecoder:
    """Prefill at full depth, then one token per `step`, stopping at the first confident exit.
    `depths`: the blocks each step ran (the exit layer, or n_layers)."""

    def __init__(self, model: Transformer, batch: int, max_len: int, policy: ExitPolicy):
        self.layers = check_early_exit(model.cfg, policy)
        self.policy, self.model = policy, model
        self.depth = DeferredDepth(model, batch, max_len)
        self.depths: list[int] = []
        gates = policy.gates if policy.measure == "learned" else None
        self.gate = gates.decision(model.norm.weight, model.norm.eps, policy.threshold) if gates is not None else None

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """The prompt (batch, seq) at full depth -> the last position's logits (batch, vocab)."""
        self.depth.extend(tokens)
        return self.model.head(self.depth.deepen(self.depth.n_layers)[:, -1])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (batch, 1) -> logits (batch, vocab) of the exit taken."""
        d = self.depth
        d.extend(tokens)
        for k in self.layers if self.policy.active else ():
            if self.gate is not None:  # the gate reads the exit state; the head runs only to leave
                h = d.deepen(k)[:, -1]
                if self.gate.leaves(k, h):
                    self.depths.append(k)
                    return self.model.head(h)
                continue
            logits = self.model.head(d.deepen(k)[:, -1])
            if bool((confidence(logits, self.policy.measure) >= self.policy.threshold).all()):
                self.depths.append(k)
                return logits
        self.depths.append(d.n_layers)
        return self.model.head(d.deepen(d.n_layers)[:, -1])



def slot_exit_forward(model: Transformer, tokens: torch.Tensor, cache: SlotKVCache, thresholds: list[float | None],
                      measure: str = "max_prob") -> tuple[torch.Tensor, list[int]]:
    """One decode step of the continuous-batching engine with a threshold per row (None or >= 1:
    that row runs every block). `cache` is bound to the rows (SlotKVCache.bind, one token each);
    tokens (rows, 1). At each exit the rows whose confidence passes their threshold take the exit's
    logits, get their skipped blocks' keys and values from their exit state, and leave the batch;
    the others go on. Returns (logits (rows, vocab) in fp32, blocks each row ran)."""
    rows, layers = list(cache.rows), set(model.cfg.early_exit.layers)
    n_layers = model.cfg.n_layers
    if tokens.shape != (len(rows), 1):
        raise ValueError(f"slot_exit_forward: tokens {tuple(tokens.shape)} for {len(rows)} rows of one token")
    logits: list[torch.Tensor | None] = [None] * len(rows)
    depths = [n_layers] * len(rows)
    active = list(range(len(rows)))  # indices into `rows` still in the batch
    h = model.tok_embeddings(tokens)
    cos, sin = _slot_tables(model, cache)
    blocks = list(model.layers.values())
    for j, block in enumerate(blocks):
        h = block(h, cos, sin, cache)
        if j + 1 not in layers or not any(_live(thresholds[i]) for i in active):
            continue
        z = model.head(h[:, -1]).float()
        conf = confidence(z, measure).tolist()
        leave = [a for a, i in enumerate(active) if _live(thresholds[i]) and conf[a] >= thresholds[i]]
        if not leave:
            continue
        for a in leave:
            logits[active[a]], depths[active[a]] = z[a], j + 1
        stay = [a for a in range(len(active)) if a not in set(leave)]
        cache.bind([rows[active[a]] for a in leave], 1)
        _fill(blocks[j + 1:], h[leave], *_slot_tables(model, cache), cache)
        active = [active[a] for a in stay]
        if not active:
            break
        cache.bind([rows[i] for i in active], 1)
        h, (cos, sin) = h[stay], _slot_tables(model, cache)
    if active:
        z = model.head(h[:, -1]).float()
        for a, i in enumerate(active):
            logits[i] = z[a]
    cache.bind(rows, 1)  # advance every row by its token
    cache.advance(1)
    return torch.stack(logits), depths  # type: ignore[arg-type]


def _live(threshold: float | None) -> bool:
    return threshold is not None and threshold < 1


def _slot_tables(model: Transformer, cache: SlotKVCache) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE angles of the bound rows' positions, flattened (as Transformer.forward makes them)."""
    flat = cache.positions.reshape(-1)
    return model.rope_cos[flat], model.rope_sin[flat]


def _fill(blocks: list, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: SlotKVCache) -> None:
    """CALM's propagation: each skipped block's keys and values from the exit state h (rows, 1, dim),
    written at the bound rows' positions."""
    for block in blocks:
        attn = block.attention
        x = block.attention_norm(h)
        b, s, _ = x.shape
        k = attn.wk(x).reshape(1, b * s, -1, attn.head_dim)
        v = attn.wv(x).reshape(b, s, -1, attn.head_dim)
        cache.update(block.layer_id, apply_rope(k, cos, sin).view(b, s, -1, attn.head_dim), v)

"""Causal attention variants for long documents (issue 13): full, sliding window, top-k block
sparse, each optionally document-masked; one definition of "who attends to whom" and three
implementations held equal to it.

The masks, for a query at position q and a key at position k (both 0-based in the sequence):

- causal:  k <= q (every variant).
- window w: q - k < w: the query sees itself and the w - 1 previous tokens (w = 1: only itself).
  The one convention of the kernels, the masks, the FLOP counter
  (lmforge/observability/flops.py: attended_pairs) and the rolling KV cache.
- top-k, blocks of B tokens, query block i = q // B: the local window, plus the query's own
  block (its causal part), plus the `topk` highest-scoring *distant* key blocks j, those that lie
  entirely before the window of every query of block i: (j + 1) * B - 1 <= i * B - w. Distant
  blocks are therefore full, fully causal and disjoint from the local part, so every attended
  pair is counted once and the count does not depend on which blocks won (FLOPs in closed form).
  Scores: per KV head, score(i, j) = (sum over the group's query heads of the query at i * B,
  the block's first position) . mean(keys of block j). The first query, not a pool over the
  block, so a query's keys never depend on a later token (causal; cached decoding chooses once
  per block and gets the uncached answer). Ties: the lower block index wins (a stable sort).
  With document masking only blocks that lie wholly inside the document of the block's first
  query are eligible (j * B >= its document start): a block the document starts in is reached by
  the window or not at all, so every chosen block is attended whole by the queries of that
  document and by none of a later one, and the count stays closed-form (flops.attended_pairs);
  fewer than `topk` eligible: all of them. The selection is discrete: no gradient
  flows through it, gradients of the attention itself are exact.
- documents: k >= doc_start[q], the first position of q's document. A document starts at
  position 0 and after every end-of-text token (the packer follows each document with it), so
  the end-of-text token belongs to the document it ends. RoPE positions do NOT restart per
  document: RoPE scores depend only on q - k, so inside one document (all that masking leaves)
  restarting changes nothing but rounding, and keeping positions needs no per-token tables.

Implementations: `dense_reference` materialises the mask (O(n^2), tests); `blocked_attention`
(CPU, and any device) computes only the needed blocks over SDPA: for windowed kinds each query
block of Bq tokens meets its Bq + w - 1 neighbouring keys (and, for top-k, its gathered distant
blocks), O(n * (w + Bq + topk * B)); full causal uses SDPA's causal kernel, or with documents a
loop of query blocks over their documents' keys only. `flex_attention_` (CUDA) compiles
flex_attention with a block mask built from the same rules.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttnSpec:
    kind: str = "full"  # "full" | "window" | "topk"
    window: int = 256
    topk: int = 4
    block: int = 64

    @property
    def local(self) -> int | None:
        """The sliding window of this kind (None: unbounded, full causal)."""
        return None if self.kind == "full" else self.window


def spec_for(cfg, layer: int) -> AttnSpec:
    """The AttnSpec of block `layer` from a ModelConfig (model.attention)."""
    a = cfg.attention
    return AttnSpec(a.kind(layer), a.window, a.topk, a.block_size)


def document_starts(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(batch, seq) token ids -> (batch, seq) int64: the position where each token's document
    starts (0, or one past the last end-of-text token before it)."""
    b, n = tokens.shape
    pos = torch.arange(n, device=tokens.device).expand(b, n)
    new = torch.zeros_like(tokens, dtype=torch.bool)
    new[:, 1:] = tokens[:, :-1] == eos_id
    return torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values


# -- top-k selection ------------------------------------------------------------------------------


def _eligible(spec: AttnSpec, qblocks: torch.Tensor, nbk: int, doc_first: torch.Tensor | None) -> torch.Tensor:
    """(batch or 1, m, nbk) bool: distant key blocks of query blocks `qblocks` (m,), wholly
    inside the document of each block's first query (doc_first: (batch, m) or None)."""
    B = spec.block
    j = torch.arange(nbk, device=qblocks.device)
    ok = ((j[None, :] + 1) * B - 1 <= qblocks[:, None] * B - spec.window)[None]
    if doc_first is not None:
        ok = ok & (j[None, None, :] * B >= doc_first[:, :, None])
    return ok


def select_blocks(qfirst: torch.Tensor, k: torch.Tensor, spec: AttnSpec, qblocks: torch.Tensor,
                  doc_first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The distant key blocks of query blocks `qblocks`.

    qfirst (b, kvh, m, d): per KV head, the sum over its query heads of each block's first query;
    k (b, kvh, L, d) the keys from position 0. Returns sel (b, kvh, m, K) block indices (K =
    min(topk, key blocks)) and valid (b, kvh, m, K) (False: no such block; index 0 then).
    """
    B = spec.block
    b, kvh, L, d = k.shape
    nbk = L // B  # only full blocks can be distant
    m = qblocks.shape[0]
    K = min(spec.topk, nbk)
    if K == 0:
        z = torch.zeros(b, kvh, m, 0, dtype=torch.long, device=k.device)
        return z, z.bool()
    with torch.no_grad():
        kbar = k[:, :, :nbk * B].float().reshape(b, kvh, nbk, B, d).mean(dim=3)
        score = qfirst.float() @ kbar.transpose(-1, -2)  # (b, kvh, m, nbk)
        ok = _eligible(spec, qblocks, nbk, doc_first)[:, None]  # (b|1, 1, m, nbk)
        score = score.masked_fill(~ok, float("-inf"))
        order = torch.sort(score, dim=-1, descending=True, stable=True)
        sel = order.indices[..., :K]
        valid = order.values[..., :K] > float("-inf")
    return torch.where(valid, sel, torch.zeros_like(sel)), valid


def first_queries(q: torch.Tensor, kvh: int, B: int) -> torch.Tensor:
    """q (b, h, n, d) -> (b, kvh, ceil(n / B), d): each block's first query summed per KV group."""
    b, h, n, d = q.shape
    qf = q[:, :, ::B]
    return qf.reshape(b, kvh, h // kvh, qf.shape[2], d).sum(dim=2)


def topk_selection(q: torch.Tensor, k: torch.Tensor, spec: AttnSpec, doc_start: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection for every query block of a whole sequence (q (b, h, n, d), k (b, kvh, n, d))."""
    B, n = spec.block, q.shape[2]
    qblocks = torch.arange(math.ceil(n / B), device=q.device)
    doc_first = doc_start[:, ::B] if doc_start is not None else None
    return select_blocks(first_queries(q, k.shape[1], B), k, spec, qblocks, doc_first)


# -- the mask, materialised ------------------------------------------------------------------------


def pair_mask(spec: AttnSpec, qpos: torch.Tensor, kpos: torch.Tensor, doc_start: torch.Tensor | None = None,
              sel: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Whether query positions qpos (s,) attend key positions kpos (L,) (negative: empty slot).

    Returns (b|1, kvh|1, s, L) bool. doc_start (b, s): the document start of each query. sel:
    (sel, valid) of the query blocks qpos // block - qpos[0] // block onward (select_blocks).
    """
    q, kk = qpos[:, None], kpos[None, :]
    allowed = (kk <= q) & (kk >= 0)
    local = torch.ones_like(allowed) if spec.local is None else (q - kk < spec.local)
    if spec.kind == "topk":
        local = local | (kk // spec.block == q // spec.block)
    allowed = (allowed & local)[None, None]
    if spec.kind == "topk" and sel is not None:
        idx, valid = sel
        b, kvh, m, K = idx.shape
        nbk = int(max(int(kpos.max()) // spec.block + 1, 1))
        table = torch.zeros(b, kvh, m, nbk + 1, dtype=torch.bool, device=qpos.device)
        table.scatter_(-1, torch.where(valid, idx, torch.full_like(idx, nbk)), True)
        table = table[..., :nbk]  # (b, kvh, m, nbk): block j chosen for query block
        qb = qpos // spec.block - qpos[0] // spec.block
        kb = (kpos.clamp(min=0) // spec.block).clamp(max=nbk - 1)
        chosen = table[:, :, qb][..., kb] & (kk >= 0) & (kk <= q)
        allowed = allowed | chosen
    if doc_start is not None:
        allowed = allowed & (kk[None, None] >= doc_start[:, None, :, None])
    return allowed


def dense_mask(spec: AttnSpec, q: torch.Tensor, k: torch.Tensor, doc_start: torch.Tensor | None = None
               ) -> torch.Tensor:
    """The full (b|1, kvh|1, n, n) mask of a sequence, selection included: the reference."""
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)
    sel = topk_selection(q, k, spec, doc_start) if spec.kind == "topk" and spec.window < n else None
    return pair_mask(spec, pos, pos, doc_start, sel)


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) masked) v in plain ops. q (b, h, n, d), k, v (b, kvh, L, d), mask
    (b|1, kvh|1, n, L)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if mask.shape[1] > 1:
        mask = mask.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


# -- the blocked kernel -----------------------------------------------------------------------------


def window_query_block(w: int) -> int:
    """Query block of the windowed kernel: each computes (Bq + w - 1) keys for w used, so a smaller
    Bq wastes less, a larger one makes fewer, bigger SDPA calls (measured in bench/attention.py)."""
    return max(16, min(128, w // 4))


def _full_with_docs(q, k, v, doc_start: torch.Tensor, Bq: int = 256) -> torch.Tensor:
    """Causal + documents: query block [s, e) meets keys [min doc start, e) only. Under
    torch.compile the keys start at 0 (the mask alone excludes earlier documents): reading the
    document start back to Python would break the graph, and a break inside a sequence-parallel
    block left wrong gradients (compiled tp + sp differed from eager by 0.4% in loss)."""
    n, gqa = q.shape[2], q.shape[1] != k.shape[1]
    compiling = torch.compiler.is_compiling()
    outs = []
    for s in range(0, n, Bq):
        e = min(n, s + Bq)
        lo = 0 if compiling else int(doc_start[:, s].min())  # starts never decrease along a row
        kpos = torch.arange(lo, e, device=q.device)
        qpos = torch.arange(s, e, device=q.device)
        m = (kpos[None, :] <= qpos[:, None])[None] & (kpos[None, None, :] >= doc_start[:, s:e, None])
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, lo:e], v[:, :, lo:e],
                                                   attn_mask=m[:, None], enable_gqa=gqa))
    return torch.cat(outs, dim=2)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec,
                      doc_start: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q (b, h, n, d) over k, v (b, kvh, n, d) computing only the needed blocks."""
    b, h, n, d = q.shape
    kvh = k.shape[1]
    gqa = h != kvh
    if doc_start is not None and not torch.compiler.is_compiling() and bool((doc_start == 0).all()):
        doc_start = None  # one document: nothing to mask (a shortcut eager only: see _full_with_docs)
    if spec.local is None or spec.window >= n:  # a window as long as the sequence is full causal
        if doc_start is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return _full_with_docs(q, k, v, doc_start)
    w = spec.window
    Bq = spec.block if spec.kind == "topk" else window_query_block(w)
    nb = math.ceil(n / Bq)
    n_pad, P, L = nb * Bq, w - 1, Bq + w - 1
    dev = q.device
    qb = F.pad(q, (0, 0, 0, n_pad - n)).view(b, h, nb, Bq, d).transpose(1, 2)
    kw = F.pad(k, (0, 0, P, n_pad - n)).unfold(2, L, Bq).permute(0, 2, 1, 4, 3)  # (b, nb, kvh, L, d)
    vw = F.pad(v, (0, 0, P, n_pad - n)).unfold(2, L, Bq).permute(0, 2, 1, 4, 3)
    start = torch.arange(nb, device=dev)[:, None] * Bq
    qpos = start + torch.arange(Bq, device=dev)  # (nb, Bq)
    kpos = start - P + torch.arange(L, device=dev)  # (nb, L)
    qq, kk = qpos[:, :, None], kpos[:, None, :]
    local = kk > qq - w
    if spec.kind == "topk":
        local = local | (kk >= start[:, :, None])  # the own block's causal part
    mask = ((kk <= qq) & (kk >= 0) & local)[None, :, None]  # (1, nb, 1, Bq, L)
    ds = None
    if doc_start is not None:
        ds = torch.cat([doc_start, doc_start[:, -1:].expand(b, n_pad - n)], dim=1).view(b, nb, Bq)
        mask = mask & (kk[None] >= ds[:, :, :, None])[:, :, None]
    if spec.kind == "topk":
        sel, valid = topk_selection(q, k, spec, doc_start)  # (b, kvh, nb, K)
        K = sel.shape[-1]
        if K:
            kb = F.pad(k, (0, 0, 0, n_pad - n)).view(b, kvh, nb, Bq, d)
            vb = F.pad(v, (0, 0, 0, n_pad - n)).view(b, kvh, nb, Bq, d)
            idx = sel.reshape(b, kvh, nb * K, 1, 1).expand(b, kvh, nb * K, Bq, d)
            ks = kb.gather(2, idx).view(b, kvh, nb, K * Bq, d).transpose(1, 2)
            vs = vb.gather(2, idx).view(b, kvh, nb, K * Bq, d).transpose(1, 2)
            smask = valid.transpose(1, 2)[:, :, :, None, :, None].expand(b, nb, kvh, Bq, K, Bq)
            if ds is not None:
                spos = sel.transpose(1, 2)[..., None] * Bq + torch.arange(Bq, device=dev)  # (b, nb, kvh, K, Bq)
                smask = smask & (spos[:, :, :, None] >= ds[:, :, None, :, None, None])
            smask = smask.reshape(b, nb, kvh, Bq, K * Bq).repeat_interleave(h // kvh, dim=2)
            mask = torch.cat([mask.expand(b, nb, h, Bq, L), smask], dim=-1)
            kw, vw = torch.cat([kw, ks], dim=3), torch.cat([vw, vs], dim=3)
    # 4-D (b * nb, heads, ., d): SDPA takes the CPU flash kernel (a 5-D batch falls back to the
    # unfused math path, measured 4x slower).
    mask = mask.expand(b, nb, mask.shape[2], Bq, mask.shape[-1]).reshape(b * nb, mask.shape[2], Bq, -1)
    out = F.scaled_dot_product_attention(qb.reshape(b * nb, h, Bq, d), kw.reshape(b * nb, kvh, -1, d),
                                         vw.reshape(b * nb, kvh, -1, d), attn_mask=mask, enable_gqa=gqa)
    return out.view(b, nb, h, Bq, d).transpose(1, 2).reshape(b, h, n_pad, d)[:, :, :n]


# -- flex_attention (GPU) ---------------------------------------------------------------------------

_compiled_flex = None


def flex_block_mask(q: torch.Tensor, k: torch.Tensor, spec: AttnSpec, doc_start: torch.Tensor | None = None,
                    compile: bool = True):  # noqa: ANN201 (torch's BlockMask, imported lazily)
    """flex_attention's block mask for `spec` (and documents), built on every layer's call. Compiled,
    it comes from the mask rule block by block; eager, torch materialises the whole (n, n) mask
    first (16k tokens on CPU: 1.7 s and 2.8 GiB peak eager, 0.2 s and 0.4 GiB compiled)."""
    b, h, n, _ = q.shape
    g = h // k.shape[1]
    w, B = spec.local, spec.block
    table = None
    if spec.kind == "topk" and w is not None and w < n:
        sel, valid = topk_selection(q, k, spec, doc_start)
        nb = math.ceil(n / B)
        table = torch.zeros(b, k.shape[1], nb, nb + 1, dtype=torch.bool, device=q.device)
        table.scatter_(-1, torch.where(valid, sel, torch.full_like(sel, nb)), True)
        table = table[..., :nb].contiguous()

    def mask_mod(bi, hi, qi, ki):
        ok = ki <= qi
        if w is not None:
            local = qi - ki < w
            if table is not None:
                local = local | (ki // B == qi // B) | table[bi, hi // g, qi // B, ki // B]
            ok = ok & local
        if doc_start is not None:
            ok = ok & (ki >= doc_start[bi, qi])
        return ok

    # top-k picks blocks per kv head: the mask is per head (H=None would build every head's blocks
    # from head 0's choice, and flex skips the blocks it leaves out)
    heads = h if table is not None else None
    return _block_mask_builder(compile)(mask_mod, b, heads, n, n, device=q.device)


@functools.cache
def _block_mask_builder(compiled: bool):  # noqa: ANN202
    """torch's create_block_mask, compiled as torch recommends (one wrapper per process)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask) if compiled else create_block_mask


def flex_attention_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec,
                    doc_start: torch.Tensor | None = None, compile: bool = True) -> torch.Tensor:
    """flex_attention with a block mask from the same rules (compiled; eager only for tests,
    where it materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    g = q.shape[1] // k.shape[1]
    # the mask builder compiled on CUDA only: on CPU (tests) inductor's C++ code for the top-k
    # table lookup with 16-token blocks does not compile (torch 2.13: a VecMask<int>/VecMask<float>
    # mismatch), and the eager builder is cheap at test sizes
    mask = flex_block_mask(q, k, spec, doc_start, compile=compile and q.is_cuda)
    fn = flex_attention
    if compile:
        _compiled_flex = _compiled_flex or torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=mask, enable_gqa=g > 1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec,
           doc_start: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """The attention of one layer over a whole sequence: q (b, h, n, d), k, v (b, kvh, n, d)."""
    if backend == "dense":
        return dense_reference(q, k, v, dense_mask(spec, q, k, doc_start))
    if backend == "flex" and not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError("model.attention.backend = 'flex' trains on CUDA only (torch has no CPU flex_attention "
                         "backward); use 'auto' or 'blocked'")
    if backend == "flex" or (backend == "auto" and q.is_cuda and (spec.local is not None or doc_start is not None)):
        return flex_attention_(q, k, v, spec, doc_start, compile=q.is_cuda)
    return blocked_attention(q, k, v, spec, doc_start)

"""Model FLOPs per token, counted once, so tokens/s turns into the same MFU everywhere.

Counted: multiply-adds of matrix products, 2 FLOPs each. Not counted: norms, RoPE, activations,
softmax, residual adds, the loss (all O(dim) per token, a fraction of a percent at real sizes).

Forward, per token, for a model of L layers, H query heads of width hd, sequence length s::

    forward = 2 * N_matmul  +  L * 2 * (2 * H * hd) * k(s)

    N_matmul = sum over layers of (wq + wk + wv + wo + w1 + w2 + w3 weights)  +  dim * vocab (output)
    k(s)     = average number of keys a query attends to = (s + 1) / 2 under causal masking

- N_matmul counts every Linear, including the output projection. The embedding lookup is a gather,
  not a matmul, and is excluded; with tied embeddings the output projection is still a
  (dim x vocab) matmul and is counted. GQA shrinks wk/wv (dim x kv_heads*hd), which N_matmul sees.
- Attention: the scores Q K^T and the weighted sum A V each cost 2*H*hd FLOPs per (query, key)
  pair (H*hd multiply-adds). With causal masking, the query at position i (0-based) sees i + 1
  keys, so over a sequence of length s the mean is (1/s) * sum_{i=0}^{s-1} (i + 1) = (s + 1) / 2
  exactly. Only the pairs a causal kernel must compute are counted (FlashAttention skips the
  masked blocks), so ``forward_attention = 2 * L * H * hd * (s + 1)`` per token.

Training = 3 x forward (the backward pass does two matmuls per forward matmul: gradient of the
input and of the weight; for attention dQ, dK and dV, dP: again twice the forward)::

    training = 6 * N_matmul + 6 * L * H * hd * (s + 1)

The popular ``6N + 12 * L * d * s`` (Kaplan et al. 2020; PaLM appendix B) counts every query
against all s keys, i.e. non-causal attention; with H * hd = d it equals ours with (s + 1) / 2
replaced by s, so it overstates attention by a factor 2s / (s + 1).

Mixture-of-Experts layers count only the active weights per token (router, top_k experts, shared
experts: see `_ffn_matmul_params`), so MFU of an MoE model is the MFU of its active parameters.

Attention variants (model.attention, lmforge/models/common/sparse_attention.py) change k(s) per
layer to attended_pairs(...) / s, the exact number of (query, key) pairs the variant attends,
counted once (never the masked pairs a kernel may compute and throw away): a sliding window w
gives query i min(i + 1, w) keys; top-k adds `topk` whole distant blocks per query where they
exist (chosen blocks are disjoint from the local window by construction and, with documents,
wholly inside the query block's document, so the count does not depend on which ones won).
Mixed stacks (local/global, dense/MoE) are summed layer by layer in `flops_breakdown`. Document
masking is data dependent: `attended_pairs(..., doc_lengths=...)` counts it exactly for a given
packing, every kind; the trainer's MFU counts the documents of every trained batch
(observability/step_flops.py)."""

from __future__ import annotations

from itertools import accumulate

from lmforge.config import ModelConfig

# A backward pass costs twice its forward pass (gradient w.r.t. inputs and w.r.t. weights).
BACKWARD_TO_FORWARD = 2.0


def _window_pairs(n: int, w: int | None) -> int:
    """sum over i < n of min(i + 1, w): causal (w None) n(n + 1)/2; else the ramp then w per query."""
    if w is None or n <= w:
        return n * (n + 1) // 2
    return w * (w + 1) // 2 + (n - w) * w


def attended_pairs(kind: str, seq_len: int, window: int | None = None, block: int = 64, topk: int = 0,
                   doc_lengths: list[int] | None = None) -> int:
    """Exact number of (query, key) pairs one head attends over one sequence of `seq_len` tokens.

    kind "full" | "window" | "topk" with the conventions of sparse_attention.py: a window of w
    sees itself and w - 1 previous tokens; top-k adds to the window the query's own block (causal
    part) and min(topk, distant blocks) whole blocks of `block` keys, a block j being distant
    for query block i when (j + 1) * block - 1 <= i * block - w. `doc_lengths` (summing to
    seq_len): document masking, exact for every kind (`_topk_document_pairs`).
    """
    if kind not in ("full", "window", "topk"):
        raise ValueError(f"attention kind {kind!r}: expected full, window or topk")
    w = None if kind == "full" else window
    if doc_lengths is not None:
        if sum(doc_lengths) != seq_len:
            raise ValueError(f"doc_lengths sum to {sum(doc_lengths)}, not seq_len {seq_len}")
        if kind == "topk" and w is not None and w < seq_len:
            return _topk_document_pairs(doc_lengths, w, block, topk)
        return sum(_window_pairs(n, w) for n in doc_lengths)
    if kind != "topk" or w is None or w >= seq_len:
        return _window_pairs(seq_len, w)
    total = 0
    for start in range(0, seq_len, block):  # one query block at a time: O(seq_len / block)
        end = min(seq_len, start + block)
        # Local part of query q: keys from max(0, min(start, q - w + 1)) to q. Before q reaches
        # start + w - 1 the window reaches further back (min(q + 1, w) keys), from there on the
        # own block does (q - start + 1 keys).
        t = min(end, start + w - 1)
        total += _window_pairs(t, w) - _window_pairs(start, w)
        total += (end - start) * (end - start + 1) // 2 - (t - start) * (t - start + 1) // 2
        distant = max(0, (start - w + 1) // block)  # blocks j with (j + 1) * block - 1 <= start - w
        total += (end - start) * block * min(topk, distant)
    return total


def _topk_document_pairs(doc_lengths: list[int], w: int, block: int, topk: int) -> int:
    """Top-k pairs of one packed sequence, query by query. Query q of block i = q // block: the
    local keys from max(min(q - w + 1, i * block), its document start) to q; plus, when q is in
    the document of the block's first query (document start d), `block` keys for each of
    min(topk, eligible) distant blocks, eligible being j >= ceil(d / block) with
    (j + 1) * block - 1 <= i * block - w (sparse_attention._eligible)."""
    starts = [s for s, n in zip(accumulate(doc_lengths, initial=0), doc_lengths) for _ in range(n)]
    total = 0
    for q, d in enumerate(starts):
        first = q - q % block
        total += q - max(min(q - w + 1, first), d) + 1
        if d == starts[first]:
            eligible = (first - w + 1) // block - (d + block - 1) // block
            total += block * min(topk, max(0, eligible))
    return total


def _mean_keys_per_query(cfg: ModelConfig, layer: int, seq_len: int) -> float:
    """Average keys one query attends to in `layer`, over positions 0..seq_len-1 (exact)."""
    a = cfg.attention
    return attended_pairs(a.kind(layer), seq_len, a.window, a.block_size, a.topk) / seq_len


def _attention_matmul_params(cfg: ModelConfig, layer: int) -> int:
    """Weights of wq, wk, wv, wo (no biases in this model family)."""
    d, h, kv, hd = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    return d * h * hd + 2 * d * kv * hd + h * hd * d


def _ffn_matmul_params(cfg: ModelConfig, layer: int) -> int:
    """Weights one token multiplies in the SwiGLU MLP: w1 (gate), w3 (up), w2 (down).

    MoE layers count the ACTIVE weights: router (dim x E) + top_k routed experts + shared experts
    (+ the Qwen2-MoE shared-expert gate, dim x 1). Expert choice gives each token
    capacity_factor * top_k experts on average (E experts x c = cf * T * k / E tokens each);
    token choice with a capacity counts top_k (dropless exact; an upper bound when it drops).
    """
    if not cfg.is_moe_layer(layer):
        return 3 * cfg.dim * cfg.ffn_hidden_size
    return cfg.moe_ffn_params()["active"]


def _attention_flops_per_token(cfg: ModelConfig, layer: int, seq_len: int) -> float:
    """Q K^T plus A V: 2 matmuls x 2 FLOPs per multiply-add x H*hd per (query, key) pair."""
    return 2 * (2 * cfg.n_heads * cfg.head_dim) * _mean_keys_per_query(cfg, layer, seq_len)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: every Linear, output projection included,
    embedding lookup excluded (counted once more for the output even when tied)."""
    layers = sum(_attention_matmul_params(cfg, i) + _ffn_matmul_params(cfg, i) for i in range(cfg.n_layers))
    return layers + cfg.dim * cfg.vocab_size


def flops_breakdown(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component (for reports and tests); values sum to `forward`."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0 to count FLOPs, got {seq_len}")
    attn_proj = sum(2.0 * _attention_matmul_params(cfg, i) for i in range(cfg.n_layers))
    attn_core = sum(_attention_flops_per_token(cfg, i, seq_len) for i in range(cfg.n_layers))
    ffn = sum(2.0 * _ffn_matmul_params(cfg, i) for i in range(cfg.n_layers))
    output = 2.0 * cfg.dim * cfg.vocab_size
    return {"attention_projections": attn_proj, "attention_scores_and_values": attn_core, "ffn": ffn,
            "output": output, "forward": attn_proj + attn_core + ffn + output}


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """FLOPs of one forward pass per token at sequence length `seq_len` (causal attention)."""
    return flops_breakdown(cfg, seq_len)["forward"]


def exit_head_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of the early exits' heads while training them (model.early_exit:
    each exit runs the shared LM head once more; none when the exits are not trained)."""
    ee = cfg.early_exit
    return 2.0 * cfg.dim * cfg.vocab_size * len(ee.layers) if ee.loss_weight > 0 else 0.0


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 3 x forward (early-exit heads included). The
    numerator of MFU.

    Activation checkpointing recomputes the forward but is not counted (that would be HFU).
    """
    return (1.0 + BACKWARD_TO_FORWARD) * (forward_flops_per_token(cfg, seq_len) + exit_head_flops_per_token(cfg))

"""Llama-style decoder-only transformer: pre-norm blocks of GQA attention and SwiGLU MLP.

Plain single-device PyTorch. Parallelism, recomputation and compilation are applied from the
outside (lmforge.parallel), so nothing here knows about process groups. Build on the meta
device, move with `to_empty`, then call `init_weights` (after sharding, for big models).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

from lmforge.config import ModelConfig
from lmforge.models.common.attention import Attention
from lmforge.models.common.kv_cache import KVCache, SlotKVCache
from lmforge.models.common.linear import Linear, MatmulKernels
from lmforge.models.common.mlp import SwiGLU
from lmforge.models.common.moe import MoE
from lmforge.models.common.norms import RMSNorm
from lmforge.models.common.rope import dynamic_rope_length, rope_tables
from lmforge.models.common.sparse_attention import spec_for
from lmforge.models.llama.tp_plan import tp_plan


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, kernels: MatmulKernels | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.qkv_bias, kernels,
                                   spec_for(cfg, layer_id), cfg.attention.backend)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        self.feed_forward: SwiGLU | MoE = (MoE(cfg.dim, cfg.expert_hidden_size, cfg.moe, layer_id) if self.is_moe
                                           else SwiGLU(cfg.dim, cfg.ffn_hidden_size, kernels))
        # Depth-scaled init of the projections that write into the residual stream (GPT-2).
        self._std = cfg.init_std
        self._out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self._std, self._out_std)
        self.feed_forward.init_weights(self._std, self._out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, self.layer_id, doc_start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    # For pipeline parallelism (lmforge.parallel.pp): the modules only the first stage keeps and
    # those only the last stage keeps (the blocks in `layers` are split); `forward` skips a None.
    first_stage_modules = ("tok_embeddings",)
    last_stage_modules = ("norm", "output")

    def __init__(self, cfg: ModelConfig, kernels: MatmulKernels | None = None):
        """`kernels`: the fp32 CPU matmul kernel choice shared by all linear layers (default: one
        with the per-machine disk cache, see models/common/linear.py)."""
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels if kernels is not None else MatmulKernels.with_disk_cache()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A ModuleDict keyed by the global layer index keeps names stable when a pipeline stage
        # deletes the layers it does not own.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i, self.kernels) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False, kernels=self.kernels)
        cos, sin = rope_tables(cfg)  # with model.rope_scaling (models/common/rope.py)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.tie_weights()

    def tp_plan(self, sequence_parallel: bool, loss_parallel: bool) -> dict[str, ParallelStyle]:
        """This model's tensor-parallel plan (lmforge/models/llama/tp_plan.py), for the modules it
        holds now; lmforge.parallel.tp.apply_tp applies it."""
        return tp_plan(self, sequence_parallel, loss_parallel)

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        """(Re)initialise every parameter and the RoPE tables in place; call after `to_empty`."""
        self.tie_weights()  # `to_empty` may have split a tied pair into two tensors
        device = buffer_device or next(self.parameters()).device
        cos, sin = rope_tables(self.cfg, device)
        self.rope_cos, self.rope_sin = cos, sin
        std = self.cfg.init_std
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers.values():
            layer.init_weights()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not self.cfg.tie_embeddings:
            final_std = self.cfg.dim ** -0.5
            nn.init.trunc_normal_(self.output.weight, std=final_std, a=-3 * final_std, b=3 * final_std)

    def forward(self, tokens: torch.Tensor, cache: KVCache | SlotKVCache | None = None,
                doc_start: torch.Tensor | None = None, exits: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """tokens (batch, seq) -> logits (batch, seq, vocab). With `cache`, positions continue
        from `cache.pos` and the cache is advanced; with a SlotKVCache each row continues its own
        slot (the slots `bind` chose). `doc_start` (batch, seq): document masking
        (sparse_attention.document_starts of the packed tokens; RoPE positions do not restart).
        `exits`: also the logits of every early exit (model.early_exit.layers, through the shared
        final norm and head), returned as (logits, [exit logits in layer order]); inside forward
        so that DDP and FSDP2 see the head's parameters used there (the exit loss trains them)."""
        start = cache.pos if isinstance(cache, KVCache) else 0
        seq = tokens.shape[1]
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        # The tables from `start` on; each attention takes the length it sees. (A block's input
        # may be a slice of the sequence, e.g. under sequence parallelism after a pipeline
        # stage boundary, while its attention sees the whole sequence.)
        cos, sin = self.rope_cos, self.rope_sin
        if (length := dynamic_rope_length(self.cfg, start + seq)) is not None:  # "dynamic" NTK past its length
            cos, sin = rope_tables(self.cfg, cos.device, length)
        if isinstance(cache, SlotKVCache):  # one angle per row and position, flattened (fixed tables:
            flat = cache.positions.reshape(-1)  # lmforge serve refuses "dynamic" RoPE, serve/server/model_check.py)
            cos, sin = cos[flat], sin[flat]
        else:
            cos, sin = cos[start:], sin[start:]
        exit_after = set(self.cfg.early_exit.layers) if exits else set()
        exit_logits = []
        for name, layer in self.layers.items():
            h = layer(h, cos, sin, cache, doc_start)
            if int(name) + 1 in exit_after:
                exit_logits.append(self.head(h))
        if cache is not None:
            cache.advance(seq)
        logits = self.head(h)
        return (logits, exit_logits) if exits else logits

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and LM head (each skipped where a pipeline stage does not hold it): the
        full model's last step, and every early exit's (shared, LayerSkip-style)."""
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    def new_slot_cache(self, slots: int, max_len: int, dtype: torch.dtype | None = None) -> SlotKVCache:
        """The continuous-batching cache: `slots` sequences of up to `max_len` positions each."""
        p = next(self.parameters())
        return SlotKVCache(self.cfg.n_layers, slots, max_len, self.cfg.kv_heads, self.cfg.head_dim,
                           dtype or p.dtype, p.device)

    def new_kv_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """Sliding-window layers get a rolling buffer of their window (O(w) memory)."""
        p = next(self.parameters())
        a = self.cfg.attention
        windows = [a.window if a.kind(i) == "window" else None for i in range(self.cfg.n_layers)]
        return KVCache(self.cfg.n_layers, batch, max_len, self.cfg.kv_heads, self.cfg.head_dim,
                       dtype or p.dtype, p.device, windows)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", seed: int | None = 0,
                kernels: MatmulKernels | None = None) -> Transformer:
    """Build on meta, materialise on `device`, initialise (seeded for reproducibility). `kernels`:
    the fp32 CPU matmul path (default: timed and fused where the CPU gains, models/common/linear.py;
    `MatmulKernels(enabled=False)` for plain F.linear, as multi-process layouts run)."""
    with torch.device("meta"):
        model = Transformer(cfg, kernels)
    model.to_empty(device=device)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.init_weights(torch.device(device))
    else:
        model.init_weights(torch.device(device))
    return model


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter count from the config alone (no tensors), by hand: used by `lmforge sizes`."""
    d, h, kv, hd, f, v = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d + ((h + 2 * kv) * hd if cfg.qkv_bias else 0)
    moe = cfg.moe_ffn_params() if cfg.moe.n_experts else {"total": 0, "active": 0}
    layers = [attn + (moe["total"] if cfg.is_moe_layer(i) else 3 * d * f) + 2 * d
              for i in range(cfg.n_layers)]
    embedding = v * d
    output = 0 if cfg.tie_embeddings else v * d
    total = embedding + sum(layers) + d + output
    # per_layer: the mean over layers (equal for dense stacks; MoE stacks mix dense and MoE blocks).
    out = {"total": total, "embedding": embedding, "non_embedding": total - embedding - output,
           "per_layer": round(sum(layers) / cfg.n_layers)}
    if cfg.moe.n_experts:
        inactive = (moe["total"] - moe["active"]) * sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        out["active"] = total - inactive
    return out


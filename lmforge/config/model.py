"""The model sections: the Llama-style decoder and its Mixture-of-Experts feed-forward."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lmforge.config.checks import require, require_positive


@dataclass
class MoEConfig:
    """Mixture-of-Experts feed-forward (issue 4). `n_experts = 0` keeps every layer dense.

    Layer i is MoE when n_experts > 0, i >= first_k_dense and (i - first_k_dense) % layer_interval
    == 0. Routed experts are SwiGLUs of width `expert_hidden` (None: the dense ffn width);
    `n_shared_experts` adds one always-on SwiGLU of width n_shared_experts * expert_hidden.
    `capacity_factor`: 0 = dropless token choice; > 0 caps each expert at
    ceil(capacity_factor * tokens * top_k / n_experts) assignments (token choice drops the rest;
    expert choice needs it > 0: it IS the per-expert capacity). `bias_update_rate` > 0 turns on
    auxiliary-loss-free balancing (DeepSeek-V3): a per-expert selection bias moved by
    rate * sign(mean load - load) after every optimizer step.
    """

    n_experts: int = 0
    top_k: int = 2
    n_shared_experts: int = 0
    expert_hidden: int | None = None
    first_k_dense: int = 0
    layer_interval: int = 1
    router: Literal["token_choice", "expert_choice"] = "token_choice"
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk: bool = True
    route_scale: float = 1.0
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(dim, 1)) scales the shared expert
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    capacity_factor: float = 0.0
    # Layers kept dense whatever the pattern above says (Qwen2-MoE `mlp_only_layers`).
    dense_layers: list[int] = field(default_factory=list)

    def validate(self, section: str = "model.moe") -> None:
        require(self.n_experts >= 0, f"{section}.n_experts", self.n_experts, "must be >= 0 (0 = dense)")
        if self.n_experts == 0:
            return
        require(1 <= self.top_k <= self.n_experts, f"{section}.top_k", self.top_k,
                f"must be in [1, n_experts = {self.n_experts}]")
        require(self.n_shared_experts >= 0, f"{section}.n_shared_experts", self.n_shared_experts, "must be >= 0")
        if self.expert_hidden is not None:
            require(self.expert_hidden > 0, f"{section}.expert_hidden", self.expert_hidden, "must be > 0")
        require(self.first_k_dense >= 0, f"{section}.first_k_dense", self.first_k_dense, "must be >= 0")
        require(self.layer_interval >= 1, f"{section}.layer_interval", self.layer_interval, "must be >= 1")
        require(all(i >= 0 for i in self.dense_layers), f"{section}.dense_layers", self.dense_layers,
                "must be layer indices >= 0")
        require(self.route_scale > 0, f"{section}.route_scale", self.route_scale, "must be > 0")
        for n in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "capacity_factor"):
            v = getattr(self, n)
            require(v >= 0, f"{section}.{n}", v, "must be >= 0 (0 = off)")
        require(not (self.shared_expert_gate and self.n_shared_experts == 0), f"{section}.shared_expert_gate",
                True, "needs n_shared_experts > 0")
        if self.router == "expert_choice":
            require(self.capacity_factor > 0, f"{section}.capacity_factor", self.capacity_factor,
                    "must be > 0 with router = 'expert_choice' (each expert takes capacity_factor * "
                    "tokens * top_k / n_experts tokens)")
            require(self.aux_loss_coef == 0, f"{section}.aux_loss_coef", self.aux_loss_coef,
                    "must be 0 with router = 'expert_choice' (balanced by construction)")
            require(self.bias_update_rate == 0, f"{section}.bias_update_rate", self.bias_update_rate,
                    "must be 0 with router = 'expert_choice' (balanced by construction)")
            require(self.score_func == "softmax", f"{section}.score_func", self.score_func,
                    "must be 'softmax' with router = 'expert_choice'")


RopeScalingType = Literal["none", "linear", "ntk", "dynamic", "yarn", "llama3"]


@dataclass
class RopeScalingConfig:
    """Long-context RoPE scaling (issue 13): how the rotary frequencies of `model.rope_theta` are
    changed so a model reaches past the length it was trained at. The math is
    lmforge/models/common/rope.py (numerically that of transformers' modeling_rope_utils.py);
    each type is Hugging Face's `rope_scaling` of the same name, except "ntk":

    - "none": plain RoPE (the other fields are ignored).
    - "linear": position interpolation, every frequency / factor.
    - "ntk": static NTK-aware, theta' = theta * factor^(d / (d - 2)) (d = head dim): plain RoPE
      with a larger base, so it is exported to HF as rope_theta' with no rope_scaling.
    - "dynamic": HF's dynamic NTK: the "ntk" base with factor * L / original - (factor - 1) for
      a sequence of L > original positions, computed per forward from the length the model's
      forward sees (with a KV cache: cached keys keep their rotation, as in HF). An inference
      scheme: a later pipeline stage under sequence parallelism sees a slice, not L.
    - "yarn": YaRN (Peng et al., 2023): per-frequency blend of interpolation and extrapolation
      between beta_fast and beta_slow rotations, cos/sin scaled by the attention factor
      (None: 0.1 * ln(factor) + 1, or the mscale / mscale_all_dim ratio, as DeepSeek writes it).
    - "llama3": Llama 3.1 frequency scaling: long wavelengths / factor, short ones kept, a
      smooth blend between original / low_freq_factor and original / high_freq_factor.

    `original_max_seq_len` (HF `original_max_position_embeddings`; for "dynamic", HF
    `max_position_embeddings`): the context length the model was trained at; None = model.max_seq_len.
    """

    type: RopeScalingType = "none"
    factor: float = 1.0
    original_max_seq_len: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn
    mscale: float = 0.0  # yarn (0: unused)
    mscale_all_dim: float = 0.0  # yarn (0: unused)
    truncate: bool = True  # yarn: round the correction range outwards to whole dimensions (HF default)

    def validate(self, section: str = "model.rope_scaling") -> None:
        if self.type == "none":
            return
        require(math.isfinite(self.factor) and self.factor >= 1.0, f"{section}.factor", self.factor,
                f"must be >= 1 with type = {self.type!r} (the context extension factor)")
        if self.original_max_seq_len is not None:
            require(self.original_max_seq_len > 0, f"{section}.original_max_seq_len", self.original_max_seq_len,
                    "must be > 0 (None = model.max_seq_len)")
        if self.type == "llama3":
            require(self.low_freq_factor > 0, f"{section}.low_freq_factor", self.low_freq_factor, "must be > 0")
            require(self.high_freq_factor > self.low_freq_factor, f"{section}.high_freq_factor",
                    self.high_freq_factor, f"must be > low_freq_factor ({self.low_freq_factor})")
        if self.type == "yarn":
            require(self.beta_slow > 0, f"{section}.beta_slow", self.beta_slow, "must be > 0")
            require(self.beta_fast > self.beta_slow, f"{section}.beta_fast", self.beta_fast,
                    f"must be > beta_slow ({self.beta_slow})")
            if self.attention_factor is not None:
                require(self.attention_factor > 0, f"{section}.attention_factor", self.attention_factor,
                        "must be > 0 (None = from factor and mscale)")
            for n in ("mscale", "mscale_all_dim"):
                require(getattr(self, n) >= 0, f"{section}.{n}", getattr(self, n), "must be >= 0 (0 = unused)")

    def original_length(self, max_seq_len: int) -> int:
        """The trained context length the scaling extends (`original_max_seq_len` or max_seq_len)."""
        return self.original_max_seq_len if self.original_max_seq_len is not None else max_seq_len


ATTENTION_KINDS = ("full", "window", "topk")


@dataclass
class AttentionConfig:
    """Attention variant per layer (issue 13; lmforge/models/common/sparse_attention.py).

    `layers`: kinds cycled over the blocks (layer i gets layers[i % len(layers)]), e.g.
    ["window", "full"] alternates local and global. "full": causal. "window": a query attends to
    itself and the window - 1 previous tokens (the one convention everywhere: kernels, masks,
    FLOPs, KV cache). "topk": the local window plus the query's own block plus the `topk`
    highest-scoring distant key blocks of `block_size` tokens. `doc_mask`: packed training
    sequences are cut into documents at the end-of-text id; a query sees only its own document
    (combines with every kind; no effect on generation, whose prompt is one document).
    `backend`: "auto" (flex_attention on CUDA, the blocked SDPA kernel elsewhere), "blocked",
    "flex", or "dense" (the materialised-mask reference, O(n^2): tests only).
    """

    layers: list[str] = field(default_factory=lambda: ["full"])
    window: int = 256
    topk: int = 4
    block_size: int = 64
    doc_mask: bool = True
    backend: Literal["auto", "blocked", "flex", "dense"] = "auto"

    def kind(self, layer: int) -> str:
        return self.layers[layer % len(self.layers)]

    def validate(self, section: str = "model.attention") -> None:
        require(len(self.layers) > 0 and all(k in ATTENTION_KINDS for k in self.layers), f"{section}.layers",
                self.layers, f"must be a non-empty list of {ATTENTION_KINDS}")
        require(self.window >= 1, f"{section}.window", self.window, "must be >= 1 (1: each token sees itself)")
        require(self.topk >= 0, f"{section}.topk", self.topk, "must be >= 0 distant blocks")
        require(self.block_size >= 1, f"{section}.block_size", self.block_size, "must be >= 1")
        require(self.backend in ("auto", "blocked", "flex", "dense"), f"{section}.backend", self.backend,
                "must be 'auto', 'blocked', 'flex' or 'dense'")


@dataclass
class EarlyExitConfig:
    """Adaptive depth (issue 17): exits after some blocks, LayerSkip-style (Elhoushi et al., 2024).

    `layers`: exit after this many blocks (1 .. n_layers - 1), e.g. [2] on a 4-block model reads
    the next-token distribution after blocks 0 and 1. Every exit shares the final norm and the LM
    head (no parameters of its own), so a checkpoint without exits loads unchanged and the head's
    cost is paid once per exit checked. Training adds `loss_weight` x each exit's cross-entropy
    to the loss (lmforge/train/exit_loss.py); inference stops at the first exit whose confidence
    passes a threshold (lmforge/serve/early_exit.py), or drafts from the first exit for
    self-speculative decoding (lmforge/serve/speculative.py). Empty `layers`: no exits.
    """

    layers: list[int] = field(default_factory=list)
    loss_weight: float = 0.5

    def validate(self, n_layers: int, section: str = "model.early_exit") -> None:
        require(all(isinstance(k, int) and 1 <= k < n_layers for k in self.layers), f"{section}.layers", self.layers,
                f"each exit must be after 1 .. {n_layers - 1} blocks (model.n_layers = {n_layers}: the last "
                "block is the full model)")
        require(self.layers == sorted(set(self.layers)), f"{section}.layers", self.layers,
                "must be distinct and increasing")
        require(0 <= self.loss_weight <= 10, f"{section}.loss_weight", self.loss_weight,
                "must be in [0, 10] (0: exits not trained)")


@dataclass
class ModelConfig:
    """Llama-style decoder. `ffn_hidden=None` derives the SwiGLU width like Llama (8/3·dim, rounded)."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int = 8192
    ffn_hidden: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # long context (issue 13)
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    qkv_bias: bool = False  # bias on the q/k/v projections (Qwen2 family)
    moe: MoEConfig = field(default_factory=MoEConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)  # variant per layer (issue 13)
    family: str = "llama"  # the model family (lmforge/models/registry.py: FAMILIES)
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)  # adaptive depth (issue 17)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` has a Mixture-of-Experts feed-forward (see MoEConfig)."""
        m = self.moe
        return (m.n_experts > 0 and layer >= m.first_k_dense and (layer - m.first_k_dense) % m.layer_interval == 0
                and layer not in m.dense_layers)

    @property
    def expert_hidden_size(self) -> int:
        return self.moe.expert_hidden if self.moe.expert_hidden is not None else self.ffn_hidden_size

    def moe_ffn_params(self) -> dict[str, int]:
        """Parameters of one MoE feed-forward: all of them, and those one token uses on average
        (router, routed experts, shared experts and their gate). Token choice uses top_k routed
        experts (dropless exact; an upper bound when it drops); expert choice gives each token
        capacity_factor * top_k on average (E experts x cf * T * k / E tokens each). The one
        count behind `lmforge sizes` and the FLOPs/MFU of lmforge.observability.flops."""
        m, d, f = self.moe, self.dim, self.expert_hidden_size
        router = d * m.n_experts
        shared = 3 * d * f * m.n_shared_experts + (d if m.shared_expert_gate else 0)
        routed = m.capacity_factor * m.top_k if m.router == "expert_choice" else m.top_k
        return {"total": router + 3 * d * f * m.n_experts + shared, "active": round(router + routed * 3 * d * f + shared)}

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def validate(self, section: str = "model") -> None:
        require(isinstance(self.family, str) and self.family.strip() != "", f"{section}.family", self.family,
                "must name a model family, e.g. 'llama'")
        require_positive(section, self, "dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len")
        require_positive(section, self, "norm_eps", "rope_theta", "init_std")
        # Beyond these the model is dead or NaN from step one (RMSNorm divides by sqrt(ms + eps)).
        require(self.norm_eps <= 0.1, f"{section}.norm_eps", self.norm_eps, "must be in (0, 0.1] (typical 1e-5 or 1e-6)")
        require(self.init_std <= 1.0, f"{section}.init_std", self.init_std, "must be in (0, 1] (typical 0.02)")
        require(self.dim % self.n_heads == 0, f"{section}.n_heads", self.n_heads,
                f"must divide {section}.dim ({self.dim})")
        require(self.head_dim % 2 == 0, f"{section}.n_heads", self.n_heads,
                f"must leave an even head dim for RoPE ({section}.dim / n_heads = {self.head_dim})")
        if self.n_kv_heads is not None:
            require(self.n_kv_heads > 0, f"{section}.n_kv_heads", self.n_kv_heads, "must be > 0")
            require(self.n_heads % self.n_kv_heads == 0, f"{section}.n_kv_heads", self.n_kv_heads,
                    f"must divide {section}.n_heads ({self.n_heads})")
        if self.ffn_hidden is not None:
            require(self.ffn_hidden > 0, f"{section}.ffn_hidden", self.ffn_hidden, "must be > 0")
        if self.ffn_dim_multiplier is not None:
            require(self.ffn_dim_multiplier > 0, f"{section}.ffn_dim_multiplier", self.ffn_dim_multiplier,
                    "must be > 0")
        self.rope_scaling.validate(f"{section}.rope_scaling")
        require(self.head_dim > 2 or self.rope_scaling.type not in ("ntk", "dynamic"), f"{section}.rope_scaling.type",
                self.rope_scaling.type, "needs a head dim > 2 (NTK scales the base by factor^(d / (d - 2)))")
        self.moe.validate(f"{section}.moe")
        self.attention.validate(f"{section}.attention")
        self.early_exit.validate(self.n_layers, f"{section}.early_exit")
        if self.moe.n_experts:
            require(self.moe.first_k_dense < self.n_layers, f"{section}.moe.first_k_dense", self.moe.first_k_dense,
                    f"must be < {section}.n_layers ({self.n_layers}) or no layer is MoE")
            require(all(i < self.n_layers for i in self.moe.dense_layers), f"{section}.moe.dense_layers",
                    self.moe.dense_layers, f"must be layer indices < {section}.n_layers ({self.n_layers})")
            require(any(self.is_moe_layer(i) for i in range(self.n_layers)), f"{section}.moe.dense_layers",
                    self.moe.dense_layers, "leaves no MoE layer; set n_experts = 0 for a dense model")

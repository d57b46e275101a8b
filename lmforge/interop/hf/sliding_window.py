"""Sliding-window attention <-> Hugging Face config.json: Mistral `sliding_window` (every layer)
and Qwen2 `use_sliding_window` + `sliding_window` + `max_window_layers` (layers >= it) or
`layer_types`. A model's windows are a list with one entry per layer: 0 = full causal
attention, w > 0 = a query attends to itself and the w - 1 previous tokens (lmforge's one
convention).

HF's convention is the same number: transformers 5.x `masking_utils.py:
sliding_window_overlay(w)` keeps key kv for query q when `kv > q - w` (with the causal
`kv <= q`: q - w < kv <= q, w keys), and `modeling_flash_attention_utils.py` passes flash
attention `window_size = (w - 1, w - 1)` (w - 1 to the left plus the query). So the number
carries over unchanged; `hf_window_to_ours` / `our_window_to_hf` are the one place to change if
either side moves (older transformers disagreed with itself by one between its sdpa/eager masks
and flash attention: huggingface/transformers#29623, #39408); tests/unit/test_hf_sliding_window.py
pins HF's mask against the definition above.

Where our model keeps its windows is `model_layer_windows` / `with_layer_windows`: in
`model.attention` (per-layer kinds "window" / "full" cycled, one `window`), so a windowed model
imports at its own max_seq_len with its windows where HF has them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lmforge.config import ModelConfig
from lmforge.interop.hf.base import HFFormatError


def hf_window_to_ours(w: int | None) -> int:
    """HF `sliding_window` (None: none) -> our window (0: full). Same convention, same number."""
    if w is None:
        return 0
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise HFFormatError(f"config.json: sliding_window = {w!r}: must be null or an integer >= 1")
    return w


def our_window_to_hf(w: int) -> int | None:
    """Our window (0: full) -> HF `sliding_window` (None: none)."""
    return w if w > 0 else None


def hf_layer_windows(d: Mapping[str, Any], n_layers: int) -> list[int]:
    """Per-layer windows (ours) of a Mistral or Qwen2 config.json dict. Qwen2: only with
    use_sliding_window, on the layers `layer_types` names "sliding_attention" when written (5.x),
    else on the layers >= max_window_layers (as Qwen2Config derives them)."""
    if "use_sliding_window" in d and not d.get("use_sliding_window"):
        return [0] * n_layers
    w = hf_window_to_ours(d.get("sliding_window"))
    if "use_sliding_window" not in d or w == 0:  # Mistral: every layer
        return [w] * n_layers
    types = d.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers or not set(types) <= {
                "full_attention", "sliding_attention"}:
            raise HFFormatError(f"config.json: layer_types = {types!r}: must list 'full_attention' or "
                                f"'sliding_attention' for each of the {n_layers} layers")
        return [w if t == "sliding_attention" else 0 for t in types]
    k = d.get("max_window_layers", n_layers)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise HFFormatError(f"config.json: max_window_layers = {k!r}: must be an integer >= 0")
    return [w if i >= k else 0 for i in range(n_layers)]


def uniform_window(windows: list[int]) -> int | None:
    """The window of every layer when all layers share one (0: all full); else None."""
    return windows[0] if len(set(windows)) == 1 else None


def full_then_window(windows: list[int]) -> tuple[int, int] | None:
    """(max_window_layers, window) when the first layers are full and the rest share one window
    (Qwen2's pattern; all full: (n_layers, 0)); else None."""
    k = next((i for i, w in enumerate(windows) if w), len(windows))
    rest = set(windows[k:])
    return (k, windows[k] if k < len(windows) else 0) if len(rest) <= 1 else None


# -- where our model keeps its windows (adapt here when model.attention lands) -----------------


def model_layer_windows(cfg: ModelConfig) -> list[int]:
    """Per-layer windows of `cfg`: from `model.attention` (kinds "full" / "window" cycled over the
    layers, one `window`) when the model has it; else all full. HFFormatError for a kind HF
    cannot express (top-k)."""
    att = cfg.attention
    kinds = [att.kind(i) for i in range(cfg.n_layers)]
    other = sorted(set(kinds) - {"full", "window"})
    if other:
        raise HFFormatError(f"model.attention.layers has {', '.join(other)}: Hugging Face expresses only "
                            "'full' and 'window' layers")
    return [att.window if k == "window" else 0 for k in kinds]


def with_layer_windows(fields: dict[str, Any], windows: list[int]) -> dict[str, Any]:
    """ModelConfig `fields` that carry per-layer `windows` as `model.attention` (kinds "window"
    and "full", one window size)."""
    if not any(windows):
        return fields
    sizes = {w for w in windows if w}
    if len(sizes) > 1:
        raise HFFormatError(f"config.json: sliding windows {sorted(sizes)}: lmforge has one window size per model")
    att = dataclasses.replace(ModelConfig().attention, layers=["window" if w else "full" for w in windows],
                              window=sizes.pop())
    return {**fields, "attention": att}

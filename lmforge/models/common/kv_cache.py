"""Key/value cache for incremental decoding: one preallocated buffer per layer; sliding-window
layers keep a rolling buffer of their window only (memory O(w), not O(max_len))."""

from __future__ import annotations

import torch


class KVCache:
    """Holds keys and values of shape (batch, slots, kv_heads, head_dim) for every layer.

    `pos` is how many positions are filled; the model advances it after a forward pass.
    `windows[layer]`: None keeps every position (slots = max_len); w keeps the last w positions in
    a ring (slot = position % w): a query sees itself and the w - 1 previous keys, so older keys
    are never read again. `block_q` is scratch of top-k layers (the first query of the current
    block, models/common/attention.py).
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, windows: list[int | None] | None = None):
        windows = windows or [None] * n_layers
        self.ring = [w is not None and w < max_len for w in windows]
        self.size = [min(w, max_len) if r else max_len for w, r in zip(windows, self.ring, strict=True)]
        self.k = [torch.zeros((batch, n, kv_heads, head_dim), dtype=dtype, device=device) for n in self.size]
        self.v = [torch.zeros((batch, n, kv_heads, head_dim), dtype=dtype, device=device) for n in self.size]
        # Ring layers: the position each slot holds (-1: empty).
        self.slot_pos = [torch.full((n,), -1, dtype=torch.long, device=device) if r else None
                         for n, r in zip(self.size, self.ring, strict=True)]
        self.block_q: dict[int, tuple[int, torch.Tensor]] = {}
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write k, v at the current position; return the keys and values the new queries may read
        and their positions (None: positions 0 .. end - 1 in order)."""
        s = k.shape[1]
        end = self.pos + s
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        if not self.ring[layer]:
            self.k[layer][:, self.pos:end] = k
            self.v[layer][:, self.pos:end] = v
            return self.k[layer][:, :end], self.v[layer][:, :end], None
        new_pos = torch.arange(self.pos, end, device=k.device)
        keys, values = torch.cat([self.k[layer], k], dim=1), torch.cat([self.v[layer], v], dim=1)
        kpos = torch.cat([self.slot_pos[layer], new_pos])
        m = min(s, self.size[layer])
        slots = new_pos[s - m:] % self.size[layer]
        self.k[layer][:, slots] = k[:, s - m:]
        self.v[layer][:, slots] = v[:, s - m:]
        self.slot_pos[layer][slots] = new_pos[s - m:]
        return keys, values, kpos

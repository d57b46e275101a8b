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

    def advance(self, seq: int) -> None:
        """The model calls this after a forward pass over `seq` new positions."""
        self.pos += seq


class SlotKVCache:
    """Continuous batching (lmforge/serve/server/engine.py): `slots` independent sequences, each
    with its own length, in one preallocated buffer per layer of shape (slots, max_len, kv_heads,
    head_dim). Why not KVCache: there one batch shares one position, so a request could neither
    join a running batch nor leave it.

    Before each forward the engine `bind`s the slots it runs (`rows`) and how many new tokens each
    gets (the same count for all rows of one forward); the attention layers `update` and read
    through it, and the model's `advance` adds the new tokens to those slots' lengths. Positions
    past a slot's length hold stale keys of an earlier sequence: the mask never lets a query read
    a key after its own position, so they are never seen.
    """

    def __init__(self, n_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.k = [torch.zeros((slots, max_len, kv_heads, head_dim), dtype=dtype, device=device)
                  for _ in range(n_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.slots, self.max_len, self.device = slots, max_len, torch.device(device)
        self.lens = [0] * slots
        self.rows: list[int] = []
        self.positions = torch.zeros((0, 0), dtype=torch.long, device=device)
        self._span: slice | None = None  # rows as one contiguous range: keys read as a view, no copy
        self._rows_t = torch.zeros(0, dtype=torch.long, device=device)
        self._key_len = 0
        self.kpos = torch.zeros(0, dtype=torch.long, device=device)
        self.mask = torch.zeros((0, 1, 0, 0), dtype=torch.bool, device=device)

    def bind(self, rows: list[int], seq: int) -> None:
        """The next forward runs `seq` new tokens for each slot in `rows` (in that order)."""
        if not rows or seq < 1:
            raise ValueError(f"bind: need rows and seq >= 1 (got {len(rows)} rows, seq {seq})")
        if len(set(rows)) != len(rows) or min(rows) < 0 or max(rows) >= self.slots:
            raise ValueError(f"bind: rows {rows} must be distinct slots in [0, {self.slots})")
        ends = [self.lens[r] + seq for r in rows]
        if max(ends) > self.max_len:
            raise ValueError(f"KV cache overflow: {max(ends)} positions > max_len {self.max_len}")
        self.rows = list(rows)
        starts = torch.tensor([self.lens[r] for r in rows], dtype=torch.long, device=self.device)
        self.positions = starts[:, None] + torch.arange(seq, device=self.device)[None, :]
        self._rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        self._span = slice(rows[0], rows[0] + len(rows)) if contiguous else None
        self._key_len = max(ends)
        kpos = torch.arange(self._key_len, device=self.device)
        self.kpos = kpos
        self.mask = kpos[None, None, None, :] <= self.positions[:, None, :, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v (rows, seq, kv_heads, head_dim) at the bound positions; return the keys and
        values the queries may read, (rows, L, ...), and the key positions each query may attend
        as a bool mask (rows, 1, seq, L): causal, up to its own position."""
        rows = self._rows_t[:, None]
        self.k[layer][rows, self.positions] = k
        self.v[layer][rows, self.positions] = v
        n = self._key_len
        if self._span is not None:
            keys, values = self.k[layer][self._span, :n], self.v[layer][self._span, :n]
        else:
            keys, values = self.k[layer][self._rows_t, :n], self.v[layer][self._rows_t, :n]
        return keys, values, self.mask

    def advance(self, seq: int) -> None:
        """The model calls this after a forward pass: the bound slots grew by `seq` tokens."""
        for r in self.rows:
            self.lens[r] += seq

    def free(self, slot: int) -> None:
        """The slot's sequence left (finished, cancelled, dropped): the slot starts over empty."""
        self.lens[slot] = 0

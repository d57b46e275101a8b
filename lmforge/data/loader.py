"""Training loader: a stateful, resumable, data-parallel-aware reader of packed token shards.

Samples are windows of `seq_len + 1` tokens taken with stride `seq_len` over a split's token
stream (inputs = w[:-1], targets = w[1:]). All ranks read one infinite *global* stream of window
indices: position p is window `perm_e[p % n_windows]` of epoch `e = p // n_windows`, where `perm_e`
is a permutation seeded by (seed, e) (identity when not shuffling). Each call takes the next
`micro_batch_size * dp_world` positions; rank r gets its slice of them. Hence the set of samples
per global batch does not depend on how it is split over ranks and micro-batches, and the whole
state is one integer in global-stream units: a run resumes exactly, also on another number of
ranks.

A sample's stable id is its global stream position (the window index is `window_indices(pos)`);
`last_positions` holds this rank's positions of the last batch, for tracing. `skip_range(start,
end)` marks global positions never to be served (a stability rollback skips the batches that made
the loss spike); the ranges are part of the state.

Uneven splits (load balancing, lmforge.train.load_balance): `set_split(counts)` gives rank r
`counts[r]` of each call's `micro_batch_size * dp_world` positions (consecutive, rank after rank),
so a slower rank gets fewer samples while the global stream and the samples of each global batch
stay those of the equal split. The split is part of the state when `balanced` (a resume continues
with the same split; a resume on another number of ranks starts equal again).

While the caller trains on one batch, the next is read on a background thread (`prefetch`); the
state stays the consumed position, so checkpoints and resumes are exact as without it.

A split stored as erasure pieces (lmforge.data.erasure) is read through its decoder: pieces are
checked against their sha256 (re-hashed when size or mtime changed, as every pack file is), up to
m missing or corrupt ones are rebuilt in memory with one warning line, so the tokens are exactly
those of the plain pack. The loader never writes: `lmforge data verify --repair` rewrites pieces.

Domain mixing (a pack whose train split records domains: contiguous token ranges, pack.py): with a
`DomainSchedule` (lmforge.data.mixing) position p belongs to a domain and is that domain's k-th
window (a pure function of p, so the state is still the one position); the domain's windows
(stride seq_len inside its own range, never crossing into another domain) are read in a
permutation seeded by (seed, domain, domain epoch), domain by domain epochs. Window ids are then
numbered domain after domain (`domain_of` gives a window's domain).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from lmforge.data.erasure import ErasureReader, TypedView, describe_bad
from lmforge.data.errors import DataError
from lmforge.data.files import read_json
from lmforge.data.mixing import DomainSchedule
from lmforge.data.verify import erasure_of, verify_pack

STATE_VERSION = 2  # 2: adds "skip" (v1 states load with no skip ranges)
log = logging.getLogger(__name__)


class TokenDataset:
    """Read-only memory map of one split (`train` or `val`) of a packed data dir."""

    def __init__(self, dir: Path | str, split: str):
        self.dir = Path(dir)
        if split not in ("train", "val"):
            raise DataError(f"split = {split!r}: must be 'train' or 'val'")
        self.split = split
        manifest_path = self.dir / "manifest.json"
        m = read_json(manifest_path)
        if m is None:
            raise DataError(f"{self.dir} is not a packed data dir (no readable manifest.json); "
                            "run `lmforge data prepare` for it")
        try:
            info = m["splits"][split]
            self.dtype = np.dtype(m["dtype"])
            self.n_tokens = int(info["tokens"])
            self.n_documents = int(info["documents"])
            self.vocab_size = int(m["vocab_size"])
            self.eos_id = int(m["eos_id"])
            path = self.dir / info["file"]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{manifest_path}: malformed manifest ({e.__class__.__name__}: {e}); "
                            "rerun `lmforge data prepare`") from None
        pieced = erasure_of(m, split) is not None
        if not pieced and not path.is_file():
            raise DataError(f"{path} is missing although {manifest_path} lists it; rerun `lmforge data prepare`")
        size, want = (0 if pieced else path.stat().st_size), self.n_tokens * self.dtype.itemsize
        if not pieced and size != want:
            raise DataError(f"{path} has {size} bytes but {manifest_path} says {self.n_tokens} tokens of "
                            f"{self.dtype.name} ({want} bytes); rerun `lmforge data prepare`")
        # size + mtime; sha256 when they changed. Erasure pieces are checked by their reader below.
        problems = verify_pack(self.dir, m, splits=(split,), pieces="skip")
        if problems:
            raise DataError(f"{problems[0]}; rerun `lmforge data prepare` to repack, or `lmforge data verify "
                            f"{self.dir}` for a full check")
        self.path = path
        # name -> (first token, tokens) of each domain's contiguous range, in pack order (empty: no domains)
        self.domains: dict[str, tuple[int, int]] = {
            str(d["name"]): (int(d["start"]), int(d["tokens"])) for d in info.get("domains", [])}
        self.tokens: np.ndarray | TypedView
        if pieced:
            self.tokens = self._open_pieces(m["files"], want)
        else:
            self.tokens = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.n_tokens,)) \
                if self.n_tokens else np.zeros(0, dtype=self.dtype)

    def _open_pieces(self, known: dict, want: int) -> TypedView:
        """The split decoded from its erasure pieces; bad ones (at most m) rebuilt in memory, logged once."""
        reader = ErasureReader(self.path, known)  # DataError when more than m pieces are bad
        if len(reader) != want:
            raise DataError(f"{self.path}: its pieces hold {len(reader)} bytes but the manifest says {self.n_tokens} "
                            f"tokens of {self.dtype.name} ({want} bytes); rerun `lmforge data prepare`")
        if reader.bad:
            log.warning(f"data: {self.split} split: {describe_bad(self.path, reader.bad)}; the split is rebuilt "
                        f"in memory from the other {reader.layout.n - len(reader.bad)} erasure pieces (nothing "
                        f"written; `lmforge data verify --repair {self.dir}` rewrites them)")
        return reader.view(self.dtype)

    def __len__(self) -> int:
        return self.n_tokens

    def n_windows(self, seq_len: int) -> int:
        return max(0, (self.n_tokens - 1) // seq_len)

    def window(self, index: int, seq_len: int) -> np.ndarray:
        """Tokens [index*seq_len, index*seq_len + seq_len + 1) as int64."""
        return self.window_at(index * seq_len, seq_len)

    def window_at(self, start: int, seq_len: int) -> np.ndarray:
        """Tokens [start, start + seq_len + 1) as int64."""
        return np.asarray(self.tokens[start:start + seq_len + 1], dtype=np.int64)


class DistributedTokenLoader:
    """This rank's micro-batches from the global window stream; see the module docstring.

    `shuffle=False` (validation) reads windows in order; `reset()` returns to the start, so
    evaluating "the first N batches" sees the same batches every time.
    """

    def __init__(self, dataset: TokenDataset, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_world: int = 1, seed: int = 0, shuffle: bool = True, prefetch: bool = True,
                 mixing: DomainSchedule | None = None, mixing_key: str = "", balanced: bool = False):
        if seq_len < 1 or micro_batch_size < 1:
            raise DataError(f"seq_len = {seq_len}, micro_batch_size = {micro_batch_size}: both must be >= 1")
        if not 0 <= dp_rank < dp_world:
            raise DataError(f"dp_rank = {dp_rank}: must be in [0, dp_world = {dp_world})")
        self.dataset = dataset
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.seed, self.shuffle = seed, shuffle
        self.n_windows = dataset.n_windows(seq_len)
        self.mixing, self.mixing_key = mixing, mixing_key
        if mixing is not None:
            self._init_mixing(mixing)
        if self.n_windows < 1:
            raise DataError(f"{dataset.path}: the {dataset.split} split has {dataset.n_tokens} tokens, too few "
                            f"for one window of seq_len + 1 = {seq_len + 1}; lower train.seq_len or add data")
        self.position = 0  # global stream position of the next global batch
        self._perm_cache: dict[int, np.ndarray] = {}
        self.skips: list[tuple[int, int]] = []  # [start, end) global positions never served
        self.balanced = balanced  # the split is saved in the state
        self.split: tuple[int, ...] | None = None  # samples per dp rank of each call (None: equal)
        self.last_positions = np.zeros(0, dtype=np.int64)  # this rank's positions in the last batch
        self.last_windows = np.zeros(0, dtype=np.int64)  # and their window indices
        # One reader thread per loader: the next batch is read while the step runs (next_batch).
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lmforge-loader") if prefetch else None
        self._pending: tuple[tuple, Future] | None = None  # ((position, skips) it was read for, result)

    def _init_mixing(self, mixing: DomainSchedule) -> None:
        """Per-domain windows (inside each domain's token range) numbered domain after domain."""
        ranges = list(self.dataset.domains.values())
        if len(ranges) != mixing.n:
            raise DataError(f"{self.dataset.dir}: the {self.dataset.split} split has {len(ranges)} domains, the "
                            f"mixing weights name {mixing.n}; repack or fix data.domain_weights")
        self._dom_start = np.array([s for s, _ in ranges], dtype=np.int64)
        self._dom_windows = np.array([max(0, (n - 1) // self.seq_len) for _, n in ranges], dtype=np.int64)
        self._dom_first = np.concatenate([[0], np.cumsum(self._dom_windows)]).astype(np.int64)
        self.n_windows = int(self._dom_first[-1])
        live = np.maximum(mixing.start, mixing.end) > 0
        empty = [name for name, w, on in zip(self.dataset.domains, self._dom_windows, live) if on and w < 1]
        if empty:
            raise DataError(f"{self.dataset.dir}: domain {empty[0]} has a weight but too few tokens for one window "
                            f"of seq_len + 1 = {self.seq_len + 1}; give it weight 0 or lower train.seq_len")
        self._dom_perm: dict[int, tuple[int, np.ndarray]] = {}

    def domain_of(self, windows: np.ndarray) -> np.ndarray:
        """The domain index (pack order) of each window id (mixing only)."""
        return np.searchsorted(self._dom_first, np.asarray(windows, dtype=np.int64), side="right") - 1

    def _mixed_indices(self, pos: np.ndarray) -> np.ndarray:
        assert self.mixing is not None
        dom, k = self.mixing.locate(pos)
        out = np.empty(len(pos), dtype=np.int64)
        for d in np.unique(dom):
            sel = dom == d
            n = int(self._dom_windows[d])
            epochs, offsets = k[sel] // n, k[sel] % n
            local = offsets.copy()
            if self.shuffle:
                for e in np.unique(epochs):
                    here = epochs == e
                    local[here] = self._domain_perm(int(d), int(e))[offsets[here]]
            out[sel] = self._dom_first[d] + local
        return out

    def _domain_perm(self, d: int, epoch: int) -> np.ndarray:
        hit = self._dom_perm.get(d)
        if hit is None or hit[0] != epoch:
            hit = self._dom_perm[d] = (epoch, np.random.default_rng([self.seed, 1 + d, epoch]).permutation(
                int(self._dom_windows[d])))
        return hit[1]

    def _token_start(self, window: int) -> int:
        if self.mixing is None:
            return window * self.seq_len
        d = int(self.domain_of(np.array([window]))[0])
        return int(self._dom_start[d] + (window - self._dom_first[d]) * self.seq_len)

    # -- the global stream -----------------------------------------------------------------------

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_cache = {epoch: perm}  # batches move forward: one epoch is enough to keep
        return perm

    def window_indices(self, start: int, count: int) -> np.ndarray:
        """Window indices at global positions [start, start + count)."""
        pos = np.arange(start, start + count, dtype=np.int64)
        if self.mixing is not None:
            return self._mixed_indices(pos)
        if not self.shuffle:
            return pos % self.n_windows
        epochs, offsets = pos // self.n_windows, pos % self.n_windows
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out

    @property
    def epoch(self) -> int:
        return self.position // self.n_windows

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_world

    @property
    def local_batch_size(self) -> int:
        """This rank's samples per call: its share of the split, or micro_batch_size."""
        return self.split[self.dp_rank] if self.split is not None else self.micro_batch_size

    def set_split(self, counts: list[int] | tuple[int, ...] | None) -> None:
        """Samples per dp rank of each call (>= 1 each, summing to micro_batch_size x dp_world);
        None: equal. Takes effect at the next batch (a batch read ahead for the old split is dropped)."""
        if counts is not None:
            counts = tuple(int(c) for c in counts)
            if len(counts) != self.dp_world or min(counts) < 1 or sum(counts) != self.global_batch_size:
                raise DataError(f"split {list(counts)}: needs {self.dp_world} counts >= 1 summing to "
                                f"{self.global_batch_size} (micro_batch_size x dp_world)")
            if len(set(counts)) == 1:
                counts = None
        self.split = counts

    # -- batches -----------------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 tensors of shape (micro_batch_size, seq_len), for this rank.

        With `prefetch`, the batch after this one is read on a background thread while the caller
        trains on this one. The state (`position`, `state_dict`) always counts consumed batches
        only; a prefetched batch is used only if it was read for exactly the current position and
        skip ranges (a reset, a resume or a new skip range discards it)."""
        key = (self.position, tuple(self.skips), self.split)
        batch = None
        if self._pending is not None:
            pending_key, future = self._pending
            self._pending = None
            batch = future.result() if pending_key == key else None
        if batch is None:
            batch = self._read(*key)
        start, idx, tokens, self.position = batch
        self.last_positions = np.arange(start, start + len(idx), dtype=np.int64)
        self.last_windows = idx
        if self._executor is not None:
            nxt = (self.position, tuple(self.skips), self.split)
            self._pending = (nxt, self._executor.submit(self._read, *nxt))
        return tokens[:, :-1], tokens[:, 1:]

    def _read(self, position: int, skips: tuple[tuple[int, int], ...], split: tuple[int, ...] | None = None
              ) -> tuple[int, np.ndarray, torch.Tensor, int]:
        """The batch served at global `position` given `skips` and `split`, without touching the
        loader's state: (this rank's first position, window indices, tokens (m, seq_len + 1), next
        global position)."""
        position = self._after_skips(position, skips)
        if split is None:
            m, start = self.micro_batch_size, position + self.dp_rank * self.micro_batch_size
        else:
            m, start = split[self.dp_rank], position + sum(split[:self.dp_rank])
        idx = self.window_indices(start, m)
        windows = np.stack([self.dataset.window_at(self._token_start(int(i)), self.seq_len) for i in idx])
        if windows.size and windows.max() >= self.dataset.vocab_size:  # else an IndexError in the embedding
            raise DataError(f"{self.dataset.path}: token id {windows.max()} in window {idx[np.argmax(windows.max(1))]} "
                            f"is outside the vocabulary ({self.dataset.vocab_size} ids); run `lmforge data verify "
                            f"{self.dataset.dir}` and repack")
        return start, idx, torch.from_numpy(windows), position + self.global_batch_size

    @staticmethod
    def _after_skips(position: int, skips: tuple[tuple[int, int], ...]) -> int:
        moved = True
        while moved:
            moved = False
            for lo, hi in skips:
                if lo <= position < hi:
                    position, moved = hi, True
        return position

    def close(self) -> None:
        """Stop the prefetch thread (a pending read is waited for and dropped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor, self._pending = None, None

    def skip_range(self, start: int, end: int) -> None:
        """Never serve global positions [start, end) (whole global batches: a skipped step's data)."""
        if not 0 <= start < end:
            raise DataError(f"skip range [{start}, {end}): must satisfy 0 <= start < end")
        self.skips.append((int(start), int(end)))

    def reset(self) -> None:
        """Back to the start of the stream (epoch 0, position 0)."""
        self.position = 0

    def batches(self, n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first `n` batches of the stream, from the start (resets first)."""
        self.reset()
        for _ in range(n):
            yield self.next_batch()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless batches from the current position (the stream wraps into new epochs)."""
        while True:
            yield self.next_batch()

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int | str]:
        """Plain values, identical on every rank (nothing rank- or split-shape-specific); the skip
        ranges as one string "start:end,..." (a string keeps DCP from flattening a list whose
        length differs between save and load)."""
        sd: dict[str, int | str] = {
            "version": STATE_VERSION, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
            "n_windows": self.n_windows, "shuffle": int(self.shuffle),
            "skip": ",".join(f"{lo}:{hi}" for lo, hi in self.skips)}
        if self.mixing is not None:  # only with mixing: states of unmixed runs keep their keys
            sd["mixing"] = self.mixing_key
        if self.balanced:  # only with load balancing, for the same reason
            sd["split"] = ",".join(str(c) for c in self.split) if self.split is not None else ""
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Continue at the saved global position. dp_world and micro_batch_size may differ from the
        saving run; seq_len, seed, shuffle and the data (number of windows) must not."""
        try:
            saved = {k: int(sd[k]) for k in ("position", "seed", "seq_len", "n_windows", "shuffle")}
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data loader state is malformed ({e.__class__.__name__}: {e}); the checkpoint "
                            "was not written by this loader") from None
        mine = self.state_dict()
        why = {"seq_len": "train.seq_len", "seed": "data.seed", "shuffle": "shuffle mode",
               "n_windows": f"data in {self.dataset.dir} (windows of seq_len {self.seq_len})"}
        for key, what in why.items():
            if saved[key] != mine[key]:
                raise DataError(f"cannot resume the data loader: checkpoint has {key} = {saved[key]} but this run "
                                f"has {mine[key]}; keep {what} as in the saved run to resume exactly")
        if self.mixing is not None and str(sd.get("mixing", "")) != self.mixing_key:
            raise DataError(f"cannot resume the data loader: checkpoint has domain mixing {sd.get('mixing', '')!r} "
                            f"but this run has {self.mixing_key!r}; keep the data.domain_weights / "
                            "mixing_temperature / curriculum of the saved run to resume exactly")
        if saved["position"] < 0:
            raise DataError(f"data loader state has position {saved['position']}: must be >= 0")
        try:
            skips = [tuple(int(v) for v in r.split(":")) for r in str(sd.get("skip", "")).split(",") if r]
            if any(len(r) != 2 or not 0 <= r[0] < r[1] for r in skips):
                raise ValueError("bad range")
        except ValueError:
            raise DataError(f"data loader state has malformed skip ranges {sd.get('skip')!r}") from None
        self.position = saved["position"]
        self.skips = [(lo, hi) for lo, hi in skips]
        self._load_split(str(sd.get("split", "")))

    def _load_split(self, text: str) -> None:
        """The saved split when it fits this run (same ranks and batch), else the equal split."""
        try:
            counts = tuple(int(c) for c in text.split(",")) if text else None
        except ValueError:
            raise DataError(f"data loader state has a malformed split {text!r}") from None
        fits = counts is not None and len(counts) == self.dp_world and sum(counts) == self.global_batch_size
        if counts is not None and not fits:
            log.info("data loader: saved split %s does not fit %d ranks x %d samples; starting equal", text,
                     self.dp_world, self.micro_batch_size)
        self.set_split(counts if fits else None)

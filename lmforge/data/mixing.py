"""Domain mixing: the weights each training domain is sampled with, and the exact, seeded,
resumable map from a global stream position to (domain, the domain's k-th window).

Weights: explicit (`data.domain_weights = ["bible:0.4", ...]`, normalised; a domain left out gets
0) or from the domains' train token counts with a temperature, p_d ∝ n_d^(1/T)
(`data.mixing_temperature`: 1 = natural proportions, larger flattens towards uniform). A
curriculum (`data.domain_weights_end`, `data.curriculum_steps`) moves them linearly from the start
weights to the end weights over the first curriculum_steps optimizer steps, then holds them.

The schedule: global positions are cut into blocks of `BLOCK`. Block b gets per-domain quotas from
the weights at its middle position, rounded by largest remainder with the rounding error carried
to the next block, so after any whole number of blocks every domain's count is within one window
of its weights' sum (the share converges at 1/positions, not 1/sqrt). Inside a block the domains
are laid out by a permutation seeded by (seed, b). A position's index within its domain is the
domain's count before its block plus its rank inside the block, so the map is a pure function of
the position: the loader's state stays one integer, ranks share out positions as without mixing,
and a resume serves the identical next batch. Quotas are computed block by block once and cached
(a few microseconds per block).

Replay (continual pre-training: `data.replay_fraction`, `data.replay_domains`): a `ReplaySchedule`
gives every global batch (the `positions_per_step` positions of one optimizer step) exactly its
share of old-domain windows: R(j) = floor(f * B * j + 1/2) replay positions before batch j, so
batch j holds R(j + 1) - R(j) of them (floor or ceil of f * B), at places chosen by a permutation
seeded by (seed, j). Replay positions form one stream over the old domains' weights, the others
one over the main mixture (the new domains); the two have no domain in common, so each domain's
k-th window is served once, and the map is still a pure function of the position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lmforge.config.job import DataConfig
from lmforge.config.loader import ConfigError

__all__ = ["BLOCK", "DomainSchedule", "Mixing", "ReplaySchedule", "build_mixing", "describe_weights", "parse_weights",
           "resolve_weights"]

BLOCK = 256


def parse_weights(entries: list[str], key: str) -> dict[str, float]:
    """["name:weight", ...] -> {name: weight} (weights finite, >= 0, some > 0); ConfigError naming `key`."""
    out: dict[str, float] = {}
    for entry in entries:
        name, sep, value = entry.partition(":")
        name = name.strip()
        try:
            w = float(value)
        except ValueError:
            w = float("nan")
        if not sep or not name or not math.isfinite(w) or w < 0:
            raise ConfigError(key, entry, "each entry must be 'domain:weight' with a finite weight >= 0", None)
        if name in out:
            raise ConfigError(key, entry, f"domain {name!r} is listed twice", None)
        out[name] = w
    if out and sum(out.values()) <= 0:
        raise ConfigError(key, entries, "at least one weight must be > 0", None)
    return out


def _explicit(entries: list[str], key: str, sizes: dict[str, int]) -> dict[str, float]:
    given = parse_weights(entries, key)
    unknown = sorted(set(given) - set(sizes))
    if unknown:
        raise ConfigError(key, entries, f"unknown domain {unknown[0]!r}; the packed data has "
                          + ", ".join(sorted(sizes)), None)
    total = sum(given.values())
    return {d: given.get(d, 0.0) / total for d in sizes}


def resolve_weights(sizes: dict[str, int], weights: list[str], temperature: float,
                    key: str = "data.domain_weights") -> dict[str, float]:
    """Normalised weights for the domains in `sizes` (train tokens per domain, in the pack's order)."""
    if weights:
        return _explicit(weights, key, sizes)
    if temperature <= 0:
        raise ConfigError("data.mixing_temperature", temperature, "must be > 0", None)
    raw = {d: float(n) ** (1.0 / temperature) if n > 0 else 0.0 for d, n in sizes.items()}
    total = sum(raw.values())
    return {d: v / total for d, v in raw.items()}


def describe_weights(weights: dict[str, float]) -> str:
    return ", ".join(f"{d} {w:.2f}" for d, w in weights.items())


class DomainSchedule:
    """Global position -> (domain index, index within the domain); see the module docstring.

    `start` and `end` are weight vectors over the same domains (sum 1); the weights move linearly
    from start to end over positions [0, ramp) (ramp 0: start weights throughout)."""

    def __init__(self, start: np.ndarray, end: np.ndarray | None = None, ramp: int = 0, seed: int = 0):
        self.start = np.asarray(start, dtype=np.float64)
        self.end = self.start if end is None else np.asarray(end, dtype=np.float64)
        if self.start.shape != self.end.shape or self.start.ndim != 1 or not len(self.start):
            raise ValueError("start and end weights must be vectors over the same domains")
        self.ramp, self.seed, self.n = int(ramp), int(seed), len(self.start)
        self._cum = [np.zeros(self.n, dtype=np.int64)]  # domain counts before block b
        self._quota: list[np.ndarray] = []
        self._carry = np.zeros(self.n)
        self._layout_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def weights_at(self, position: int) -> np.ndarray:
        if self.ramp <= 0 or position >= self.ramp:
            return self.end if self.ramp > 0 else self.start
        t = position / self.ramp
        return (1.0 - t) * self.start + t * self.end

    def _extend(self, blocks: int) -> None:
        while len(self._quota) < blocks:
            b = len(self._quota)
            target = self.weights_at(b * BLOCK + BLOCK // 2) * BLOCK + self._carry  # the block's middle
            x = np.maximum(target, 0.0)
            x *= BLOCK / x.sum()
            q = np.floor(x).astype(np.int64)
            left = BLOCK - int(q.sum())
            if left:
                order = np.lexsort((np.arange(self.n), -(x - q)))  # largest remainder, ties by domain
                q[order[:left]] += 1
            self._carry = target - q
            self._quota.append(q)
            self._cum.append(self._cum[-1] + q)

    def _layout(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b: the domain of each of its positions and each one's rank within its domain."""
        hit = self._layout_cache.get(b)
        if hit is None:
            self._extend(b + 1)
            dom = np.repeat(np.arange(self.n), self._quota[b])
            dom = dom[np.random.default_rng([self.seed, 0x6D6978, b]).permutation(BLOCK)]
            rank = np.empty(BLOCK, dtype=np.int64)
            for d in range(self.n):
                sel = dom == d
                rank[sel] = np.arange(int(sel.sum()))
            if len(self._layout_cache) > 64:
                self._layout_cache.clear()
            hit = self._layout_cache[b] = (dom, rank)
        return hit

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(domain index, index within that domain's stream) of each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        dom = np.empty(len(positions), dtype=np.int64)
        k = np.empty(len(positions), dtype=np.int64)
        blocks = positions // BLOCK
        if len(positions):
            self._extend(int(blocks.max()) + 1)
        for b in np.unique(blocks):
            sel = blocks == b
            d_b, r_b = self._layout(int(b))
            off = positions[sel] - b * BLOCK
            dom[sel] = d_b[off]
            k[sel] = self._cum[int(b)][d_b[off]] + r_b[off]
        return dom, k


class ReplaySchedule:
    """Global position -> (domain index, index within the domain) with a fixed fraction of every
    global batch of `batch` positions from the `replay` schedule (see the module docstring). `main`
    and `replay` are DomainSchedules over the same domains whose weights share no domain."""

    def __init__(self, main: DomainSchedule, replay: DomainSchedule, fraction: float, batch: int, seed: int = 0):
        if main.n != replay.n or np.any((np.maximum(main.start, main.end) > 0) & (replay.start > 0)):
            raise ValueError("main and replay weights must be over the same domains and share none")
        if not 0 <= fraction < 1 or batch < 1:
            raise ValueError(f"fraction {fraction} must be in [0, 1) and batch {batch} >= 1")
        self.main, self.replay, self.fraction, self.batch, self.seed = main, replay, fraction, int(batch), int(seed)
        self.n = main.n
        self.start = (1 - fraction) * main.start + fraction * replay.start  # the share of each domain
        self.end = (1 - fraction) * main.end + fraction * replay.end
        self._layout_cache: dict[int, np.ndarray] = {}

    def replay_before(self, batches: np.ndarray | int) -> np.ndarray:
        """R(j): replay positions in the global batches before batch j."""
        return np.floor(self.fraction * self.batch * np.asarray(batches, dtype=np.float64) + 0.5).astype(np.int64)

    def _is_replay(self, j: int) -> np.ndarray:
        """Which offsets of global batch j are replay positions."""
        hit = self._layout_cache.get(j)
        if hit is None:
            count = int(self.replay_before(j + 1) - self.replay_before(j))
            hit = np.zeros(self.batch, dtype=bool)
            hit[np.random.default_rng([self.seed, 0x72706C, j]).permutation(self.batch)[:count]] = True
            if len(self._layout_cache) > 256:
                self._layout_cache.clear()
            self._layout_cache[j] = hit
        return hit

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(domain index, index within that domain's stream) of each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        replay = np.empty(len(positions), dtype=bool)
        stream = np.empty(len(positions), dtype=np.int64)  # index in the replay or in the main stream
        batches = positions // self.batch
        for j in np.unique(batches):
            sel = batches == j
            layout = self._is_replay(int(j))
            before = np.concatenate([[0], np.cumsum(layout)])  # replay offsets before each offset
            off = positions[sel] - j * self.batch
            r_before = int(self.replay_before(j))
            replay[sel] = layout[off]
            stream[sel] = np.where(layout[off], r_before + before[off], j * self.batch - r_before + off - before[off])
        dom = np.empty(len(positions), dtype=np.int64)
        k = np.empty(len(positions), dtype=np.int64)
        for flag, schedule in ((True, self.replay), (False, self.main)):
            sel = replay == flag
            if sel.any():
                dom[sel], k[sel] = schedule.locate(stream[sel])
        return dom, k


@dataclass(frozen=True)
class Mixing:
    """What the training loader samples: the schedule, the resolved weights (domain -> weight, at
    the start and after the curriculum), a one-line description for the run header and config,
    and the key a resumed loader must match."""

    schedule: DomainSchedule | ReplaySchedule
    start: dict[str, float]
    end: dict[str, float]
    description: str
    key: str


def build_mixing(domains: dict[str, tuple[int, int]], cfg: DataConfig, positions_per_step: int) -> Mixing | None:
    """The mixing of a train split with `domains` (name -> (first token, tokens)) under `cfg`
    (None when the split has no domains). ConfigError when the weights name unknown domains."""
    if not domains:
        if cfg.replay_fraction > 0:
            raise ConfigError("data.replay_fraction", cfg.replay_fraction, "needs packed data with domains (replay "
                              "draws from the old domains; this corpus went without the domain step)", None)
        if cfg.domain_weights or cfg.domain_weights_end or cfg.curriculum_steps:
            raise ConfigError("data.domain_weights", cfg.domain_weights or cfg.domain_weights_end,
                              "the packed data has no domains (a corpus without the domain step)", None)
        return None
    sizes = {d: n for d, (_, n) in domains.items()}
    start = resolve_weights(sizes, cfg.domain_weights, cfg.mixing_temperature)
    how = "weights" if cfg.domain_weights else f"temperature {cfg.mixing_temperature:g}"
    end, ramp = start, 0
    if cfg.curriculum_steps:
        end = resolve_weights(sizes, cfg.domain_weights_end, cfg.mixing_temperature, "data.domain_weights_end")
        ramp = cfg.curriculum_steps * positions_per_step
        how += f"; curriculum to {describe_weights(end)} over {cfg.curriculum_steps} steps"
    names = list(domains)
    if cfg.replay_fraction > 0:
        ramp = int(round(cfg.curriculum_steps * positions_per_step * (1 - cfg.replay_fraction)))  # main-stream units
    schedule = DomainSchedule(np.array([start[d] for d in names]), np.array([end[d] for d in names]), ramp, cfg.seed)
    key = ";".join([",".join(f"{d}:{start[d]:.6f}" for d in names), ",".join(f"{d}:{end[d]:.6f}" for d in names),
                    str(ramp)])
    description = f"{describe_weights(start)} ({how})"
    if cfg.replay_fraction <= 0:
        return Mixing(schedule, start, end, description, key)
    old = _replay_weights(sizes, start, end, cfg)
    replay = DomainSchedule(np.array([old[d] for d in names]), seed=cfg.seed + 1)
    both = ReplaySchedule(schedule, replay, cfg.replay_fraction, positions_per_step, cfg.seed)
    how = "weights" if cfg.replay_domains else f"temperature {cfg.mixing_temperature:g}"
    old_live = {d: w for d, w in old.items() if w > 0}
    description += f"; replay {cfg.replay_fraction:.0%} of each batch: {describe_weights(old_live)} ({how})"
    key += f";replay {cfg.replay_fraction!r}:" + ",".join(f"{d}:{old[d]:.6f}" for d in names)
    return Mixing(both, {d: float(w) for d, w in zip(names, both.start)}, {d: float(w) for d, w in zip(names, both.end)},
                  description, key)


def _replay_weights(sizes: dict[str, int], start: dict[str, float], end: dict[str, float],
                    cfg: DataConfig) -> dict[str, float]:
    """The old domains' weights (sum 1): data.replay_domains, or every domain the main mixture
    leaves at 0 by the temperature rule. ConfigError when a replay domain is also in the main mixture."""
    main = {d for d in sizes if start[d] > 0 or end[d] > 0}
    if cfg.replay_domains:
        weights = _explicit(cfg.replay_domains, "data.replay_domains", sizes)
        both = sorted(d for d, w in weights.items() if w > 0 and d in main)
        if both:
            raise ConfigError("data.replay_domains", cfg.replay_domains,
                              f"domain {both[0]!r} is also in the main mixture (data.domain_weights): replay "
                              "draws from the old domains, the main mixture from the new ones; give it weight 0 "
                              "in one of them", None)
        return weights
    rest = {d: n for d, n in sizes.items() if d not in main}
    if not rest:
        raise ConfigError("data.replay_fraction", cfg.replay_fraction,
                          "every domain is in the main mixture, so none is left to replay: set data.domain_weights "
                          "to the new domains (the others at 0) or name the old ones in data.replay_domains", None)
    weights = resolve_weights(rest, [], cfg.mixing_temperature)
    return {d: weights.get(d, 0.0) for d in sizes}

"""Stateful wrappers for what a training checkpoint holds besides caller-owned objects.

DCP (torch.distributed.checkpoint) calls `state_dict()` on every Stateful before a save and
before a load (to get the tensors to load into), then `load_state_dict()` after a load.

- `ModelOptimizerState` goes through `torch.distributed.checkpoint.state_dict`, so one code path
  serves a plain module, DDP (the `module.` prefix is stripped) and FSDP2/DTensor (sharded
  tensors, resharded on load). `CheckpointManager` stores its two halves under the top-level keys
  "model" and "optim", so the model weights can be loaded alone:
  `dcp.load({"model": model.state_dict()}, checkpoint_id=...)`.
- `PerRankState` is for values that differ per rank (RNG streams, a loader's position). DCP
  de-duplicates entries with the same key across ranks and keeps ONE rank's copy, so each rank
  saves under its own key `rank{r}`; see `PerRankState` for the load rule.
"""

from __future__ import annotations

import pickle
import random
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

__all__ = ["ModelOptimizerState", "PerRank", "PerRankState", "RNGState", "Stateful", "rank_key"]


# Optimizer state keyed by parameter FQN throughout, param-group options included. Why: DCP keeps
# ONE rank's copy of a key that several ranks save, and pipeline stages hold different parameters
# in "their" group i, so list-indexed groups ("param_groups.<i>.lr") would give every stage one
# stage's groups. PyTorch's flat layout keys each option by FQN ("param_groups.<fqn>.lr").
OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_GROUP_PREFIX = "param_groups."


def _pack_group_options(flat: dict[str, Any]) -> dict[str, Any]:
    """PyTorch's flat optimizer dict with each parameter's group options as ONE entry
    "param_groups.<fqn>" (pickled {option: value}) instead of one entry per option: DCP stores
    every non-tensor value as its own serialized object (~1.4 KB each), a dozen options per
    parameter. Option names are keyword names (no dots), so the FQN is all before the last dot."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if key.startswith(_GROUP_PREFIX):
            fqn, _, option = key[len(_GROUP_PREFIX):].rpartition(".")
            groups.setdefault(fqn, {})[option] = value
        else:
            out[key] = value
    out.update({_GROUP_PREFIX + fqn: pack(options) for fqn, options in groups.items()})
    return out


def _unpack_group_options(packed: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `_pack_group_options`: PyTorch's flat layout again."""
    out: dict[str, Any] = {}
    for key, value in packed.items():
        if key.startswith(_GROUP_PREFIX):
            out.update({f"{key}.{name}": v for name, v in unpack(value).items()})
        else:
            out[key] = value
    return out


def is_group_options(key: str) -> bool:
    """A packed param-group entry in the manager's flat layout: "optim.param_groups.<fqn>"."""
    return key.startswith("optim." + _GROUP_PREFIX)


def legacy_group_options(stored: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{fqn: group options} from the list-indexed groups of checkpoints written before the groups
    were keyed by FQN (`stored`: {"optim.param_groups.<i>.<option>": value}, "params" included)."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in stored.items():
        index, _, option = key[len("optim." + _GROUP_PREFIX):].partition(".")
        groups.setdefault(index, {})[option] = value
    by_fqn: dict[str, dict[str, Any]] = {}
    for options in groups.values():
        for fqn in options.pop("params", []):
            by_fqn[fqn] = options
    return by_fqn


def merge_group_options(packed: bytes, options: dict[str, Any]) -> bytes:
    """`packed` (this run's options for one parameter) with the saved `options` laid over it:
    an option this PyTorch has and the saved one lacks keeps this run's value."""
    return pack({**unpack(packed), **options})


class ModelOptimizerState:
    """Model and optimizer as one Stateful: {"model": FQN state dict, "optim": optimizer state
    keyed by parameter FQN ("state.<fqn>.exp_avg", ..., "param_groups.<fqn>": that parameter's
    group options)}. Works for nn.Module, DDP, FSDP2 and pipeline stages (each rank saves and
    loads the groups of the parameters it holds)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return {k: part.state_dict() for k, part in self.parts().items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k, part in self.parts().items():
            part.load_state_dict(state_dict[k])

    def parts(self) -> dict[str, Stateful]:
        """The two halves as separate Statefuls (the manager saves them as top-level "model" and
        "optim", so a weights-only load needs no optimizer)."""
        return {"model": _ModelPart(self.model), "optim": _OptimPart(self.model, self.optimizer)}


class _ModelPart:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class _OptimPart:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return _pack_group_options(get_optimizer_state_dict(self.model, self.optimizer, options=OPTIM_OPTIONS))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, _unpack_group_options(state_dict),
                                 options=OPTIM_OPTIONS)


# -- per-rank state --------------------------------------------------------------------------------


def rank_key(rank: int) -> str:
    return f"rank{rank}"


def _default_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pack(obj: Any) -> bytes:
    """One opaque leaf per rank: DCP would otherwise flatten nested values into many keys and
    need same-shaped tensors to load into; a byte string needs no template."""
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(blob: bytes) -> Any:
    return pickle.loads(blob)  # noqa: S301 (our own checkpoint, verified against its manifest)


def choose_rank_key(saved_keys: set[str], rank: int, world_size: int) -> str:
    """This rank's key when the checkpoint was written by the same number of ranks, else rank 0's.

    Why rank 0 on a world-size change: rank r of the new run is a different process with a
    different data shard than rank r of the old one, so "its" old stream does not exist and
    ranks >= the old world size would have none. Giving every rank rank 0's state is a
    deterministic, reproducible choice (a second resume from the same checkpoint with the same
    world size replays identically), at the cost that ranks draw the same random numbers: the
    caller should re-seed per rank after loading if it needs them to differ (e.g. dropout).
    """
    saved_world = sum(1 for k in saved_keys if k.startswith("rank") and k[4:].isdigit())
    key = rank_key(rank)
    if saved_world == world_size and key in saved_keys:
        return key
    if rank_key(0) not in saved_keys:
        raise KeyError(f"no per-rank state for rank {rank} nor rank 0 (saved: {sorted(saved_keys)})")
    return rank_key(0)


class PerRankState(ABC):
    """A Stateful whose value differs per rank. Saved as {"rank{r}": <bytes>} by each rank r (so
    DCP's de-duplication keeps every rank's copy); loaded from this rank's key, or from rank 0's
    when the world size changed (see `choose_rank_key`). `CheckpointManager` passes the rank of
    its process group and reads the saved world size from the checkpoint metadata; used with
    plain `dcp.save`/`dcp.load` it uses the default group and needs the same world size."""

    @abstractmethod
    def local_state_dict(self) -> Any:
        """This rank's state (any picklable value)."""

    @abstractmethod
    def load_local_state_dict(self, state: Any) -> None:
        """Restore this rank's state from what `local_state_dict` returned (maybe another rank's)."""

    def state_dict(self) -> dict[str, Any]:
        rank, _ = _default_rank_world()
        return {rank_key(rank): pack(self.local_state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, world = _default_rank_world()
        self.load_local_state_dict(unpack(state_dict[choose_rank_key(set(state_dict), rank, world)]))


class PerRank(PerRankState):
    """Marks any Stateful (e.g. a data loader whose position differs per rank) as per-rank."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def local_state_dict(self) -> Any:
        return self.inner.state_dict()

    def load_local_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)


class RNGState(PerRankState):
    """Python `random`, numpy's global generator, torch CPU and (if available) all CUDA
    generators of this process. Restoring them makes dropout, sampling and shuffles that use the
    global generators continue exactly where the saved run was."""

    def local_state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_local_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            n = min(len(cuda), torch.cuda.device_count())  # fewer GPUs now: restore those there are
            for i in range(n):
                torch.cuda.set_rng_state(cuda[i], device=i)

"""What DCP (torch.distributed.checkpoint) writes and reads: the caller's state assembled into DCP
keys, the write of one flat state, and loads whatever the stored form (lossy moments,
incremental references, zstd, older layouts).

DCP keys (top level; nested keys are joined with "."):

    model.<fqn>        the model's plain FQN state dict (no "module." prefix), from a
                       ModelOptimizerState (whatever key the caller passed it under)
    optim.state.<fqn>.<name>   its optimizer state, keyed by parameter FQN
    optim.param_groups.<fqn>   that parameter's group options (lr, betas, ...), one pickled dict
                       (older checkpoints: optim.param_groups.<i>.<option>, still loaded)
    <key>.rank<r>      a PerRankState (e.g. RNGState) passed under <key>: one pickled entry per rank
    <key>.*            any other Stateful / plain dict the caller passed under <key>

so the weights alone load with `dcp.load({"model": model.state_dict()}, checkpoint_id=dir)`
(see weights.py). Why its own module: the manager decides *when* and *where* to save and load
(retention, resume, async, rank 0's decisions); this module is *how* a state becomes DCP keys
and back, which weights-only loads and the `ckpt` tools share without a manager.

Functions taking `process_group` and `distributed` are collective when `distributed` (every rank
of the group calls them).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful

from lmforge.checkpoint.errors import CheckpointError, first_line
from lmforge.checkpoint.formats import decode_moment, stored_names, template_for
from lmforge.checkpoint.manifest import base_of, read_manifest, saved_metadata
from lmforge.checkpoint.state import (
    ModelOptimizerState,
    PerRankState,
    choose_rank_key,
    is_group_options,
    legacy_group_options,
    merge_group_options,
    pack,
    rank_key,
    unpack,
)

__all__ = ["check_model_against", "check_state_keys", "copy_to_host", "flat_state_for_save", "host_buffers_like",
           "load_flat", "load_state", "quiet_no_dist", "save_flat"]

PerRankKey = Callable[[str, PerRankState], str]  # (caller's key, its state) -> this rank's DCP key


@contextmanager
def quiet_no_dist() -> Iterator[None]:
    """DCP without a process group warns "torch.distributed is disabled ... single process": it is,
    on purpose (one process, or the `ckpt` tools)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        yield


def check_state_keys(state: Mapping[str, Any]) -> None:
    """Refuse caller keys DCP would mangle ("." joins nested keys) or that would collide with the
    top-level "model" / "optim" a ModelOptimizerState is stored under."""
    for k in state:
        if not isinstance(k, str) or not k or "." in k:
            raise ValueError(f"checkpoint state key {k!r}: must be a non-empty string without '.'")
        if k in ("model", "optim") and isinstance(state[k], ModelOptimizerState):
            continue
        if k in ("model", "optim") and any(isinstance(v, ModelOptimizerState) for v in state.values()):
            raise ValueError(f"checkpoint state key {k!r} is reserved for the ModelOptimizerState")
    if sum(isinstance(v, ModelOptimizerState) for v in state.values()) > 1:
        raise ValueError("checkpoint state holds more than one ModelOptimizerState")


# -- state assembly ----------------------------------------------------------------------------------


class _PerRankView:
    """What DCP sees for a PerRankState: {key: pickled state}, key chosen by the caller (this
    rank's on save; on load, this rank's or rank 0's, from what the checkpoint holds)."""

    def __init__(self, obj: PerRankState, key: str) -> None:
        self.obj, self.key = obj, key

    def state_dict(self) -> dict[str, Any]:
        return {self.key: pack(self.obj.local_state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.obj.load_local_state_dict(unpack(state_dict[self.key]))


def _dcp_view(state: Mapping[str, Any], per_rank_key: PerRankKey) -> dict[str, Any]:
    """The caller's state as DCP sees it: a ModelOptimizerState split into top-level "model"
    and "optim"; a PerRankState as {rank key: bytes}; everything else as given."""
    out: dict[str, Any] = {}
    for key, obj in state.items():
        if isinstance(obj, ModelOptimizerState):
            out.update(obj.parts())
        elif isinstance(obj, PerRankState):
            out[key] = _PerRankView(obj, per_rank_key(key, obj))
        else:
            out[key] = obj
    return out


def flat_state_for_save(state: Mapping[str, Any], rank: int) -> dict[str, Any]:
    """The caller's state as one flat dict of DCP keys (as DCP itself would flatten it), holding
    references to the live tensors; per-rank state under this `rank`'s key."""
    view = _dcp_view(state, lambda _key, _obj: rank_key(rank))
    nested = {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in view.items()}
    flat, _ = flatten_state_dict(nested)
    return flat


def host_buffers_like(flat: dict[str, Any]) -> dict[str, Any]:
    """Host (CPU) tensors shaped like those of `flat`, allocated once and reused by later async saves
    of the same keys (`copy_to_host`)."""
    return _create_cpu_state_dict(flat)


def copy_to_host(flat: dict[str, Any], buffers: dict[str, Any]) -> dict[str, Any]:
    """`flat` with its tensors copied into `buffers` (from `host_buffers_like`): a snapshot the
    training step may change the live tensors under."""
    return _copy_state_dict(flat, buffers, type_check=False)


# -- save --------------------------------------------------------------------------------------------


def save_flat(directory: Path, flat: dict[str, Any], compression: str, process_group: dist.ProcessGroup | None,
              distributed: bool) -> None:
    """Write the flat state `flat` into `directory` with DCP (each rank its shards, fsynced);
    `compression` "zstd" uses DCP's ZStandard stream extension (decompressed on load)."""
    extensions = None
    if compression == "zstd":
        from torch.distributed.checkpoint._extension import ZStandard

        extensions = [ZStandard()]
    writer = dcp.FileSystemWriter(str(directory), _extensions=extensions)
    if distributed:
        dcp.save(flat, storage_writer=writer, process_group=process_group)
    else:
        with quiet_no_dist():
            dcp.save(flat, storage_writer=writer, no_dist=True)


# -- load --------------------------------------------------------------------------------------------


def check_model_against(path: Path, saved: Mapping[str, Any], model_sd: Mapping[str, Any],
                        all_ranks_keys: set[str] | None = None) -> None:
    """One clear line when the model does not fit the checkpoint (usually a config mismatch).
    `all_ranks_keys`: the model keys of every rank together (a pipeline rank holds only its
    stages' weights: the checkpoint's other weights belong to the other ranks)."""
    saved_model = {k[len("model."):]: v for k, v in saved.items() if k.startswith("model.")}
    if not saved_model:
        raise CheckpointError(f"checkpoint {path}: holds no model weights (no top-level 'model' key)")
    missing = [k for k in model_sd if k not in saved_model]
    held = all_ranks_keys if all_ranks_keys is not None else model_sd
    extra = [k for k in saved_model if k not in held]
    if missing or extra:
        what = (f"lacks weights {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else
                f"has weights the model lacks: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
        raise CheckpointError(f"checkpoint {path}: {what} (does the model config match the checkpoint's?)")
    for k, t in model_sd.items():
        md = saved_model[k]
        if isinstance(md, TensorStorageMetadata) and tuple(md.size) != tuple(t.shape):
            raise CheckpointError(f"checkpoint {path}: weight {k} has shape {tuple(md.size)}, the model has "
                                  f"{tuple(t.shape)} (does the model config match the checkpoint's?)")


def _dcp_load(request: dict[str, Any], path: Path, process_group: dist.ProcessGroup | None, distributed: bool) -> None:
    if not request:
        return
    if distributed:
        dcp.load(request, checkpoint_id=str(path), process_group=process_group)
    else:
        with quiet_no_dist():
            dcp.load(request, checkpoint_id=str(path), no_dist=True)


def load_flat(path: Path, flat: dict[str, Any], process_group: dist.ProcessGroup | None = None,
              distributed: bool = False) -> None:
    """Load checkpoint `path` into the flat state dict `flat` (tensors in place, other values
    replaced), whatever the stored form: lossy optimizer moments are decoded, keys an incremental
    checkpoint refers to are read from its base, zstd files are decompressed by DCP's reader.
    Collective when `distributed`. Raises CheckpointError naming the first key it lacks."""
    manifest, _ = read_manifest(path)
    manifest = manifest or {}
    block = int(manifest.get("quant_block", 256))
    refs = set(manifest.get("refs", [])) if manifest.get("kind") == "incremental" else set()
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    local: dict[str, Any] = {}
    from_base: dict[str, Any] = {}
    decode: list[tuple[str, list[str]]] = []
    for k, t in flat.items():
        names = stored_names(k, t, saved | refs)
        if names is None:
            raise CheckpointError(f"checkpoint {path}: has no entry {k!r} (was it saved from a different state?)")
        for n in names:
            (local if n in saved else from_base)[n] = t if n == k else template_for(n, t, block)
        if names != [k]:
            decode.append((k, names))
    _dcp_load(local, path, process_group, distributed)
    if from_base:
        _dcp_load(from_base, base_of(path, manifest), process_group, distributed)
    got = {**local, **from_base}
    for k in flat:
        if k in got:
            flat[k] = got[k]
    for k, names in decode:
        decode_moment(k, flat[k], [got[n] for n in names], block)


_LEGACY_GROUP = re.compile(r"optim\.param_groups\.\d+\..+")


def _load_legacy_group_options(path: Path, flat: dict[str, Any], saved: Mapping[str, Any],
                               process_group: dist.ProcessGroup | None, distributed: bool) -> dict[str, bytes]:
    """For a checkpoint from before param groups were keyed by FQN ("optim.param_groups.<i>.lr"):
    the values of `flat`'s "optim.param_groups.<fqn>" entries read from its list-indexed groups
    ({} for any other checkpoint). A parameter the saved groups do not list (a pipeline stage's,
    whose groups DCP kept only one stage's of) keeps this run's options. Collective like load_flat."""
    wanted = [k for k in flat if is_group_options(k) and k not in saved]
    if not wanted or "optim.param_groups.0.params" not in saved:
        return {}
    stored: dict[str, Any] = {k: None for k in saved if _LEGACY_GROUP.fullmatch(k)}
    load_flat(path, stored, process_group, distributed)
    by_fqn = legacy_group_options(stored)
    out: dict[str, bytes] = {}
    for k in wanted:
        options = by_fqn.get(k[len("optim.param_groups."):])
        out[k] = flat[k] if options is None else merge_group_options(flat[k], options)
    return out


def _has_leaves(obj: Any) -> bool:
    if isinstance(obj, Mapping):
        return any(_has_leaves(v) for v in obj.values())
    return True


def load_state(path: Path, state: Mapping[str, Any], rank: int, world: int,
               process_group: dist.ProcessGroup | None, distributed: bool) -> None:
    """Load the verified checkpoint `path` into the caller's `state` (same keys as at save; this is
    rank `rank` of `world`): checked against the checkpoint first (model fits, every key stored),
    then loaded with `load_flat`, then handed to each Stateful. Collective when `distributed`."""
    saved = saved_metadata(path)
    saved_top: dict[str, set[str]] = {}
    for k in saved:
        top, _, rest = k.partition(".")
        saved_top.setdefault(top, set()).add(rest.split(".", 1)[0])

    def per_rank_key(key: str, _obj: PerRankState) -> str:
        try:
            return choose_rank_key(saved_top.get(key, set()), rank, world)
        except KeyError:
            raise CheckpointError(f"checkpoint {path}: has no per-rank state '{key}'") from None

    dcp_state = _dcp_view(state, per_rank_key)
    # Materialise what DCP loads into (as dcp.load does for Statefuls) so it can be checked first.
    templates = {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in dcp_state.items()}
    if "model" in templates:
        keys: set[str] | None = None
        if world > 1:  # pipeline ranks hold parts of the model: check extras against the union
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, sorted(templates["model"]), group=process_group)
            keys = {k for part in gathered for k in part}
        check_model_against(path, saved, templates["model"], keys)
    for k, t in templates.items():
        if k not in saved_top and _has_leaves(t):
            raise CheckpointError(f"checkpoint {path}: has no state '{k}' (it has: {', '.join(sorted(saved_top))})")
    flat, mapping = flatten_state_dict(templates)
    try:
        legacy = _load_legacy_group_options(path, flat, saved, process_group, distributed)
        rest = {k: v for k, v in flat.items() if k not in legacy}
        load_flat(path, rest, process_group, distributed)
        flat.update(rest)
        flat.update(legacy)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (DCP's multi-line errors become one line)
        raise CheckpointError(f"checkpoint {path}: cannot load into this run's state ({first_line(e)})") from None
    for k, where in mapping.items():  # non-tensor values were replaced: put them back in place
        set_element(templates, where, flat[k])
    for k, v in dcp_state.items():
        if isinstance(v, Stateful):
            try:
                v.load_state_dict(templates[k])
            except ValueError as e:  # a state that refuses what was saved (another mode): its first line
                why = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
                raise CheckpointError(f"checkpoint {path}: {why}") from None

"""Checkpoints on torch.distributed.checkpoint (DCP), with an integrity manifest and atomic publish.

Layout of one checkpoint, `<root>/step-00000100/`:

    .metadata, __<rank>_<n>.distcp     written by DCP (every rank writes its own shards)
    lmforge-checkpoint.json            manifest written last by rank 0: step, format version,
                                       world size, every file with its size and sha256

DCP keys (top level; nested keys are joined with "."):

    model.<fqn>        the model's plain FQN state dict (no "module." prefix), from a
                       ModelOptimizerState (whatever key the caller passed it under)
    optim.state.<fqn>.<name>   its optimizer state, keyed by parameter FQN
    optim.param_groups.<fqn>   that parameter's group options (lr, betas, ...), one pickled dict
                       (older checkpoints: optim.param_groups.<i>.<option>, still loaded)
    <key>.rank<r>      a PerRankState (e.g. RNGState) passed under <key>: one pickled entry per rank
    <key>.*            any other Stateful / plain dict the caller passed under <key>

so the weights alone load with `dcp.load({"model": model.state_dict()}, checkpoint_id=dir)`
(see `load_model_weights`).

Why a manifest: DCP writes .metadata once every rank has written its data, but a crash, a full
disk or a later bit flip can still leave a directory that *looks* complete. A checkpoint is valid
only when its name has no `.tmp` suffix, its manifest is there and every listed file has the
listed size and sha256 (and every file DCP's metadata refers to is listed). Saving writes into
`step-N.tmp/`, writes the manifest last, fsyncs, and renames; so a crash at any point leaves either
the old state or a complete new checkpoint. Pruning runs only after the new one is published and
checked, and never touches it.

Distributed: every public method except `list_checkpoints` is collective when a process group is
in use (all ranks of the group must call it). Decisions that read files (is it valid? which is the
newest valid one?) are made by rank 0 alone and broadcast with `broadcast_object_list`, so all
ranks act on the same answer even if the filesystem changes under them, and the hashing is done
once, not once per rank. DCP itself needs a filesystem shared by all ranks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from lmforge.checkpoint.formats import (
    decode_moment,
    encode_moments,
    stored_names,
    template_for,
    tensor_digest,
)
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
from lmforge.storage.atomic import atomic_open, fsync_dir
from lmforge.storage.explain import describe_os_error, diagnose_write_failure
from lmforge.storage.layout import _STEP_RE, MANIFEST, step_dir_name, step_of
from lmforge.storage.strict_json import dumps_strict

__all__ = ["MANIFEST", "CheckpointError", "CheckpointManager", "load_model_weights", "save_model_weights",
           "step_dir_name", "verify_checkpoint"]

log = logging.getLogger(__name__)

FORMAT = "lmforge-checkpoint"
FORMAT_VERSION = 1
_HASH_CHUNK = 8 << 20
_T = TypeVar("_T")


class CheckpointError(Exception):
    """A checkpoint the user pointed at (or that a resume found) is missing, incomplete, corrupt or
    does not fit the state it is loaded into. The message is one line: which checkpoint, what."""


# -- integrity ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    step: int | None = None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_files(paths: list[Path]) -> list[str]:
    """sha256 of each file, files in parallel (hashlib releases the GIL): ~1-2 GB/s per core with
    SHA extensions, each file read once."""
    if len(paths) <= 1:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(paths))) as pool:
        return list(pool.map(_sha256, paths))


def _read_manifest(path: Path) -> tuple[dict | None, str]:
    mpath = path / MANIFEST
    if not mpath.is_file():
        return None, f"no {MANIFEST} (an incomplete save, or not an lmforge checkpoint)"
    try:
        m = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable {MANIFEST} ({e.__class__.__name__}: {e})"
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return None, f"{MANIFEST} is not an lmforge checkpoint manifest"
    if not isinstance(m.get("version"), int) or m["version"] > FORMAT_VERSION:
        return None, f"{MANIFEST} has format version {m.get('version')!r}; this lmforge reads <= {FORMAT_VERSION}"
    files = m.get("files")
    if not isinstance(m.get("step"), int) or not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
            and isinstance(f.get("sha256"), str) for f in files):
        return None, f"{MANIFEST} is malformed (step or files missing)"
    return m, ""


def _fingerprint(path: Path, manifest: dict) -> tuple:
    """Cheap identity of a checkpoint's files (size, mtime, ctime, inode), so that a checkpoint this
    manager hashed moments ago is not hashed again (resolve_resume("auto") then load())."""
    out = []
    for rel in [MANIFEST, *(f["path"] for f in manifest["files"])]:
        st = (path / rel).stat()
        out.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(out)


def verify_checkpoint(path: Path, deep: bool = True, _cache: dict | None = None) -> Verdict:
    """Local (no collectives) integrity check of one checkpoint directory.

    deep=False checks names, manifest and sizes only (for pruning); deep=True also hashes every
    file and checks DCP's metadata refers only to listed files."""
    path = Path(path)
    if not path.exists():
        return Verdict(False, "does not exist")
    if not path.is_dir():
        return Verdict(False, "is not a directory")
    if path.name.endswith(".tmp"):
        return Verdict(False, "unfinished save (.tmp directory: the writer stopped before publishing it)")
    manifest, reason = _read_manifest(path)
    if manifest is None:
        return Verdict(False, reason)
    step = manifest["step"]
    m = _STEP_RE.match(path.name)
    if m and int(m.group(1)) != step:
        return Verdict(False, f"directory name says step {int(m.group(1))} but {MANIFEST} says step {step}")
    entries = manifest["files"]
    if not any(f["path"] == ".metadata" for f in entries):
        return Verdict(False, f"{MANIFEST} lists no DCP .metadata file")
    for f in entries:
        rel = f["path"]
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return Verdict(False, f"{MANIFEST} lists a path outside the checkpoint: {rel}")
        fp = path / rel
        if not fp.is_file():
            return Verdict(False, f"file {rel} is missing")
        size = fp.stat().st_size
        if size != f["size"]:
            return Verdict(False, f"file {rel} has {size} bytes, the manifest says {f['size']} (truncated or overwritten)")
    if deep:
        try:
            fingerprint = _fingerprint(path, manifest)
        except OSError as e:
            return Verdict(False, f"cannot stat files ({e})")
        key = str(path.resolve())
        if _cache is not None and _cache.get(key) == fingerprint:
            return Verdict(True, "ok", step)
        try:
            digests = _hash_files([path / f["path"] for f in entries])
        except OSError as e:
            return Verdict(False, f"cannot read files ({e})")
        for f, digest in zip(entries, digests):
            if digest != f["sha256"]:
                return Verdict(False, f"file {f['path']} does not match its sha256 in the manifest (modified or corrupt)")
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 (any failure to read DCP metadata makes it invalid)
        return Verdict(False, f"unreadable DCP metadata ({e.__class__.__name__})")
    listed = {f["path"] for f in entries}
    storage = getattr(meta, "storage_data", None) or {}
    unlisted = sorted({getattr(v, "relative_path", None) for v in storage.values()} - listed - {None})
    if unlisted:
        return Verdict(False, f"DCP metadata refers to files not in the manifest: {', '.join(unlisted[:3])}")
    if manifest.get("kind") == "incremental":
        why = _verify_base(path, manifest, deep, _cache)
        if why:
            return Verdict(False, why)
    if not deep:
        return Verdict(True, "ok (sizes)", step)
    if _cache is not None:
        _cache[key] = fingerprint
    return Verdict(True, "ok", step)


def base_of(path: Path, manifest: Mapping[str, Any]) -> Path | None:
    """The full checkpoint an incremental one takes its unchanged tensors from (a sibling dir)."""
    name = manifest.get("base")
    if manifest.get("kind") != "incremental" or not isinstance(name, str):
        return None
    return path.parent / name


def _verify_base(path: Path, manifest: Mapping[str, Any], deep: bool, cache: dict | None) -> str:
    """'' when the base of incremental checkpoint `path` is valid and holds every key it refers to."""
    name, refs = manifest.get("base"), manifest.get("refs")
    if not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(refs, list):
        return f"{MANIFEST} is malformed (incremental without a base or refs)"
    base = path.parent / name
    vb = verify_checkpoint(base, deep=deep, _cache=cache)
    if not vb.ok:
        return f"its base checkpoint {name} is not valid ({vb.reason})"
    base_manifest, _ = _read_manifest(base)
    if base_manifest is None or base_manifest.get("kind") == "incremental":
        return f"its base checkpoint {name} is not a full checkpoint"
    keys = set(dcp.FileSystemReader(str(base)).read_metadata().state_dict_metadata)
    missing = [k for k in refs if k not in keys]
    if missing:
        return f"its base checkpoint {name} lacks {len(missing)} tensor(s) it refers to, e.g. {missing[0]}"
    return ""


def saved_metadata(path: Path) -> dict[str, Any]:
    """DCP metadata per stored key of checkpoint `path`, including keys an incremental checkpoint
    takes from its base (so checks see the whole state)."""
    out = dict(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    manifest, _ = _read_manifest(path)
    base = base_of(path, manifest) if manifest else None
    if base is not None:
        base_meta = dcp.FileSystemReader(str(base)).read_metadata().state_dict_metadata
        out.update({k: base_meta[k] for k in manifest["refs"] if k in base_meta})
    return out


def _write_manifest(path: Path, step: int, world_size: int, extra: Mapping[str, Any] | None = None) -> dict:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST
                   and not p.name.startswith(MANIFEST))
    rels = [p.relative_to(path).as_posix() for p in files]
    digests = _hash_files(files)
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "created_unix": time.time(),
        "torch_version": torch.__version__,
        "checksum": "sha256",
        "keys": sorted({k.split(".", 1)[0] for k in [*meta.state_dict_metadata, *(extra or {}).get("refs", ())]}),
        "files": [{"path": r, "size": p.stat().st_size, "sha256": d} for r, p, d in zip(rels, files, digests)],
        "kind": "full", "compression": "none", "optimizer_states": "fp32",
        **(extra or {}),
    }
    manifest["bytes"] = sum(f["size"] for f in manifest["files"])
    with atomic_open(path / MANIFEST, "w") as f:  # its temp name starts with MANIFEST: never listed
        f.write(dumps_strict(manifest, indent=1))
    return manifest


# -- DCP state assembly -------------------------------------------------------------------------------


class _PerRankView:
    """What DCP sees for a PerRankState: {key: pickled state}, key chosen by the manager."""

    def __init__(self, obj: PerRankState, key: str) -> None:
        self.obj, self.key = obj, key

    def state_dict(self) -> dict[str, Any]:
        return {self.key: pack(self.obj.local_state_dict())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.obj.load_local_state_dict(unpack(state_dict[self.key]))


def _check_keys(state: Mapping[str, Any]) -> None:
    for k in state:
        if not isinstance(k, str) or not k or "." in k:
            raise ValueError(f"checkpoint state key {k!r}: must be a non-empty string without '.'")
        if k in ("model", "optim") and isinstance(state[k], ModelOptimizerState):
            continue
        if k in ("model", "optim") and any(isinstance(v, ModelOptimizerState) for v in state.values()):
            raise ValueError(f"checkpoint state key {k!r} is reserved for the ModelOptimizerState")
    if sum(isinstance(v, ModelOptimizerState) for v in state.values()) > 1:
        raise ValueError("checkpoint state holds more than one ModelOptimizerState")


def _has_leaves(obj: Any) -> bool:
    if isinstance(obj, Mapping):
        return any(_has_leaves(v) for v in obj.values())
    return True


@contextmanager
def _quiet_no_dist():
    with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        yield


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{e.__class__.__name__}: {line}"[:300]


def _check_model_against(path: Path, saved: Mapping[str, Any], model_sd: Mapping[str, Any],
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


def _publish(tmp: Path, final: Path) -> None:
    """Atomically rename the complete `tmp` to `final`; an existing `final` (e.g. a corrupt one a
    resume skipped) is moved aside first and deleted only after the new one is in place."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _dcp_load(request: dict[str, Any], path: Path, process_group: dist.ProcessGroup | None, distributed: bool) -> None:
    if not request:
        return
    if distributed:
        dcp.load(request, checkpoint_id=str(path), process_group=process_group)
    else:
        with _quiet_no_dist():
            dcp.load(request, checkpoint_id=str(path), no_dist=True)


def load_flat(path: Path, flat: dict[str, Any], process_group: dist.ProcessGroup | None = None,
              distributed: bool = False) -> None:
    """Load checkpoint `path` into the flat state dict `flat` (tensors in place, other values
    replaced), whatever the stored form: lossy optimizer moments are decoded, keys an incremental
    checkpoint refers to are read from its base, zstd files are decompressed by DCP's reader.
    Collective when `distributed`. Raises CheckpointError naming the first key it lacks."""
    manifest, _ = _read_manifest(path)
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


def _legacy_groups(path: Path, flat: dict[str, Any], saved: Mapping[str, Any],
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


def save_model_weights(step_dir: Path, model: nn.Module, step: int | None = None) -> Path:
    """A weights-only checkpoint ({"model": FQN state dict}, manifest, atomic publish) at
    `step_dir`, single process, no process group: for imported models (HF -> run) and exports
    that later commands load with `load_model_weights`. `step` defaults to N of a `step-N` name."""
    step_dir = Path(step_dir)
    if step is None:
        m = _STEP_RE.match(step_dir.name)
        if m is None or m.group(2):
            raise ValueError(f"{step_dir}: name is not step-N; pass step=")
        step = int(m.group(1))
    tmp = step_dir.with_name(step_dir.name + ".tmp")
    step_dir.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with _quiet_no_dist():
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp), no_dist=True)
        _write_manifest(tmp, step, 1)
        _publish(tmp, step_dir)
    except BaseException as e:
        cause = None if isinstance(e, KeyboardInterrupt | SystemExit) else diagnose_write_failure(e, step_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if cause is not None:
            raise cause from e  # DCP's CheckpointException is not even an Exception: name the fault
        raise
    return step_dir


def load_model_weights(path: Path, model: nn.Module) -> int:
    """Load only the model weights of checkpoint `path` into `model` in place; returns its step.

    Verifies integrity first (CheckpointError if invalid). Needs no process group and no
    optimizer: reads the top-level "model" key only (for generation, evaluation, export). Every
    rank may call it independently."""
    path = Path(path)
    v = verify_checkpoint(path)
    if not v.ok:
        raise CheckpointError(f"checkpoint {path}: {v.reason}")
    sd = get_model_state_dict(model)
    _check_model_against(path, saved_metadata(path), sd)
    flat = {f"model.{k}": v for k, v in sd.items()}
    try:
        load_flat(path, flat)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (DCP's multi-line errors become one line)
        raise CheckpointError(f"checkpoint {path}: cannot load model weights ({_first_line(e)})") from None
    set_model_state_dict(model, {k: flat[f"model.{k}"] for k in sd})
    assert v.step is not None
    return v.step


# -- the manager -------------------------------------------------------------------------------------


@dataclass
class _Base:
    """The last full checkpoint this manager wrote, with this rank's digest of every stored tensor."""

    path: Path
    digests: dict[str, str]
    world: int


class CheckpointManager:
    """Saves, verifies, lists, prunes and loads checkpoints under `root` (see the module docstring).

    `process_group`: the group whose ranks save and load together (None: the default group when
    torch.distributed is initialised, else single-process); with `async_save` pass a group of its
    own (e.g. `dist.new_group(backend="gloo")`), since the writer thread runs collectives on it
    while training runs its own. `keep_last`: how many checkpoints to keep; older ones are deleted
    after a new one is published (never the base of a kept incremental one).

    Storage options: `async_save` (stage a copy, write in a background thread; see `save`),
    `compression` ("none" | "zstd": lossless, DCP's ZStandard stream extension, decompressed on
    load), `optimizer_states` ("fp32" | "bf16" | "int8": how optimizer moments are stored, see
    formats.py; weights are always exact), `full_every` (0: every checkpoint full; k: a full one
    then k-1 incremental ones that store only tensors whose content changed since that full one)."""

    def __init__(self, root: Path, keep_last: int, process_group: dist.ProcessGroup | None = None, *,
                 async_save: bool = False, compression: str = "none", optimizer_states: str = "fp32",
                 quant_block: int = 256, full_every: int = 0) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: must be >= 1")
        if compression not in ("none", "zstd"):
            raise ValueError(f"compression={compression!r}: must be 'none' or 'zstd'")
        if optimizer_states not in ("fp32", "bf16", "int8"):
            raise ValueError(f"optimizer_states={optimizer_states!r}: must be 'fp32', 'bf16' or 'int8'")
        if quant_block < 1 or full_every < 0:
            raise ValueError(f"quant_block={quant_block}, full_every={full_every}: must be >= 1 and >= 0")
        self.root = Path(root)
        self.keep_last = keep_last
        self.process_group = process_group
        self.async_save = async_save
        self.compression = compression
        self.optimizer_states = optimizer_states
        self.quant_block = quant_block
        self.full_every = full_every
        self._verified: dict[str, Any] = {}  # resolved path -> file fingerprint hashed OK by this manager
        self._lock = threading.Lock()  # _verified is touched by the writer thread too
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Any = None  # Future of the save being written in the background
        self._staging: dict[str, Any] | None = None  # reused host buffers for async staging
        self._base: _Base | None = None
        self._since_full = 0
        self._records: list[dict[str, float]] = []
        self._staged: threading.Event | None = None  # set once the async save copied the state
        self._stall_rec: dict[str, float] | None = None
        self._hooks: dict[int, Any] = {}  # id(optimizer) -> step pre-hook handle

    # -- process-group helpers --

    def _distributed(self) -> bool:
        return self.process_group is not None or (dist.is_available() and dist.is_initialized())

    def _rank_world(self) -> tuple[int, int]:
        if not self._distributed():
            return 0, 1
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def _barrier(self) -> None:
        if self._distributed():
            dist.barrier(group=self.process_group)

    def _on_rank0(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on rank 0 and give every rank its result, or make every rank raise (rank 0 its
        own exception, the others a CheckpointError/RuntimeError with its message)."""
        if not self._distributed():
            return fn()
        box: list[Any] = [None]
        failure: BaseException | None = None
        if self._rank_world()[0] == 0:
            try:
                box[0] = ("ok", fn())
            except CheckpointError as e:
                failure, box[0] = e, ("error", str(e))
            except Exception as e:  # noqa: BLE001 (other ranks must not wait forever)
                failure, box[0] = e, ("crash", f"checkpoint manager failed on rank 0: {_first_line(e)}")
        dist.broadcast_object_list(box, group=self.process_group, group_src=0)
        if failure is not None:
            raise failure
        kind, value = box[0]
        if kind == "error":
            raise CheckpointError(value)
        if kind == "crash":
            raise RuntimeError(value)
        return value

    def _verify_local(self, path: Path, deep: bool = True) -> Verdict:
        return verify_checkpoint(path, deep=deep, _cache=self._verified)

    # -- queries --

    def list_checkpoints(self) -> list[Path]:
        """Published checkpoint directories (`step-N`, valid or not), oldest first. Local, not collective."""
        return [p for _, p in self._scan(include_tmp=False)]

    def _scan(self, include_tmp: bool) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and (include_tmp or not m.group(2)):
                out.append((int(m.group(1)), p))
        # Same step: the published one sorts after its .tmp, so it is tried first from the newest end.
        return sorted(out, key=lambda sp: (sp[0], not sp[1].name.endswith(".tmp")))

    def verify(self, path: Path) -> tuple[bool, str]:
        """(valid?, reason). Collective when distributed: rank 0 checks, all ranks get its answer."""
        v = self._on_rank0(lambda: self._verify_local(Path(path)))
        return v.ok, v.reason

    def _walk(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """(newest valid checkpoint or None, [(skipped invalid one, why)]), newest first."""
        skipped = []
        for _, p in reversed(self._scan(include_tmp=True)):
            if p.name.endswith(".tmp"):  # a save that never finished: never a candidate, never a blocker
                log.warning("skipping unfinished save %s (never published; ignored)", p)
                continue
            v = self._verify_local(p)
            if v.ok:
                return p, skipped
            log.warning("skipping invalid checkpoint %s: %s", p, v.reason)
            skipped.append((p, v.reason))
        return None, skipped

    def latest_valid(self) -> Path | None:
        """The newest valid checkpoint, skipping (with a warning each) invalid newer ones, incl.
        leftover `.tmp` directories; None when there is none. Collective when distributed."""
        return self._on_rank0(lambda: self._walk()[0])

    def resolve_resume(self, spec: str) -> Path | None:
        """Where to resume from. "none" -> None (fresh start); "auto" -> the newest valid
        checkpoint, or None when there are no checkpoints yet; but CheckpointError when there are
        some and none is valid (a silent restart from scratch would discard the run's progress).
        Anything else is a checkpoint directory that must be valid, else CheckpointError.
        Collective when distributed."""
        s = str(spec).strip()
        if s.lower() == "none":
            return None
        if s.lower() == "auto":

            def auto() -> Path | None:
                found, skipped = self._walk()
                if found is None and skipped:
                    newest, why = skipped[0]
                    raise CheckpointError(
                        f"resume 'auto': {len(skipped)} checkpoint(s) under {self.root}, none valid (newest "
                        f"{newest.name}: {why}); repair or move them away, or resume 'none' to start fresh")
                if found is None:
                    log.info("no checkpoint under %s yet: starting fresh", self.root)
                return found

            return self._on_rank0(auto)
        path = Path(s).expanduser()

        def check() -> Path:
            v = self._verify_local(path)
            if not v.ok:
                raise CheckpointError(f"resume checkpoint {path}: {v.reason} "
                                      "(expected a valid step-N checkpoint directory, 'auto' or 'none')")
            return path

        return self._on_rank0(check)

    # -- save --

    def save(self, step: int, state: Mapping[str, Any]) -> Path:
        """Save `state` ({name: Stateful or plain dict}) as `root/step-{step:08d}`; returns that path.

        Collective when distributed. Writes into `step-N.tmp`, then rank 0 writes the manifest,
        fsyncs and renames; only then are checkpoints beyond keep_last deleted. An existing
        `step-N` (e.g. a corrupt one a resume skipped) is replaced only once the new one is complete.

        With `async_save`, the call waits for the previous save, takes the state dicts (references
        to the live tensors) and returns; a background thread copies the tensors into reused host
        buffers, then writes, publishes and prunes (a later `save` or `wait()` waits for it and
        raises its error). The copy overlaps the next forward/backward: the optimizers in `state`
        get a step pre-hook that waits until the copy is done, since their step is what changes
        the tensors in place (anything else that does must call `wait_staged()` first). The stall
        reported by `stats()` is the time in this call plus the time that hook waited."""
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        _check_keys(state)
        t0 = time.perf_counter()
        self.wait()
        rank, _ = self._rank_world()
        flat = self._flatten(self._dcp_state(state, lambda _key, _obj: rank_key(rank)))
        rec: dict[str, float] = {"step": float(step)}
        if self.async_save:
            # Non-tensor values are small; copied now, since their owners may change them in place.
            flat = {k: v if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in flat.items()}
            self._hook_optimizers(state)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-ckpt")
            self._staged, self._stall_rec = threading.Event(), rec
            self._pending = self._executor.submit(self._stage_and_write, step, flat, t0, rec, self._staged)
            rec["stall_s"] = time.perf_counter() - t0
        else:
            self._write(step, flat, t0, rec)
            rec["stall_s"] = rec["total_s"]
        self._records.append(rec)
        return self.root / step_dir_name(step)

    def _hook_optimizers(self, state: Mapping[str, Any]) -> None:
        for obj in state.values():
            opt = getattr(obj, "optimizer", None) if isinstance(obj, ModelOptimizerState) else None
            if opt is not None and id(opt) not in self._hooks:
                self._hooks[id(opt)] = opt.register_step_pre_hook(lambda *_: self.wait_staged())

    def _stage_and_write(self, step: int, flat: dict[str, Any], t0: float, rec: dict[str, float],
                         staged: threading.Event) -> None:
        try:
            if self._staging is None or self._staging.keys() != flat.keys():
                self._staging = _create_cpu_state_dict(flat)
            flat = _copy_state_dict(flat, self._staging, type_check=False)
        finally:
            staged.set()
        self._write(step, flat, t0, rec)

    def wait_staged(self) -> None:
        """Block until the async save in progress has copied the state (then it may change)."""
        event, rec = self._staged, self._stall_rec
        self._staged = None
        if event is not None and not event.is_set():
            t0 = time.perf_counter()
            event.wait()
            if rec is not None:
                rec["stall_s"] = rec.get("stall_s", 0.0) + time.perf_counter() - t0

    def wait(self) -> None:
        """Block until the save in progress (if any) is published; re-raise its error. Collective
        only in the sense that every rank waits for its own part."""
        self.wait_staged()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the save in progress and stop the writer thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._staging = None
            for handle in self._hooks.values():
                handle.remove()
            self._hooks.clear()

    def stats(self) -> list[dict[str, float]]:
        """Finished saves since the last call: step, stall_s (caller blocked), total_s (until
        published), bytes, incremental (0/1). A save still being written is reported later."""
        done = [r for r in self._records if "total_s" in r and "stall_s" in r]
        self._records = [r for r in self._records if r not in done]
        return done

    @staticmethod
    def _flatten(dcp_state: Mapping[str, Any]) -> dict[str, Any]:
        nested = {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in dcp_state.items()}
        flat, _ = flatten_state_dict(nested)
        return flat

    def _write(self, step: int, flat: dict[str, Any], t0: float, rec: dict[str, float]) -> None:
        """`_write_unchecked`, and when it fails (full disk, read-only, I/O error, ...) remove the
        temp directory and raise one CheckpointError line saying why and that the previous
        checkpoint is intact (nothing older is touched before a save is published)."""
        final = self.root / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        try:
            self._write_unchecked(step, flat, t0, rec, final, tmp)
        except BaseException as e:
            # Diagnose before cleaning up: a full disk is still full now.
            cause = diagnose_write_failure(e, tmp) if not isinstance(e, CheckpointError | KeyboardInterrupt) \
                else None
            if self._rank_world()[0] == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, KeyboardInterrupt | SystemExit | CheckpointError):
                raise
            try:
                published = [p for p in self.list_checkpoints() if step_of(p) != step]
            except OSError:
                published = []
            previous = (f"the previous checkpoint {published[-1]} is intact" if published
                        else "no earlier checkpoint exists")
            why = describe_os_error(cause, tmp) if cause is not None else _first_line(e)
            raise CheckpointError(f"checkpoint save to {final} failed: {why}; the unfinished save was removed and "
                                  f"{previous} (rerun with --checkpoint.resume auto to continue from it)") from e

    def _write_unchecked(self, step: int, flat: dict[str, Any], t0: float, rec: dict[str, float],
                         final: Path, tmp: Path) -> None:
        """Encode, write with DCP, publish (rank 0), prune. Runs in the caller or the writer thread."""
        _, world = self._rank_world()

        def prepare() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a save of this step that crashed
            tmp.mkdir()

        self._on_rank0(prepare)  # also a barrier: nobody writes before the directory is clean
        flat = encode_moments(flat, self.optimizer_states, self.quant_block)
        refs, digests = self._unchanged(flat, world)
        extensions = None
        if self.compression == "zstd":
            from torch.distributed.checkpoint._extension import ZStandard

            extensions = [ZStandard()]
        writer = dcp.FileSystemWriter(str(tmp), _extensions=extensions)
        to_write = {k: v for k, v in flat.items() if k not in refs}
        if self._distributed():
            dcp.save(to_write, storage_writer=writer, process_group=self.process_group)
        else:
            with _quiet_no_dist():
                dcp.save(to_write, storage_writer=writer, no_dist=True)
        self._barrier()  # every rank's files are written and fsynced (DCP's FileSystemWriter)
        extra: dict[str, Any] = {"compression": self.compression, "optimizer_states": self.optimizer_states,
                                 "quant_block": self.quant_block}
        if refs:
            assert self._base is not None
            extra.update(kind="incremental", base=self._base.path.name, refs=sorted(refs))

        def publish() -> int:
            manifest = _write_manifest(tmp, step, world, extra)
            _publish(tmp, final)
            # The manifest's hashes were just computed from the files on disk; check names, sizes
            # and DCP's file references again after the rename, before anything is deleted.
            v = verify_checkpoint(final, deep=False)
            if not v.ok:
                raise CheckpointError(f"checkpoint {final}: failed its check right after saving: {v.reason}")
            with self._lock:
                self._verified.pop(str(final.resolve()), None)
            self._prune(step)
            return manifest["bytes"]

        rec["bytes"] = float(self._on_rank0(publish))
        rec["incremental"] = float(bool(refs))
        if self.full_every:
            if refs:
                self._since_full += 1
            else:
                self._base, self._since_full = _Base(final, digests, world), 0
        rec["total_s"] = time.perf_counter() - t0

    def _unchanged(self, flat: Mapping[str, Any], world: int) -> tuple[set[str], dict[str, str]]:
        """(keys to take from the base instead of writing, this rank's digests). Empty when this
        save must be full: incremental off, no base yet, k-th save, world size changed, base gone."""
        if not self.full_every:
            return set(), {}
        # Optimizer state changes at every step (and frozen parameters have none): never hash it.
        digests = {k: tensor_digest(v) for k, v in flat.items()
                   if isinstance(v, torch.Tensor) and not k.startswith("optim.")}
        base = self._base
        if base is None or base.world != world or self._since_full + 1 >= self.full_every:
            return set(), digests
        if not self._on_rank0(lambda: verify_checkpoint(base.path, deep=False).ok):
            log.warning("base checkpoint %s is gone or invalid: writing a full checkpoint", base.path)
            return set(), digests
        same = {k for k, d in digests.items() if base.digests.get(k) == d}
        if self._distributed():
            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, sorted(same), group=self.process_group)
            same = set.intersection(*(set(x) for x in everyone))
        return same, digests

    def _prune(self, new_step: int) -> None:
        """Keep the new checkpoint plus the newest keep_last-1 older ones that pass the size check;
        delete older ones and crash leftovers (.tmp/.old) older than the new step. Newer ones (from
        an earlier run that was resumed from further back) are kept, with a warning."""
        older: list[tuple[int, Path]] = []
        for p in self.root.iterdir():
            m = re.match(r"^step-(\d+)(\.tmp|\.old)?$", p.name)
            if not m or not p.is_dir():
                continue
            s = int(m.group(1))
            if s > new_step and not m.group(2):
                log.warning("checkpoint %s is newer than the one just saved (step %d): it is from an earlier "
                            "run and resume 'auto' would prefer it; delete it if it is stale", p, new_step)
            elif s < new_step:
                if m.group(2):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    older.append((s, p))
        keep = self.keep_last - 1
        doomed = []
        for _, p in sorted(older, reverse=True):
            if keep > 0 and verify_checkpoint(p, deep=False).ok:
                keep -= 1
                continue
            doomed.append(p)
        # Never delete the base of a checkpoint that stays (incremental ones read tensors from it).
        needed = set()
        for p in self.root.iterdir():
            if p not in doomed and _STEP_RE.match(p.name) and p.is_dir():
                manifest, _ = _read_manifest(p)
                base = base_of(p, manifest) if manifest else None
                if base is not None:
                    needed.add(base.name)
        for p in doomed:
            if p.name in needed:
                log.info("keeping checkpoint %s beyond keep_last=%d: a kept incremental checkpoint is based on it",
                         p, self.keep_last)
                continue
            log.info("deleting checkpoint %s (keep_last=%d)", p, self.keep_last)
            shutil.rmtree(p, ignore_errors=True)
            with self._lock:
                self._verified.pop(str(p.resolve()), None)

    # -- load --

    def _dcp_state(self, state: Mapping[str, Any], per_rank_key: Callable[[str, PerRankState], str]
                   ) -> dict[str, Any]:
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

    def load(self, path: Path, state: Mapping[str, Any]) -> int:
        """Verify `path`, then load it into `state` (same keys as at save); returns its step.
        Collective when distributed; works without a process group in a single process."""
        path = Path(path)
        _check_keys(state)

        def check() -> int:
            v = self._verify_local(path)
            if not v.ok:
                raise CheckpointError(f"checkpoint {path}: {v.reason}")
            assert v.step is not None
            return v.step

        self.wait()  # a save of this path may still be in flight
        step = self._on_rank0(check)
        rank, world = self._rank_world()
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

        dcp_state = self._dcp_state(state, per_rank_key)
        # Materialise what DCP loads into (as dcp.load does for Statefuls) so it can be checked first.
        templates = {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in dcp_state.items()}
        if "model" in templates:
            keys: set[str] | None = None
            if world > 1:  # pipeline ranks hold parts of the model: check extras against the union
                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, sorted(templates["model"]), group=self.process_group)
                keys = {k for part in gathered for k in part}
            _check_model_against(path, saved, templates["model"], keys)
        for k, t in templates.items():
            if k not in saved_top and _has_leaves(t):
                raise CheckpointError(f"checkpoint {path}: has no state '{k}' (it has: {', '.join(sorted(saved_top))})")
        flat, mapping = flatten_state_dict(templates)
        try:
            legacy = _legacy_groups(path, flat, saved, self.process_group, self._distributed())
            rest = {k: v for k, v in flat.items() if k not in legacy}
            load_flat(path, rest, self.process_group, self._distributed())
            flat.update(rest)
            flat.update(legacy)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 (DCP's multi-line errors become one line)
            raise CheckpointError(f"checkpoint {path}: cannot load into this run's state ({_first_line(e)})") from None
        for k, where in mapping.items():  # non-tensor values were replaced: put them back in place
            set_element(templates, where, flat[k])
        for k, v in dcp_state.items():
            if isinstance(v, Stateful):
                v.load_state_dict(templates[k])
        return step

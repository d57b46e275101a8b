"""What `lmforge ckpt ls|verify|inspect|convert` does, without a model or a process group.

`read_checkpoint` is `dcp_to_torch_save`'s mechanism (DCP's `_EmptyStateDictLoadPlanner` builds
the state from the checkpoint's own metadata) plus what lmforge stores differently: keys an
incremental checkpoint takes from its base, and lossy optimizer moments (decoded to fp32).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from lmforge.checkpoint.dcp_io import quiet_no_dist
from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.formats import BF16, INT8, SCALE, dequantize_int8
from lmforge.checkpoint.manifest import base_of, read_manifest, saved_metadata, verify_checkpoint
from lmforge.checkpoint.state import is_group_options, unpack
from lmforge.storage.atomic import atomic_open
from lmforge.storage.explain import no_such_path
from lmforge.storage.layout import RunDir, holds_checkpoint, step_of

__all__ = ["CheckpointInfo", "convert_to_torch", "describe", "find_checkpoints", "inspect_rows", "read_checkpoint"]


@dataclass
class CheckpointInfo:
    path: Path
    tier: str
    step: int
    valid: bool
    reason: str
    kind: str = "?"
    compression: str = "?"
    optimizer_states: str = "?"
    bytes: int = 0
    base: str | None = None


def describe(path: Path, tier: str = "disk", deep: bool = False) -> CheckpointInfo:
    path = Path(path)
    v = verify_checkpoint(path, deep=deep)
    manifest, _ = read_manifest(path) if path.is_dir() else (None, "")
    info = CheckpointInfo(path, tier, v.step if v.step is not None else step_of(path), v.ok, v.reason)
    if manifest:
        info.kind = manifest.get("kind", "full")
        info.compression = manifest.get("compression", "none")
        info.optimizer_states = manifest.get("optimizer_states", "fp32")
        info.bytes = int(manifest.get("bytes", sum(f["size"] for f in manifest["files"])))
        info.base = manifest.get("base") if info.kind == "incremental" else None
    return info


def _step_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and step_of(p) >= 0), key=lambda p: (step_of(p), p.name))


def find_checkpoints(target: Path) -> Iterator[tuple[str, Path]]:
    """(tier, checkpoint dir) under a run directory (both tiers, from its config.json), a
    checkpoint folder, or one checkpoint directory."""
    target = Path(target)
    if not target.exists():
        raise no_such_path(target)
    if holds_checkpoint(target) or step_of(target) >= 0:
        yield "disk", target
        return
    config = RunDir(target).config
    if config.is_file():
        from lmforge.checkpoint.tiers import memory_root

        ck = json.loads(config.read_text()).get("checkpoint", {})
        yield from (("disk", p) for p in _step_dirs(target / ck.get("folder", "checkpoints")))
        if ck.get("memory_interval"):
            yield from (("memory", p) for p in _step_dirs(memory_root(ck.get("memory_dir", "/dev/shm/lmforge"),
                                                                        target)))
        return
    yield from (("disk", p) for p in _step_dirs(target))


def inspect_rows(path: Path) -> list[tuple[str, str, str, int, str]]:
    """(key, shape, dtype, bytes, where) per stored tensor; where = "" or "base step-N" or the
    stored form of a lossy moment."""
    path = Path(path)
    manifest, why = read_manifest(path)
    if manifest is None:
        raise CheckpointError(f"checkpoint {path}: {why}")
    refs = set(manifest.get("refs", [])) if manifest.get("kind") == "incremental" else set()
    rows = []
    for key, md in sorted(saved_metadata(path).items()):
        where = f"base {manifest['base']}" if key in refs else ""
        if isinstance(md, TensorStorageMetadata):
            dtype = md.properties.dtype
            nbytes = int(torch.Size(md.size).numel()) * torch.empty((), dtype=dtype).element_size()
            rows.append((key, "x".join(map(str, md.size)) or "()", str(dtype).replace("torch.", ""), nbytes, where))
        elif isinstance(md, BytesStorageMetadata):
            rows.append((key, "-", "bytes", 0, where))
    return rows


def _read_raw(path: Path) -> dict[str, Any]:
    sd: dict[str, Any] = {}  # filled by the planner from the metadata (as in dcp_to_torch_save)
    with quiet_no_dist():
        _load_state_dict(sd, storage_reader=dcp.FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    flat, _ = flatten_state_dict(sd)
    return flat


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The whole checkpoint as one flat dict {DCP key: value}, verified first; incremental
    references resolved, lossy optimizer moments decoded to fp32 under their plain key, each
    parameter's optimizer group options ("optim.param_groups.<fqn>") as a dict."""
    path = Path(path)
    v = verify_checkpoint(path)
    if not v.ok:
        raise CheckpointError(f"checkpoint {path}: {v.reason}")
    manifest, _ = read_manifest(path)
    assert manifest is not None
    flat = _read_raw(path)
    base = base_of(path, manifest)
    if base is not None:
        from_base = _read_raw(base)
        flat.update({k: from_base[k] for k in manifest["refs"]})
    block = int(manifest.get("quant_block", 256))
    for k in [k for k in flat if k.endswith(BF16)]:
        flat[k[: -len(BF16)]] = flat.pop(k).float()
    for k in [k for k in flat if k.endswith(INT8)]:
        name = k[: -len(INT8)]
        value = dequantize_int8(flat.pop(k), flat.pop(name + SCALE), block)
        flat[name] = value.square() if name.endswith("exp_avg_sq") else value
    for k in [k for k in flat if is_group_options(k) and isinstance(flat[k], bytes)]:
        flat[k] = unpack(flat[k])  # a parameter's group options, stored as one packed entry
    return flat


def convert_to_torch(path: Path, out: Path) -> dict[str, Any]:
    """One consolidated `torch.save` file: {"model": {fqn: tensor}, "optim": {...}, <key>: {...}}
    (second-level keys are the rest of the DCP key), written to a temp file then renamed."""
    flat = read_checkpoint(path)
    nested: dict[str, dict[str, Any]] = {}
    for k, value in flat.items():
        top, _, rest = k.partition(".")
        nested.setdefault(top, {})[rest] = value
    with atomic_open(Path(out), "wb") as f:
        torch.save(nested, f)
    return nested

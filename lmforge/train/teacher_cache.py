"""A disk cache of a teacher's outputs, one entry per training window, for distillation with
`distill.teacher_logits = "cache"`.

An entry is keyed by the window itself: the sha256 of its input token ids. So a resume, another
data-parallel layout, another shuffle seed or another student on the same data finds the same
entries (what a key by loader position gives, and it cannot serve a stale entry when the data
changes). Each entry is one safetensors file `<dir>/<key[:2]>/<key>.safetensors`, written temp
then rename, holding the teacher's whole logits (`cache_top_k = 0`) or its top-k log-probabilities
at the temperature with their token ids, and in its metadata the key and a sha256 of its tensors;
a read checks both and the shapes, and a bad entry is recomputed and rewritten (one warning).

`manifest.json` states what the entries are: the teacher (a fingerprint of its config and
weights), vocabulary, sequence length, top-k, dtype and, for top-k entries, the temperature. A
cache made for anything else is refused in one line (ConfigError on distill.cache_dir).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from lmforge.config import ConfigError, ModelConfig
from lmforge.storage.atomic import atomic_open, write_text_atomic
from lmforge.train.distill_loss import TeacherTargets

log = logging.getLogger("lmforge.train.distill")

FORMAT = "lmforge-teacher-logits/1"
MANIFEST = "manifest.json"


# Config fields that do not change the function a loaded model computes: sizes its weights' shapes
# already say (a Hugging Face export states the FFN width where a recipe gave multiple_of),
# initialisation and training-only coefficients, and the attention kernel (the same mask).
_NOT_FUNCTION = {"": ("ffn_hidden", "multiple_of", "ffn_dim_multiplier", "init_std"), "attention": ("backend",),
                 "moe": ("aux_loss_coef", "z_loss_coef", "bias_update_rate")}


def teacher_fingerprint(model: nn.Module, cfg: ModelConfig) -> str:
    """sha256 of what decides the teacher's outputs: its config (less `_NOT_FUNCTION`) and weights
    (by parameter name): the same teacher loaded from a run, a checkpoint or its Hugging Face export
    has the same fingerprint."""
    described = asdict(cfg)
    for section, keys in _NOT_FUNCTION.items():
        for key in keys:
            (described[section] if section else described).pop(key, None)
    h = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def window_key(tokens: torch.Tensor) -> str:
    """The key of one window: sha256 of its input token ids as little-endian int64."""
    return hashlib.sha256(tokens.detach().cpu().numpy().astype("<i8").tobytes()).hexdigest()


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_metadata(blob: bytes) -> dict[str, str]:
    """The `__metadata__` table of a safetensors blob (its 8-byte length, then the JSON header)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    return header.get("__metadata__", {}) if isinstance(header, dict) else {}


class TeacherLogitCache:
    """Entries under `root` for one teacher, temperature and data shape (see the module docstring)."""

    def __init__(self, root: Path, *, fingerprint: str, source: str, vocab_size: int, seq_len: int, top_k: int,
                 dtype: torch.dtype, temperature: float):
        self.root = Path(root)
        self.vocab_size, self.seq_len, self.top_k, self.dtype = vocab_size, seq_len, top_k, dtype
        self.temperature = temperature
        self.spec = {"format": FORMAT, "teacher": fingerprint, "vocab_size": vocab_size, "seq_len": seq_len,
                     "top_k": top_k, "dtype": str(dtype).removeprefix("torch."),
                     "temperature": temperature if top_k else None,  # whole logits do not depend on it
                     "key": "sha256 of the window's input token ids (little-endian int64)"}
        self._open(source)

    def _open(self, source: str) -> None:
        path = self.root / MANIFEST
        if path.is_file():
            try:
                found = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError("distill.cache_dir", str(self.root), f"has an unreadable {MANIFEST} ({e}); "
                                  "delete the directory or choose another") from None
            for key, want in self.spec.items():
                if found.get(key) != want:
                    raise ConfigError("distill.cache_dir", str(self.root),
                                      f"holds teacher outputs for {key} = {found.get(key)!r}, this run needs "
                                      f"{want!r}; choose another directory (or delete this one)")
            return
        write_text_atomic(path, json.dumps({**self.spec, "teacher_source": source}, indent=1))

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        if self.top_k:
            return {"logprobs": (self.seq_len, self.top_k), "ids": (self.seq_len, self.top_k)}
        return {"logits": (self.seq_len, self.vocab_size)}

    def read(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry of window `key`, or None when there is none or it fails its checks (warned)."""
        path = self.path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            meta = _read_metadata(blob)
            tensors = load_safetensors(blob)
            ok = (meta.get("key") == key and meta.get("sha256") == _tensor_digest(tensors)
                  and {k: tuple(v.shape) for k, v in tensors.items()} == self._shapes())
        except Exception as e:  # noqa: BLE001 (truncated or foreign files: recompute, never fail the run)
            ok, tensors = False, {}
            log.debug("teacher cache entry %s unreadable: %s", path, e)
        if not ok:
            log.warning("teacher cache entry %s is corrupt or foreign: recomputing it", path)
            return None
        return tensors

    def write(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        blob = save_safetensors(tensors, metadata={"key": key, "sha256": _tensor_digest(tensors)})
        with atomic_open(self.path(key), "wb") as f:
            f.write(blob)

    def entry(self, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """What is stored for one window's (seq, vocab) teacher logits."""
        if not self.top_k:
            return {"logits": teacher_logits.to(self.dtype)}
        log_p = torch.log_softmax(teacher_logits.float() / self.temperature, dim=-1)
        values, ids = log_p.topk(self.top_k, dim=-1)
        return {"logprobs": values.to(self.dtype), "ids": ids.to(torch.int32)}

    @staticmethod
    def targets(entries: list[dict[str, torch.Tensor]], device: torch.device) -> TeacherTargets:
        """The rows of several windows' entries, in order, as the loss takes them."""
        if "logits" in entries[0]:
            return TeacherTargets(logits=torch.cat([e["logits"] for e in entries]).to(device, torch.float32))
        return TeacherTargets(topk_logprobs=torch.cat([e["logprobs"] for e in entries]).to(device, torch.float32),
                              topk_ids=torch.cat([e["ids"] for e in entries]).to(device, torch.int64))


def cache_bytes_per_window(seq_len: int, vocab_size: int, top_k: int, dtype: torch.dtype) -> int:
    """Disk bytes of one entry's tensors (without the small safetensors header)."""
    width = torch.finfo(dtype).bits // 8
    return seq_len * (top_k * (width + 4) if top_k else vocab_size * width)


__all__ = ["TeacherLogitCache", "cache_bytes_per_window", "teacher_fingerprint", "window_key"]

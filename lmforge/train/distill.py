"""Knowledge distillation inside the trainer: the student (the recipe's model, any data-parallel
layout) learns from alpha * T^2 * KL(teacher || student) at temperature T + (1 - alpha) * CE
(train/distill_loss.py), the teacher's logits computed on the fly or read from a disk cache
(train/teacher_cache.py).

The teacher is loaded by the CLI (`lmforge distill`/`train` with `distill.teacher`: a run, a
checkpoint or a Hugging Face directory, through lmforge/serve's loader) and handed to the Trainer
as a `Teacher`, so `train` needs no loader of its own. Every rank holds a whole copy of the
teacher in eval mode and runs it without gradients on its own micro-batch (data parallelism only:
config/distill.py refuses tp, pp and ep). `check_teacher` refuses, in one line before any process
group, a teacher whose vocabulary, context or tokenizer does not fit the student.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import ConfigError, JobConfig, ModelConfig
from lmforge.config.distill import DistillConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.models.common.sparse_attention import document_starts
from lmforge.train.distill_loss import TeacherTargets, distill_loss
from lmforge.train.precision import autocast_context
from lmforge.train.teacher_cache import TeacherLogitCache, teacher_fingerprint, window_key

__all__ = ["Distiller", "Teacher", "build_distiller", "check_teacher"]

# Parts of tokenizer.json that decide which ids a text gets (not padding or truncation settings).
_TOKENIZER_PARTS = ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor")


@dataclass(frozen=True)
class Teacher:
    """A loaded teacher: the model (eval mode), its config, its tokenizer.json (None when it has
    none) and what was loaded (a checkpoint step directory or a Hugging Face directory)."""

    model: nn.Module
    cfg: ModelConfig
    tokenizer: Path | None
    source: str


def _tokenizer_parts(path: Path, key: str, value: str) -> tuple[dict, int]:
    """The parts of a tokenizer.json that decide ids, and its number of tokens; ConfigError if unreadable."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        parts = {k: d.get(k) for k in _TOKENIZER_PARTS}
        vocab = parts["model"].get("vocab", {}) if isinstance(parts["model"], dict) else {}
        return parts, len(vocab) + len(parts["added_tokens"] or [])
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError(key, value, f"{path} is not a readable tokenizer.json ({e.__class__.__name__}: "
                          f"{' '.join(str(e).split())})") from None


def check_teacher(teacher: Teacher, job: JobConfig, student_tokenizer: Path | None) -> None:
    """Refuse (ConfigError, one line) a teacher the student cannot be distilled from: another
    vocabulary size, a shorter context than train.seq_len, no tokenizer, or a tokenizer other than
    the student's (`student_tokenizer`, when the student's data is prepared; the trainer checks
    again after its data stage)."""
    where, tcfg = teacher.source, teacher.cfg
    if tcfg.vocab_size != job.model.vocab_size:
        raise ConfigError("distill.teacher", job.distill.teacher,
                          f"its vocabulary has {tcfg.vocab_size} ids (model.vocab_size of {where}), the student's "
                          f"{job.model.vocab_size}; the KL compares the two distributions id by id, so teacher and "
                          "student need the same tokenizer and vocabulary")
    if tcfg.max_seq_len < job.train.seq_len:
        raise ConfigError("distill.teacher", job.distill.teacher,
                          f"its context is {tcfg.max_seq_len} tokens, shorter than train.seq_len "
                          f"({job.train.seq_len}); lower train.seq_len or use another teacher")
    if teacher.tokenizer is None:
        raise ConfigError("distill.teacher", job.distill.teacher,
                          f"{where} has no tokenizer.json, so it cannot be checked against the student's; "
                          "distillation needs both to use the same tokenizer")
    if student_tokenizer is None or not Path(student_tokenizer).is_file():
        return
    mine, n_mine = _tokenizer_parts(student_tokenizer, "data.dir", job.data.dir)
    theirs, n_theirs = _tokenizer_parts(teacher.tokenizer, "distill.teacher", job.distill.teacher)
    if mine != theirs:
        raise ConfigError("distill.teacher", job.distill.teacher,
                          f"its tokenizer ({teacher.tokenizer}, {n_theirs} tokens) differs from the student's "
                          f"({student_tokenizer}, {n_mine} tokens): the same ids would mean other text; distil "
                          "onto data packed with the teacher's tokenizer")


class Distiller:
    """Replaces the trainer's cross-entropy by the distillation loss on each micro-batch and keeps
    its parts (distill_kl, distill_ce; the cache's hit fraction and, for a top-k cache, the teacher's
    mean probability mass outside the kept tokens, distill_teacher_tail) for each log window."""

    def __init__(self, cfg: DistillConfig, teacher: Teacher, device: torch.device, precision: str,
                 eos_id: int, cache: TeacherLogitCache | None):
        self.cfg, self.device, self.precision, self.cache = cfg, device, precision, cache
        self.teacher = teacher.model.to(device).eval().requires_grad_(False)
        self.eos_id = eos_id if teacher.cfg.attention.doc_mask else None  # the teacher as it was trained
        # kl, ce, micro-batches, cache hits, the teacher's mass outside a top-k cache's tokens (summed per window)
        self._sums = torch.zeros(5, dtype=torch.float64, device=device)
        self._windows = 0  # windows looked up in the cache this log window

    @torch.no_grad()
    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        doc_start = document_starts(x, self.eos_id) if self.eos_id is not None else None
        with autocast_context(self.precision, self.device):
            logits = self.teacher(x) if doc_start is None else self.teacher(x, doc_start=doc_start)
        return logits.float()

    def targets(self, x: torch.Tensor) -> TeacherTargets:
        """The teacher's distribution for the micro-batch `x` (batch, seq): computed, or read from the
        cache (the missing windows computed in one teacher forward and written)."""
        if self.cache is None:
            return TeacherTargets(logits=self._teacher_logits(x).flatten(0, 1))
        keys = [window_key(row) for row in x]
        entries = [self.cache.read(k) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            logits = self._teacher_logits(x[missing])
            for j, i in enumerate(missing):
                entries[i] = self.cache.entry(logits[j])
                self.cache.write(keys[i], entries[i])
        self._sums[3] += len(keys) - len(missing)
        self._windows += len(keys)
        targets = self.cache.targets(entries, self.device)
        if targets.topk_logprobs is not None:  # how much of the teacher the top-k leaves out
            self._sums[4] += (1.0 - targets.topk_logprobs.exp().sum(-1)).clamp_min(0).mean().double() * len(keys)
        return targets

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The micro-batch's distillation loss (differentiable; the trainer's cross-entropy's place)."""
        loss, kl, ce = distill_loss(logits, y, self.targets(x), self.cfg.alpha, self.cfg.temperature,
                                    self.cfg.chunk_tokens)
        self._sums[:3] += torch.stack([kl.double(), ce.double(), torch.ones((), dtype=torch.float64,
                                                                             device=kl.device)])
        return loss

    def window_metrics(self, group: dist.ProcessGroup | None) -> dict[str, float]:
        """Mean KL and CE per token over the micro-batches since the last call, over the data-parallel
        ranks (one small all-reduce, at log steps only), and the cache's hit fraction."""
        sums = torch.cat([self._sums, torch.tensor([float(self._windows)], dtype=torch.float64,
                                                   device=self._sums.device)])
        if group is not None:
            dist.all_reduce(sums, group=group)
        self._sums.zero_()
        self._windows = 0
        kl, ce, n, hits, tail, windows = sums.tolist()
        out = {"distill_kl": kl / max(n, 1.0), "distill_ce": ce / max(n, 1.0)}
        if self.cache is not None:
            out["distill_cache_hit"] = hits / max(windows, 1.0)
        if self.cache is not None and self.cache.top_k:
            out["distill_teacher_tail"] = tail / max(windows, 1.0)
        return out


def build_distiller(cfg: JobConfig, teacher: Teacher | None, data_dir: Path, device: torch.device
                    ) -> tuple[Distiller | None, JobConfig]:
    """The Distiller of a run with `distill.teacher` set (None otherwise), checked against the
    prepared data's tokenizer, and the config with `distill.teacher_resolved` filled in."""
    d = cfg.distill
    if not d.enabled:
        if teacher is not None:
            raise ValueError("a teacher was given to a run without distill.teacher")
        return None, cfg
    if teacher is None:
        raise ConfigError("distill.teacher", d.teacher, "is set, but no teacher was loaded: start the run with "
                          "`lmforge distill` or `lmforge train` (they load it)")
    check_teacher(teacher, cfg, data_dir / "tokenizer.json")
    cache = None
    if d.teacher_logits == "cache":
        root = Path(d.cache_dir) if d.cache_dir else Path(cfg.train.output_dir) / "teacher_logits"
        cache = TeacherLogitCache(root, fingerprint=teacher_fingerprint(teacher.model, teacher.cfg),
                                  source=teacher.source, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len,
                                  top_k=d.cache_top_k, dtype=torch.float16 if d.cache_dtype == "fp16" else torch.float32,
                                  temperature=d.temperature)
    eos_id = TextTokenizer.from_file(data_dir / "tokenizer.json").eos_id
    distiller = Distiller(d, teacher, device, cfg.train.mixed_precision, eos_id, cache)
    return distiller, replace(cfg, distill=replace(d, teacher_resolved=teacher.source))

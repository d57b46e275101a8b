"""The `[distill]` section: knowledge distillation from a teacher model into the recipe's model
(lmforge.train.distill). Off while `teacher` is empty; `lmforge distill RECIPE --teacher T` sets it.

The student's loss is alpha * T^2 * KL(teacher || student) at temperature T + (1 - alpha) *
cross-entropy (Hinton et al. 2015: the T^2 keeps the KL's gradients at the scale of the CE's).
The teacher's logits are computed on the fly ("online") or read from a disk cache of per-window
entries ("cache": computed once, then reused by a resume, another layout or another student);
`cache_top_k` > 0 keeps only the teacher's k most likely tokens per position (see train/distill.py
for what that approximates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.config.checks import require

TEACHER_LOGITS = ("online", "cache")


@dataclass
class DistillConfig:
    teacher: str = ""  # a run dir (newest checkpoint), a checkpoint step dir or a Hugging Face dir; "" = off
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs the cross-entropy with the data
    temperature: float = 2.0  # softens both distributions in the KL term
    teacher_logits: Literal["online", "cache"] = "online"
    cache_dir: str = ""  # cache mode: where the entries live ("" = <train.output_dir>/teacher_logits)
    cache_top_k: int = 64  # cache mode: teacher tokens kept per position (0 = the whole vocabulary)
    cache_dtype: Literal["fp16", "fp32"] = "fp16"  # cache mode: dtype of the stored values
    chunk_tokens: int = 0  # tokens per chunk of the KL / CE computation (0: ~2 MiB of fp32 rows, a core's L2)
    teacher_resolved: str = ""  # written by the trainer: the checkpoint or directory it loaded (config.json)

    @property
    def enabled(self) -> bool:
        return self.teacher != ""

    def validate(self) -> None:
        require(0.0 <= self.alpha <= 1.0, "distill.alpha", self.alpha, "must be in [0, 1] (weight of the KL term)")
        require(0.0 < self.temperature <= 100.0, "distill.temperature", self.temperature,
                "must be in (0, 100] (typical 1 to 4)")
        require(self.cache_top_k >= 0, "distill.cache_top_k", self.cache_top_k,
                "must be >= 0 (0: cache the whole vocabulary)")
        require(self.chunk_tokens >= 0, "distill.chunk_tokens", self.chunk_tokens,
                "must be >= 0 (0: chunks of ~2 MiB of fp32 rows)")
        require(self.teacher_logits == "cache" or self.cache_dir == "", "distill.cache_dir", self.cache_dir,
                "is read only with distill.teacher_logits = 'cache'")

    def validate_layout(self, tp: int, pp: int, ep: int, vocab_size: int) -> None:
        """What the distillation loss needs of the student's layout, checked before any process group:
        every rank holds its micro-batch's whole-vocabulary logits (data parallel: DDP, FSDP2, HSDP)."""
        if not self.enabled:
            return
        for key, degree, why in (
                ("parallel.tp", tp, "tensor parallelism shards the logits over the vocabulary"),
                ("parallel.pp", pp, "pipeline parallelism computes the loss inside the schedule's last stage"),
                ("parallel.ep", ep, "expert parallelism is not covered by the distillation parity tests")):
            require(degree == 1, key, degree, f"must be 1 with distill.teacher set: distillation runs with data "
                    f"parallelism (DDP, FSDP2, HSDP) only; {why}")
        require(self.cache_top_k < vocab_size, "distill.cache_top_k", self.cache_top_k,
                f"must be < model.vocab_size ({vocab_size}); 0 caches the whole vocabulary")

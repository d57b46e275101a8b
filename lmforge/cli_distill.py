"""`lmforge distill STUDENT_RECIPE --teacher RUN|CKPT|HF_DIR [--distill.key value ...] [--nproc N]`:
`lmforge train` with `distill.teacher` set, on the same path (recipe and overrides, torchrun with
--nproc, the run directory's lock, checkpoints, resume, metrics). The teacher is loaded here,
through lmforge/serve's loader (runs, checkpoints, Hugging Face directories), checked against the
student before any process group, and handed to the Trainer; the loss is in lmforge/train/distill.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from lmforge.config import ConfigError, JobConfig
from lmforge.config.loader import load_toml
from lmforge.storage.explain import describe_os_error
from lmforge.storage.model_dir import ModelDirError, model_dir_kind

__all__ = ["add_distill_command", "check_teacher_path", "load_teacher"]

USAGE = ("%(prog)s STUDENT_RECIPE.toml --teacher RUN|CKPT|HF_DIR [--distill.alpha A] [--distill.temperature T] "
         "[--distill.teacher_logits online|cache] [--section.key value ...] [--nproc N] [--overwrite]")

EPILOG = """[distill] keys (recipe or --distill.KEY VALUE):
  alpha 0.5            weight of T^2 * KL(teacher || student); 1 - alpha weighs the cross-entropy
  temperature 2.0      softens both distributions in the KL
  teacher_logits       online (the teacher runs on every micro-batch) | cache (per-window entries on disk)
  cache_dir            cache mode: where ("" = <train.output_dir>/teacher_logits); shareable between students
  cache_top_k 64       cache mode: teacher tokens kept per position, the rest one tail bucket (0: all, exact)
  cache_dtype fp16     cache mode: fp16 | fp32 (fp32 with cache_top_k 0 reproduces online mode exactly)
  chunk_tokens 0       tokens per chunk of the loss (bounds its memory; 0: ~2 MiB of fp32 rows)
Layouts: data parallel only (DDP, FSDP2, HSDP); every rank holds a whole copy of the teacher."""


def _unloadable(cfg: JobConfig, why: str) -> ConfigError:
    return ConfigError("distill.teacher", cfg.distill.teacher, f"cannot be loaded: {' '.join(why.split())}")


def check_teacher_path(cfg: JobConfig) -> None:
    """A `distill.teacher` that is missing or no model directory, answered from its marker files
    before torch loads (storage/model_dir.py: the loader classifies through the same function)."""
    if not cfg.distill.enabled:
        return
    try:
        model_dir_kind(cfg.distill.teacher)
    except OSError as e:
        raise _unloadable(cfg, describe_os_error(e)) from None
    except ModelDirError as e:
        raise _unloadable(cfg, str(e)) from None


def load_teacher(cfg: JobConfig):
    """None unless `distill.teacher` is set; else the teacher (a train.distill.Teacher, on the CPU)
    loaded and checked against the student's model, train.seq_len and (when its data is prepared)
    tokenizer. Any failure is one ConfigError line naming distill.teacher."""
    if not cfg.distill.enabled:
        return None
    from lmforge.checkpoint.errors import CheckpointError
    from lmforge.interop.hf.base import HFFormatError
    from lmforge.serve.generate import GenerationError, load_source, resolve_source
    from lmforge.train.distill import Teacher, check_teacher

    try:
        src = resolve_source(Path(cfg.distill.teacher))
        model, tcfg, tokenizer = load_source(src)
    except OSError as e:
        raise _unloadable(cfg, describe_os_error(e)) from None
    except (GenerationError, CheckpointError, HFFormatError, ConfigError, ModelDirError) as e:
        raise _unloadable(cfg, str(e)) from None
    teacher = Teacher(model, tcfg, tokenizer, str(src.step_dir or src.path))
    check_teacher(teacher, cfg, Path(cfg.data.dir) / "tokenizer.json")
    return teacher


def _take_teacher(overrides: list[str]) -> tuple[str | None, list[str]]:
    """`--teacher PATH` or `--teacher=PATH` out of the override list."""
    rest, teacher, i = [], None, 0
    while i < len(overrides):
        arg = overrides[i]
        if arg == "--teacher" or arg.startswith("--teacher="):
            if "=" in arg:
                teacher = arg.split("=", 1)[1]
            elif i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
                teacher, i = overrides[i + 1], i + 1
            else:
                raise ConfigError("--teacher", None, "needs a path: a run, a checkpoint step or a Hugging Face "
                                  "directory", "command line")
            i += 1
            continue
        rest.append(arg)
        i += 1
    return teacher, rest


def _recipe_names_teacher(recipe: str | None, overrides: list[str]) -> bool:
    if any(a == "--distill.teacher" or a.startswith("--distill.teacher=") for a in overrides):
        return True
    section = load_toml(recipe).get("distill", {}) if recipe else {}
    return isinstance(section, dict) and bool(section.get("teacher"))


def add_distill_command(sub: argparse._SubParsersAction, train: Callable[[argparse.Namespace], int]) -> None:
    """Register `lmforge distill`; `train` is cmd_train, whose path the command runs."""

    def cmd_distill(args: argparse.Namespace) -> int:
        teacher, args.overrides = _take_teacher(args.overrides)
        if teacher is not None:
            args.overrides += ["--distill.teacher", teacher]
        elif not _recipe_names_teacher(args.recipe, args.overrides):
            raise ConfigError("--teacher", None, "lmforge distill needs a teacher: --teacher RUN|CKPT|HF_DIR "
                              "(or distill.teacher in the recipe)", "command line")
        return train(args)

    p = sub.add_parser("distill", help="train a student recipe from a teacher's logits (knowledge distillation)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.usage = USAGE
    p.set_defaults(func=cmd_distill)

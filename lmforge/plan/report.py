"""What `lmforge plan` prints and writes: the ranked layouts with their memory and time
breakdowns, and the chosen layout as a recipe TOML that `lmforge train` runs as is."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from lmforge.config import JobConfig
from lmforge.plan.search import Candidate
from lmforge.storage.atomic import write_text_atomic


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def layout_name(job: JobConfig) -> str:
    p, t = job.parallel, job.train
    parts = [f"tp{p.tp}", f"pp{p.pp}", f"rep{p.dp_replicate}", f"shard{p.dp_shard}"]
    if p.ep > 1:
        parts.append(f"ep{p.ep}")
    if p.pp > 1:
        parts.append(f"{p.pp_schedule}x{p.pp_microbatches}")
    parts.append(f"mb{t.micro_batch_size}")
    if t.activation_checkpointing != "none":
        parts.append(f"ac-{t.activation_checkpointing}")
    return " ".join(parts)


def format_ranking(cands: list[Candidate], dropped: int, top: int) -> list[str]:
    """The `top` best layouts: tokens/s, per-rank memory and step-time breakdowns."""
    lines = [f"{len(cands)} layouts fit, {dropped} valid layouts do not fit; best {min(top, len(cands))}:",
             f"{'#':>3} {'layout':<44} {'tok/s':>10} {'step s':>8} {'mem GiB':>8}  memory (params/grads/optim/act/"
             "in-flight/temp GiB) | time (compute/recompute/optim/overhead/comm/bubble s)"]
    for i, c in enumerate(cands[:top], 1):
        p, m, s = c.prediction, c.prediction.memory, c.prediction.step_time
        mem = "/".join(_gib(v) for v in (m.params, m.grads, m.optimizer, m.activations, m.in_flight, m.temporary))
        tim = "/".join(f"{v:.3g}" for v in (s.compute, s.recompute, s.optimizer, s.overhead, s.exposed_comm, s.bubble))
        lines.append(f"{i:>3} {layout_name(c.job):<44} {p.tokens_per_s:>10,.0f} {s.total:>8.3g} {_gib(m.total):>8}  "
                     f"{mem} | {tim}")
    if cands:
        lines.append("assumptions: " + "; ".join(cands[0].prediction.notes))
    return lines


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if dataclasses.is_dataclass(v):  # an element of a list of tables (train.unfreeze): an inline table
        return "{" + ", ".join(f"{f.name} = {_toml_value(getattr(v, f.name))}" for f in dataclasses.fields(v)) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _tables(prefix: str, obj: Any, out: list[str]) -> None:
    scalars, nested = [], []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            nested.append((f.name, v))
        elif v is not None:
            scalars.append(f"{f.name} = {_toml_value(v)}")
    if prefix:
        out.append(f"\n[{prefix}]")
    out.extend(scalars)
    for name, v in nested:
        _tables(f"{prefix}.{name}" if prefix else name, v, out)


def recipe_toml(job: JobConfig, header: list[str]) -> str:
    """The whole JobConfig as TOML (every section, so the recipe does not depend on defaults)."""
    out = [f"# {line}" for line in header]
    _tables("", job, out)
    return "\n".join(out) + "\n"


def write_recipe(path: str | Path, job: JobConfig, header: list[str]) -> Path:
    path = Path(path)
    write_text_atomic(path, recipe_toml(job, header))
    return path

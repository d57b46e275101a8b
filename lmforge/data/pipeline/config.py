"""The pipeline TOML -> `PipelineConfig`, checked whole before any work starts.

Why strict: a misspelt option (`min_word = 5`) would silently run the default and filter the
corpus differently from what the user wrote; every unknown key, step type or wrong type is one
`ConfigError` line (exit code 2 from the CLI). Relative paths are relative to the TOML file.

    output_dir = "out"          # required
    workers = 1                 # worker processes
    docs_per_shard = 10000      # input records per shard (0: one shard per input file)
    compress = false            # kept documents as output.jsonl.zst instead of output.jsonl
    max_chars = 1000000         # longer documents are rejected ("oversized_document")
    executor = "local"          # or "ray": the same shards as Ray tasks (output byte-identical)
    ray_address = ""            # "" starts a local Ray instance; "auto" or "ray://host:10001" joins one

    [[inputs]]
    path = "raw/web.jsonl.zst"  # a file, or a directory (every matching file in it, sorted)
    format = "jsonl"            # jsonl (.jsonl, .jsonl.gz, .jsonl.zst) | parquet | text
    text_field = "text"         # jsonl and parquet

    [[steps]]
    type = "normalize"          # options: steps.NormalizeConfig (form = "NFC" | "NFKC" | "none", ...)
    [[steps]]
    type = "quality"            # options: steps.QualityConfig (min_words = 50, ...)
    disable = ["min_stop_words"]  # rules switched off (TOML has no null)
    [[steps]]
    type = "exact_dedup"        # options: dedup.ExactDedupConfig (index = "hashes.jsonl": across runs)
    [[steps]]
    type = "near_dedup"         # options: dedup.NearDedupStepConfig (threshold = 0.8, bands = 16, ...)
    [[steps]]
    type = "lm_score"           # options: lm_score.LmScoreConfig (reference = "ref.jsonl", max_perplexity
                                # = 500.0 per shard, or keep_top_fraction = 0.8 as a global step)
    [[steps]]
    type = "lexicon"            # options: lexicon.LexiconConfig (lexicons = ["terms.txt"], max_hits = 0)
    [[steps]]
    type = "harmful"            # options: harmful.HarmfulConfig (filter = "filter.toml", categories, max_hits = 0)
    [[steps]]
    type = "eda"                # options: eda.EdaConfig (synonyms = "syn.txt", copies = 4, seed = 0, ...)
    [[steps]]
    type = "domain"             # options: domains.DomainConfig: labels metadata["domain"], drops nothing
    keywords = ["bible: god israel unto", "code: def return import"]  # or method = "kmeans", n_clusters = 3
    [[steps]]
    type = "synthetic"          # options: synthetic.SyntheticConfig (human, machine, max_score | keep_top_fraction)
    human = "reference.jsonl"
    machine = "samples.jsonl"   # lmforge data sample RUN --reference reference.jsonl --out samples.jsonl
    max_score = 0.5
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.config.loader import ConfigError, build_dataclass, load_toml

__all__ = ["InputConfig", "PipelineConfig", "StepSpec", "load_pipeline_config"]


@dataclass(frozen=True)
class InputConfig:
    path: str
    format: Literal["jsonl", "parquet", "text"] = "jsonl"
    text_field: str = "text"


@dataclass(frozen=True)
class StepSpec:
    """One `[[steps]]` entry: its type name and its options, already checked against the step's
    config dataclass."""

    type: str
    options: Any


@dataclass(frozen=True)
class PipelineConfig:
    output_dir: str
    inputs: list[InputConfig]
    steps: list[StepSpec] = field(default_factory=list)
    workers: int = 1
    docs_per_shard: int = 10000
    compress: bool = False
    max_chars: int = 1_000_000
    executor: Literal["local", "ray"] = "local"
    ray_address: str = ""


_TOP = {"output_dir", "workers", "docs_per_shard", "compress", "max_chars", "inputs", "steps", "executor",
        "ray_address"}


def _step_types() -> dict[str, tuple[type, type]]:
    # imported here: the step modules import the config loader, not this module; no cycle at load
    from lmforge.data.pipeline.dedup import GLOBAL_STEP_TYPES
    from lmforge.data.pipeline.steps import STEP_TYPES

    return {**STEP_TYPES, **GLOBAL_STEP_TYPES}


def _relative_to(cfg: Any, base: Path) -> Any:
    """`cfg` with its `PATH_FIELDS` (a str or a list of str) made relative to the TOML's folder;
    empty values, absolute paths and "default:<name>" names stay as they are."""
    def resolve(value: str) -> str:
        keep = not value or value.startswith("default:") or Path(value).is_absolute()
        return value if keep else str(base / value)

    changes = {}
    for name in getattr(cfg, "PATH_FIELDS", ()):
        value = getattr(cfg, name)
        changes[name] = [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def parse_pipeline(data: dict[str, Any], base: Path, where: str) -> PipelineConfig:
    """Build and check a `PipelineConfig` from a parsed TOML table (`base`: where relative paths
    start)."""
    for key, value in data.items():
        if key not in _TOP:
            raise ConfigError(key, value, "unknown key; allowed: " + ", ".join(sorted(_TOP)), where)
    if "output_dir" not in data:
        raise ConfigError("output_dir", None, "is required (the directory the pipeline writes)", where)
    raw_inputs = data.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ConfigError("inputs", raw_inputs, "needs at least one [[inputs]] table with a path", where)
    inputs = []
    for i, table in enumerate(raw_inputs):
        if not isinstance(table, dict) or "path" not in table:
            raise ConfigError(f"inputs[{i}]", table, "must be a table with a path", where)
        inp = build_dataclass(InputConfig, table, f"inputs[{i}].", where)
        path = Path(inp.path) if Path(inp.path).is_absolute() else base / inp.path
        if not path.exists():
            raise ConfigError(f"inputs[{i}].path", inp.path, f"does not exist ({path})", where)
        inputs.append(dataclasses.replace(inp, path=str(path)))
    steps = []
    types = _step_types()
    raw_steps = data.get("steps", [])
    if not isinstance(raw_steps, list):
        raise ConfigError("steps", raw_steps, "must be a list of [[steps]] tables", where)
    for i, table in enumerate(raw_steps):
        if not isinstance(table, dict) or "type" not in table:
            raise ConfigError(f"steps[{i}]", table, "must be a table with a type", where)
        options = dict(table)
        kind = options.pop("type")
        if kind not in types:
            raise ConfigError(f"steps[{i}].type", kind, "unknown step type; known: " + ", ".join(sorted(types)), where)
        step_cls, cfg_cls = types[kind]
        cfg = build_dataclass(cfg_cls, options, f"steps[{i}].", where)
        cfg = _relative_to(cfg, base)
        check = getattr(cfg, "validate", None)
        if check is not None:
            check(f"steps[{i}].", where)
        steps.append(StepSpec(kind, cfg))
    scalars = {k: data[k] for k in ("workers", "docs_per_shard", "compress", "max_chars", "executor", "ray_address")
               if k in data}
    out = data["output_dir"]
    if not isinstance(out, str) or not out:
        raise ConfigError("output_dir", out, "must be a non-empty string", where)
    head = build_dataclass(PipelineConfig, {"output_dir": out, "inputs": [], **scalars}, "", where)
    if head.workers < 1:
        raise ConfigError("workers", head.workers, "must be >= 1", where)
    if head.docs_per_shard < 0:
        raise ConfigError("docs_per_shard", head.docs_per_shard, "must be >= 0 (0: one shard per input file)", where)
    if head.max_chars < 1:
        raise ConfigError("max_chars", head.max_chars, "must be >= 1", where)
    out_path = Path(out) if Path(out).is_absolute() else base / out
    return dataclasses.replace(head, output_dir=str(out_path), inputs=inputs, steps=steps)


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read and check PIPELINE.toml; any problem is one ConfigError line."""
    p = Path(path)
    return parse_pipeline(load_toml(p), p.resolve().parent, str(p))

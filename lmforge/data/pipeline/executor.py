"""Run a pipeline: plan deterministic shards, run the step chain per shard on N worker processes,
mark each finished shard, merge the shards in order.

Why shards with markers: a run over a large corpus will be interrupted. Each shard writes its
outputs under `<out>/shards/NNNNN/` and then `_DONE.json` LAST (atomic), so a rerun skips every
shard with a marker and redoes any shard without one from scratch (its directory is emptied
first): partial output is never taken as finished. Why the final output does not depend on the
worker count: the shards are fixed by the plan (input files and record ranges, not timing) and
are merged in shard order, so 1, 2 or 4 workers write identical bytes.

The plan is stored in `<out>/plan.json` with a fingerprint of the steps and the input files
(path, size, mtime); a rerun with a different pipeline or changed inputs into the same directory
is refused rather than mixing two runs' shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.errors import DataError
from lmforge.data.files import read_json, write_json_atomic
from lmforge.data.pipeline.config import PipelineConfig, StepSpec, load_pipeline_config
from lmforge.data.pipeline.document import Document, Reject
from lmforge.data.pipeline.readers import count_records, input_files, read_records, scan_jsonl, source_name
from lmforge.data.pipeline.steps import build_steps
from lmforge.data.pipeline.writers import jsonl_writer
from lmforge.storage.atomic import atomic_open

__all__ = ["Part", "RunResult", "Shard", "plan_shards", "run_pipeline", "run_pipeline_file", "run_shard"]

MARKER = "_DONE.json"
REJECTS = "rejects.jsonl"


@dataclass(frozen=True)
class Part:
    """Records [start, stop) of one input file (a text file: the whole file, start = stop = 0)."""

    path: str
    format: str
    source: str
    text_field: str
    start: int
    stop: int | None
    byte_offset: int | None = None  # jsonl: where line `start` begins in the decompressed stream


@dataclass(frozen=True)
class Shard:
    index: int
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class RunResult:
    output: Path
    rejects: Path
    shards: int
    skipped: int
    totals: dict[str, Any]


def _kept_name(compress: bool) -> str:
    return "output.jsonl.zst" if compress else "output.jsonl"


def plan_shards(cfg: PipelineConfig) -> list[Shard]:
    """Shards in a fixed order: inputs as listed, files sorted, each jsonl/parquet file cut into
    ranges of `docs_per_shard` records, text files grouped `docs_per_shard` files to a shard
    (0: one shard per jsonl/parquet file, one per text input)."""
    parts: list[tuple[Part, ...]] = []
    per = cfg.docs_per_shard
    for inp in cfg.inputs:
        root = Path(inp.path)
        files = input_files(root, inp.format)
        if inp.format == "text":
            group = per or max(len(files), 1)
            for i in range(0, len(files), group):
                parts.append(tuple(Part(str(f), "text", source_name(f, root), inp.text_field, 0, 0)
                                   for f in files[i:i + group]))
            continue
        for f in files:
            if inp.format == "jsonl":
                n, offsets = scan_jsonl(f, per)
            else:
                n, offsets = count_records(f, inp.format), []
            step = per or max(n, 1)
            for k, s in enumerate(range(0, n, step)):
                at = offsets[k] if k < len(offsets) else None
                parts.append((Part(str(f), inp.format, source_name(f, root), inp.text_field, s, min(s + step, n), at),))
    return [Shard(i, p) for i, p in enumerate(parts)]


def _fingerprint(cfg: PipelineConfig) -> str:
    """What decides the output bytes: the steps, the reading options, the input files' identity."""
    files = []
    for inp in cfg.inputs:
        for f in input_files(Path(inp.path), inp.format):
            st = f.stat()
            files.append([str(f), st.st_size, st.st_mtime_ns])
    doc = {"inputs": [dataclasses.asdict(i) for i in cfg.inputs], "files": files,
           "steps": [[s.type, dataclasses.asdict(s.options)] for s in cfg.steps],
           "docs_per_shard": cfg.docs_per_shard, "compress": cfg.compress, "max_chars": cfg.max_chars}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _load_or_plan(cfg: PipelineConfig, out: Path) -> list[Shard]:
    fp = _fingerprint(cfg)
    plan_path = out / "plan.json"
    saved = read_json(plan_path)
    if saved is not None:
        if saved.get("fingerprint") != fp:
            raise DataError(f"{out} holds a run of a different pipeline or of changed inputs (plan.json); "
                            "use another output_dir or delete this one")
        return [Shard(s["index"], tuple(Part(**p) for p in s["parts"])) for s in saved["shards"]]
    if (out / "shards").exists():
        raise DataError(f"{out}/shards exists without a plan.json; use another output_dir or delete this one")
    shards = plan_shards(cfg)
    write_json_atomic(plan_path, {"fingerprint": fp, "shards": [dataclasses.asdict(s) for s in shards]})
    return shards


def _items(shard: Shard, max_chars: int) -> Iterator[Document | Reject]:
    for p in shard.parts:
        yield from read_records(Path(p.path), p.format, p.source, p.text_field, max_chars, p.start, p.stop,
                                p.byte_offset)


def run_shard(out: Path, shard: Shard, steps: list[StepSpec], compress: bool, max_chars: int) -> tuple[dict, bool]:
    """Run one shard (or return its recorded counts when its marker exists): (counts, skipped)."""
    d = out / "shards" / f"{shard.index:05d}"
    done = read_json(d / MARKER)
    if done is not None and done.get("shard") == shard.index:
        return done, True
    if d.exists():
        shutil.rmtree(d)  # no marker: whatever is there is partial
    d.mkdir(parents=True)
    rejected: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    counts = {"records": 0, "kept": 0}
    with jsonl_writer(d / _kept_name(compress), compress) as kept, jsonl_writer(d / REJECTS) as rej:

        def drop(doc: Document, reason: str, detail: str) -> None:
            stage = doc.provenance[-1].step if doc.provenance else "step"
            rej.write(Reject(doc.id, doc.source, doc.offset, stage, reason, detail, tuple(doc.provenance)).as_json())
            dropped[f"{stage}.{reason}"] += 1

        def documents() -> Iterator[Document]:
            for item in _items(shard, max_chars):
                counts["records"] += 1
                if isinstance(item, Reject):
                    rej.write(item.as_json())
                    rejected[item.reason] += 1
                else:
                    yield item

        docs: Iterator[Document] = documents()
        for step in build_steps(steps, drop):
            docs = step.run(docs)
        for doc in docs:
            kept.write(doc.as_json())
            counts["kept"] += 1
    result = {"shard": shard.index, **counts, "rejected": dict(sorted(rejected.items())),
              "dropped": dict(sorted(dropped.items()))}
    write_json_atomic(d / MARKER, result)  # last: the shard is finished only now
    return result, False


def _run_shard_args(args: tuple) -> tuple[dict, bool]:
    return run_shard(*args)


def _merge(out: Path, n: int, name: str) -> Path:
    """Concatenate the shards' `name` files in shard order into `<out>/<name>` (zstd frames
    concatenate into a valid stream)."""
    target = out / name
    with atomic_open(target, "wb") as f:
        for i in range(n):
            with open(out / "shards" / f"{i:05d}" / name, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
    return target


def run_pipeline(cfg: PipelineConfig, log: Callable[[str], None] | None = None) -> RunResult:
    """Run `cfg` into `cfg.output_dir`, resuming a previous run of the same pipeline there."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = _load_or_plan(cfg, out)
    args = [(out, s, cfg.steps, cfg.compress, cfg.max_chars) for s in shards]
    if cfg.workers == 1 or len(shards) <= 1:
        results = [run_shard(*a) for a in args]
    else:
        with mp.get_context("spawn").Pool(min(cfg.workers, len(shards))) as pool:
            results = list(pool.imap(_run_shard_args, args, chunksize=1))
    totals: dict[str, Any] = {"records": 0, "kept": 0, "rejected": Counter(), "dropped": Counter()}
    for r, _ in results:
        totals["records"] += r["records"]
        totals["kept"] += r["kept"]
        totals["rejected"].update(r["rejected"])
        totals["dropped"].update(r["dropped"])
    totals["rejected"] = dict(sorted(totals["rejected"].items()))
    totals["dropped"] = dict(sorted(totals["dropped"].items()))
    skipped = sum(s for _, s in results)
    output = _merge(out, len(shards), _kept_name(cfg.compress))
    rejects = _merge(out, len(shards), REJECTS)
    write_json_atomic(out / "stats.json", {"shards": len(shards), **totals})
    if log is not None:
        log(f"{len(shards)} shards ({skipped} already done): {totals['records']} records, {totals['kept']} kept, "
            f"{sum(totals['rejected'].values())} rejected on reading, {sum(totals['dropped'].values())} dropped by steps")
    return RunResult(output, rejects, len(shards), skipped, totals)


def run_pipeline_file(path: str | Path, log: Callable[[str], None] | None = None) -> RunResult:
    """`lmforge data run PIPELINE.toml`: the whole file is checked before any work."""
    result = run_pipeline(load_pipeline_config(path), log=log)
    if log is not None:
        log(f"output: {result.output} (rejects: {result.rejects})")
    return result

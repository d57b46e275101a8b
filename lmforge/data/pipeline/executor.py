"""Run a pipeline: plan deterministic shards, run the step chain per shard on N workers (local
processes or Ray tasks), mark each finished shard, merge the shards in order.

Why shards with markers: a run over a large corpus will be interrupted. Each shard writes its
outputs under `<out>/shards/NNNNN/` and then `_DONE.json` LAST (atomic), so a rerun skips every
shard with a marker and redoes any shard without one from scratch (its directory is emptied
first): partial output is never taken as finished. Why the final output does not depend on the
worker count: the shards are fixed by the plan (input files and record ranges, not timing) and
are merged in shard order, so 1, 2 or 4 workers write identical bytes.

Global steps (`exact_dedup`, `near_dedup`: `dedup.py`; `lm_score` with `keep_top_fraction`;
`synthetic`) cut
the chain into stages. Stage 0 reads the inputs into `<out>/shards/`; a global step then reads
every shard's output in shard order in one process and writes its decisions to
`<out>/global/<k>-<step>/decisions.json` (atomic: its presence means done); stage k applies them
shard by shard in `<out>/stages/<k>/` (`base.DecisionStep`), followed by the
stage's other steps. The last stage's shards are the output; every stage's rejects are merged.

The plan is stored in `<out>/plan.json` with a fingerprint of the steps and the input files
(path, size, mtime); a rerun with a different pipeline or changed inputs into the same directory
is refused rather than mixing two runs' shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data.errors import DataError
from lmforge.data.files import read_json, write_json_atomic
from lmforge.data.pipeline.config import PipelineConfig, StepSpec, load_pipeline_config
from lmforge.data.pipeline.dedup import (
    GLOBAL_STEP_TYPES,
    DecisionStep,
    GlobalStep,
    load_decisions,
    save_decisions,
)
from lmforge.data.pipeline.document import Document, Reject, content_hash
from lmforge.data.pipeline.readers import count_records, input_files, read_records, scan_jsonl, source_name
from lmforge.data.pipeline.steps import Step, StepStats, build_steps
from lmforge.data.pipeline.workers import shard_mapper
from lmforge.data.pipeline.writers import jsonl_writer
from lmforge.storage.atomic import atomic_open

__all__ = ["Part", "RunResult", "Shard", "Stage", "plan_shards", "run_pipeline", "run_pipeline_file", "run_shard",
           "split_stages"]

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
           "steps": [[s.type, dataclasses.asdict(s.options), *_inputs_of(s.options)] for s in cfg.steps],
           "docs_per_shard": cfg.docs_per_shard, "compress": cfg.compress, "max_chars": cfg.max_chars}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _inputs_of(options: Any) -> list[str]:
    """A step's own input files' identity (`lm_score`'s reference), when the step names one."""
    fp = getattr(options, "fingerprint", None)
    return [fp()] if fp is not None else []


def _load_or_plan(cfg: PipelineConfig, out: Path, fp: str) -> list[Shard]:
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


@dataclass(frozen=True)
class Stage:
    """Per-shard steps, then (except for the last stage) the global step that ends the stage."""

    index: int
    steps: tuple[StepSpec, ...]
    barrier: StepSpec | None


def split_stages(steps: list[StepSpec]) -> list[Stage]:
    """Cut the chain after each global step: [a, b, G, c] -> stage 0 (a, b; then G), stage 1 (c)."""
    stages: list[Stage] = []
    local: list[StepSpec] = []
    for s in steps:
        if s.type in GLOBAL_STEP_TYPES and getattr(s.options, "is_global", True):  # lm_score: by its options
            stages.append(Stage(len(stages), tuple(local), s))
            local = []
        else:
            local.append(s)
    stages.append(Stage(len(stages), tuple(local), None))
    return stages


def _stage_dir(out: Path, k: int) -> Path:
    return out / "shards" if k == 0 else out / "stages" / str(k)


def _global_dir(out: Path, stage: Stage) -> Path:
    assert stage.barrier is not None
    return out / "global" / f"{stage.index}-{stage.barrier.type}"


def _read_stage_output(path: Path) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield Document.from_json(json.loads(line))


def _items(shard: Shard, max_chars: int) -> Iterator[Document | Reject]:
    for p in shard.parts:
        yield from read_records(Path(p.path), p.format, p.source, p.text_field, max_chars, p.start, p.stop,
                                p.byte_offset)


@dataclass(frozen=True)
class ShardTask:
    """Everything one shard of one stage needs (picklable: it travels to a process or Ray task)."""

    out: Path
    stage: int
    shard: Shard
    steps: tuple[StepSpec, ...]
    decisions: Path | None  # the previous global step's decisions, applied first
    last: bool
    compress: bool
    max_chars: int


def run_shard(task: ShardTask) -> tuple[dict, bool]:
    """Run one shard of one stage (or return its recorded counts when its marker exists):
    (counts, skipped)."""
    d = _stage_dir(task.out, task.stage) / f"{task.shard.index:05d}"
    done = read_json(d / MARKER)
    if done is not None and done.get("shard") == task.shard.index:
        return done, True
    if d.exists():
        shutil.rmtree(d)  # no marker: whatever is there is partial
    d.mkdir(parents=True)
    rejected: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    counts = {"records": 0, "kept": 0}
    compress = task.compress and task.last  # earlier stages' outputs are read back by the next stage
    with jsonl_writer(d / _kept_name(compress), compress) as kept, \
            jsonl_writer(d / REJECTS) as rej:

        def drop(doc: Document, reason: str, detail: str) -> None:
            stage = doc.provenance[-1].step if doc.provenance else "step"
            rej.write({**Reject(doc.id, doc.source, doc.offset, stage, reason, detail, tuple(doc.provenance)).as_json(),
                       "content_sha256": content_hash(doc.text)})
            dropped[f"{stage}.{reason}"] += 1

        def documents() -> Iterator[Document]:
            if task.stage > 0:
                prev = _stage_dir(task.out, task.stage - 1) / f"{task.shard.index:05d}" / _kept_name(False)
                for doc in _read_stage_output(prev):
                    counts["records"] += 1
                    yield doc
                return
            for item in _items(task.shard, task.max_chars):
                counts["records"] += 1
                if isinstance(item, Reject):
                    rej.write(item.as_json())
                    rejected[item.reason] += 1
                else:
                    yield item

        chain: list[Step] = []
        if task.decisions is not None:
            decisions = load_decisions(task.decisions)
            if decisions is None:
                raise DataError(f"{task.decisions} is missing or unreadable; delete {task.decisions.parent} and rerun")
            chain.append(DecisionStep(decisions, drop))
        chain += build_steps(list(task.steps), drop)
        docs: Iterator[Document] = documents()
        for step in chain:
            docs = step.run(docs)
        for doc in docs:
            # the final output carries each document's content hash (its provenance record);
            # earlier stages' outputs are only read back by the next stage
            kept.write({**doc.as_json(), "content_sha256": content_hash(doc.text)} if task.last else doc.as_json())
            counts["kept"] += 1
    result = {"shard": task.shard.index, **counts, "rejected": dict(sorted(rejected.items())),
              "dropped": dict(sorted(dropped.items())), "steps": [[s.name, s.stats.as_json()] for s in chain]}
    write_json_atomic(d / MARKER, result)  # last: the shard is finished only now
    return result, False


def _merge(out: Path, sources: list[Path], name: str) -> Path:
    """Concatenate `sources` in order into `<out>/<name>` (zstd frames concatenate into a valid
    stream)."""
    target = out / name
    with atomic_open(target, "wb") as f:
        for path in sources:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
    return target


def _global_step(spec: StepSpec, run_id: str) -> GlobalStep:
    return GLOBAL_STEP_TYPES[spec.type][0](spec.options, run_id)


def _decide(out: Path, stage: Stage, n_shards: int, run_id: str) -> tuple[Path, dict]:
    """Run the stage's global step over every shard's output, once (its decisions file is the
    marker). Returns (decisions path, its stats)."""
    assert stage.barrier is not None
    gdir = _global_dir(out, stage)
    path = gdir / "decisions.json"
    done = load_decisions(path)
    if done is not None:
        return path, done.stats
    gdir.mkdir(parents=True, exist_ok=True)
    src = _stage_dir(out, stage.index)

    def every_document() -> Iterator[Document]:
        for i in range(n_shards):
            yield from _read_stage_output(src / f"{i:05d}" / _kept_name(False))

    t0 = time.perf_counter()
    decisions = _global_step(stage.barrier, run_id).decide(every_document(), gdir)
    decisions.stats["decide_seconds"] = round(time.perf_counter() - t0, 6)
    save_decisions(path, decisions)
    return path, decisions.stats


def _totals(stage_results: list[list[dict]], global_stats: dict[str, dict]) -> dict[str, Any]:
    first, last = stage_results[0], stage_results[-1]
    rejected: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    steps: dict[str, StepStats] = {}
    for results in stage_results:
        for r in results:
            rejected.update(r["rejected"])
            dropped.update(r["dropped"])
            for name, st in r.get("steps", []):
                acc = steps.setdefault(name, StepStats())
                acc.seen += st["seen"]
                acc.kept += st["kept"]
                acc.dropped.update(st["dropped"])
                acc.seconds += st["seconds"]
    table: dict[str, dict[str, Any]] = {name: s.as_json() for name, s in steps.items()}
    for name, extra in global_stats.items():
        row = table.setdefault(name, {})
        row["global"] = extra
        if "seconds" in row and "decide_seconds" in extra:  # the step's time is its decision plus applying it
            row["shard_seconds"] = row["seconds"]
            row["seconds"] = round(row["seconds"] + extra["decide_seconds"], 6)
    for row in table.values():
        if "seconds" in row:
            row["docs_per_second"] = round(row["seen"] / row["seconds"], 1) if row["seconds"] else None
    return {"records": sum(r["records"] for r in first), "kept": sum(r["kept"] for r in last),
            "rejected": dict(sorted(rejected.items())), "dropped": dict(sorted(dropped.items())), "steps": table,
            "step_order": list(table)}  # stats.json sorts its keys: the pipeline's order, for the report


def run_pipeline(cfg: PipelineConfig, log: Callable[[str], None] | None = None) -> RunResult:
    """Run `cfg` into `cfg.output_dir`, resuming a previous run of the same pipeline there."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(cfg)
    run_id = hashlib.sha256(f"{fp}\0{out.resolve()}".encode()).hexdigest()[:16]
    shards = _load_or_plan(cfg, out, fp)
    stages = split_stages(cfg.steps)
    stage_results: list[list[dict]] = []
    global_stats: dict[str, dict] = {}
    skipped = 0
    decisions: Path | None = None
    with shard_mapper(cfg.executor, min(cfg.workers, max(len(shards), 1)), cfg.ray_address) as map_shards:
        for stage in stages:
            last = stage.barrier is None
            tasks = [(ShardTask(out, stage.index, s, stage.steps, decisions, last, cfg.compress, cfg.max_chars),)
                     for s in shards]
            results = map_shards(_run_task, tasks)
            stage_results.append([r for r, _ in results])
            skipped += sum(sk for _, sk in results) if stage.index == 0 else 0
            if stage.barrier is not None:
                decisions, stats = _decide(out, stage, len(shards), run_id)
                global_stats[stage.barrier.type] = stats
    final = _stage_dir(out, stages[-1].index)
    output = _merge(out, [final / f"{s.index:05d}" / _kept_name(cfg.compress) for s in shards],
                    _kept_name(cfg.compress))
    rejects = _merge(out, [_stage_dir(out, st.index) / f"{s.index:05d}" / REJECTS for st in stages for s in shards],
                     REJECTS)
    totals = _totals(stage_results, global_stats)
    write_json_atomic(out / "stats.json", {"shards": len(shards), **totals})
    for stage in stages:
        if stage.barrier is not None:
            _global_step(stage.barrier, run_id).finish_run(_global_dir(out, stage))
    if log is not None:
        log(f"{len(shards)} shards ({skipped} already done): {totals['records']} records, {totals['kept']} kept, "
            f"{sum(totals['rejected'].values())} rejected on reading, {sum(totals['dropped'].values())} dropped by steps")
        for name, st in totals["steps"].items():
            if "seen" in st:
                log(f"  {name}: {st['seen']} in, {st['kept']} kept, dropped {st['dropped'] or 0}"
                    + (f", {st['docs_per_second']:.0f} docs/s" if st["docs_per_second"] else ""))
    return RunResult(output, rejects, len(shards), skipped, totals)


def _run_task(args: tuple[ShardTask]) -> tuple[dict, bool]:
    return run_shard(args[0])


def run_pipeline_file(path: str | Path, log: Callable[[str], None] | None = None) -> RunResult:
    """`lmforge data run PIPELINE.toml`: the whole file is checked before any work."""
    result = run_pipeline(load_pipeline_config(path), log=log)
    if log is not None:
        log(f"output: {result.output} (rejects: {result.rejects})")
    return result

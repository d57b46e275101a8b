"""The pipeline stage of `lmforge data prepare`: the raw default corpus (corpus.jsonl) through the
document pipeline (lmforge.data.pipeline) before the tokenizer sees it, into
`<data.dir>/pipeline/output.jsonl`, whose lines carry `metadata.domain` for the packer.

The default chain: `normalize` (NFC, whitespace), a light `quality` filter (only the rules that
suit verse, scripture and Chinese alike: `min_stop_words` counts English stop words, which Chinese
has none of; a play's speaker names repeat lines, so `max_duplicate_line_fraction` is off;
`min_words` and `max_symbol_word_ratio` were switched off when Chinese counted as a few
space-separated words, and stay off although data/words.py now counts its characters, so that the
default corpus's documents stay as they were), `exact_dedup`, `near_dedup` on character 8-grams
(word shingles take a run of Chinese as one word) and `domain`, seeded by the keywords of the
three default domains.

Stage skipping as the other stages: `pipeline.meta.json` records the input's sha256 and the
chain; a rerun with both unchanged and the output intact does nothing. Otherwise the pipeline
directory is emptied first (the executor refuses a directory holding another run's plan).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from lmforge.data.files import fingerprint, read_json, same_content, write_json_atomic
from lmforge.data.pipeline.config import InputConfig, PipelineConfig, StepSpec
from lmforge.data.pipeline.dedup import ExactDedupConfig, NearDedupStepConfig
from lmforge.data.pipeline.domains import DomainConfig
from lmforge.data.pipeline.steps import NormalizeConfig, QualityConfig

__all__ = ["DEFAULT_KEYWORDS", "default_steps", "prepare_pipeline"]

PIPELINE_FORMAT = 1
DEFAULT_KEYWORDS = [
    "shakespeare: thou thee thy sir enter exeunt exit",
    "bible: god israel unto begat lord",
    "chinese: 的 中国 发展 和",
]


def default_steps() -> list[StepSpec]:
    return [
        StepSpec("normalize", NormalizeConfig()),
        StepSpec("quality", QualityConfig(disable=["min_words", "min_stop_words", "max_duplicate_line_fraction",
                                                   "max_symbol_word_ratio"])),
        StepSpec("exact_dedup", ExactDedupConfig()),
        StepSpec("near_dedup", NearDedupStepConfig(shingle="char", ngram=8)),
        StepSpec("domain", DomainConfig(keywords=list(DEFAULT_KEYWORDS))),
    ]


def prepare_pipeline(corpus_jsonl: Path, out_dir: Path) -> dict:
    """Run the default pipeline on `corpus_jsonl` into `out_dir` unless its output is current.

    Returns {output, documents, kept, dropped, domains, skipped_stage}: `dropped` per step and
    reason, `domains` the domain step's statistics (documents and chars per domain)."""
    from lmforge.data.pipeline.executor import run_pipeline

    corpus_jsonl, out_dir = Path(corpus_jsonl), Path(out_dir)
    steps = default_steps()
    meta_path = out_dir.with_name(out_dir.name + ".meta.json")
    meta = read_json(meta_path) or {}
    inputs = {"format": PIPELINE_FORMAT, "corpus_sha256": fingerprint(corpus_jsonl, meta.get("corpus"))["sha256"],
              "steps": [[s.type, dataclasses.asdict(s.options)] for s in steps]}
    output = out_dir / "output.jsonl"
    if meta.get("inputs") == json.loads(json.dumps(inputs)) and same_content(output, meta.get("output")):
        return {**meta["stats"], "output": str(output), "skipped_stage": True}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cfg = PipelineConfig(output_dir=str(out_dir), inputs=[InputConfig(str(corpus_jsonl))], steps=steps,
                         workers=1, docs_per_shard=1000)
    totals = run_pipeline(cfg).totals
    domain = totals["steps"]["domain"]["global"]
    stats = {"documents": totals["records"], "kept": totals["kept"], "dropped": totals["dropped"],
             "domains": {d: {"documents": s["documents"], "chars": s["chars"]} for d, s in domain["domains"].items()}}
    write_json_atomic(meta_path, {"inputs": inputs, "corpus": fingerprint(corpus_jsonl), "output": fingerprint(output),
                                  "stats": stats})
    return {**stats, "output": str(output), "skipped_stage": False}

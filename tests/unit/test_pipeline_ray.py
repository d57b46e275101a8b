"""The Ray executor (a local Ray instance started for the run) runs the same shard tasks and global
steps as local processes and writes byte-identical output, printing none of Ray's own log lines; a
bad cluster address is one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmforge.data.errors import DataError
from lmforge.data.pipeline.config import parse_pipeline
from lmforge.data.pipeline.executor import run_pipeline


def _corpus(root: Path) -> None:
    (root / "in").mkdir()
    words = "the king and his men go to war with france for the crown of england and its lands".split()
    rng = random.Random(5)
    lines = []
    for i in range(60):
        text = " ".join(rng.choice(words) for _ in range(40 + i % 7))
        lines.append(json.dumps({"text": text if i % 10 else "  " + text}) + "\n")
    lines += [json.dumps({"text": json.loads(x)["text"].replace(" ", "  ")}) + "\n" for x in lines[:6]]
    lines.insert(7, "{not json\n")
    (root / "in" / "part.jsonl").write_text("".join(lines))


def _cfg(root: Path, out: str, executor: str, workers: int = 2, address: str = ""):
    data = {"output_dir": out, "workers": workers, "docs_per_shard": 9, "executor": executor,
            "ray_address": address, "inputs": [{"path": "in"}],
            "steps": [{"type": "normalize"}, {"type": "exact_dedup"}, {"type": "near_dedup", "threshold": 0.8},
                      {"type": "quality", "min_words": 41, "disable": ["max_top_ngram_fraction"]}]}
    return parse_pipeline(data, root, "test")


@pytest.mark.slow
def test_ray_executor_output_is_byte_identical_to_local(tmp_path, capfd):
    _corpus(tmp_path)
    local = run_pipeline(_cfg(tmp_path, "local", "local", workers=1))
    capfd.readouterr()
    ray_run = run_pipeline(_cfg(tmp_path, "ray", "ray"))
    err = capfd.readouterr().err  # Ray's own notices (token auth, "Started a local Ray instance") stay out
    assert "WARNING" not in err and "INFO" not in err and "Ray instance" not in err, err
    assert ray_run.output.read_bytes() == local.output.read_bytes()
    assert ray_run.rejects.read_bytes() == local.rejects.read_bytes()
    stats = json.loads((tmp_path / "ray" / "stats.json").read_text())
    assert stats["records"] == 67 and stats["rejected"] == {"malformed_json": 1}
    assert stats["dropped"]["exact_dedup.duplicate"] >= 6 and stats["kept"] > 0
    assert ray_run.shards == 8


def test_unreachable_ray_address_is_one_line(tmp_path):
    _corpus(tmp_path)
    with pytest.raises(DataError, match=r"ray_address = '127\.0\.0\.1:1': cannot join a Ray cluster"):
        run_pipeline(_cfg(tmp_path, "x", "ray", address="127.0.0.1:1"))

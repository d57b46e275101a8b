"""Synthetic-text detection: the `synthetic` pipeline step (threshold and keep-top-fraction, the
score in every verdict, the detector cached per run, its options checked) on a character-Markov
stand-in for model text; then the acceptance check with a real model: a tiny lmforge model trained
here, passages sampled from it (`serve/sample.py`), held-out AUROC >= 0.95 against held-out human
passages of the same lengths and prompts; and the same on the main job's run when it exists."""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="synthetic-text detection needs scikit-learn (the data extra)")

from lmforge.config import ConfigError  # noqa: E402
from lmforge.data.corpus import iter_shakespeare  # noqa: E402
from lmforge.data.pipeline.config import parse_pipeline  # noqa: E402
from lmforge.data.pipeline.executor import run_pipeline  # noqa: E402
from lmforge.data.pipeline.synthetic import SyntheticStep  # noqa: E402
from lmforge.data.synthetic import cut_passage, holdout_auroc  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def markov_passages(texts: list[str], n: int, chars: int, seed: int) -> list[str]:
    """A character 3-gram chain over `texts`: the made-up words and broken patterns of a barely
    trained language model, without training one."""
    follow: dict[str, list[str]] = defaultdict(list)
    for t in texts:
        for i in range(len(t) - 3):
            follow[t[i:i + 3]].append(t[i + 3])
    rng = random.Random(seed)
    keys = sorted(follow)
    out = []
    for _ in range(n):
        s = rng.choice(keys)
        while len(s) < chars:
            nxt = follow.get(s[-3:])
            s += rng.choice(nxt) if nxt else " " + rng.choice(keys)
        out.append(cut_passage(s, 0, chars))
    return out


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """reference.jsonl: 150 Shakespeare blocks; samples.jsonl: 80 Markov passages of 300 chars;
    docs.jsonl (the pipeline's input): 30 human passages from other blocks and 30 new Markov
    passages, alternating (machine at odd lines)."""
    root = tmp_path_factory.mktemp("synthetic")
    blocks = [d["text"] for d in iter_shakespeare()][:230]
    reference, other = blocks[:150], blocks[150:]
    machine = markov_passages(reference, 110, 300, seed=1)
    human = [cut_passage(t, 500, 300) for t in other[:30]]
    docs = [x for pair in zip(human, machine[80:], strict=True) for x in pair]
    return {"root": root, "reference": write_jsonl(root / "reference.jsonl", reference),
            "samples": write_jsonl(root / "samples.jsonl", machine[:80]),
            "docs": write_jsonl(root / "docs.jsonl", docs)}


def pipeline(files: dict, out: str, **options) -> dict:
    step = {"type": "synthetic", "human": "reference.jsonl", "machine": "samples.jsonl", **options}
    return {"output_dir": out, "inputs": [{"path": "docs.jsonl"}], "steps": [{"type": "normalize"}, step]}


def run(files: dict, out: str, **options) -> tuple[list[dict], list[dict], dict]:
    cfg = parse_pipeline(pipeline(files, out, **options), files["root"], "test.toml")
    res = run_pipeline(cfg)
    kept = [json.loads(line) for line in res.output.read_text().splitlines()]
    rejects = [json.loads(line) for line in res.rejects.read_text().splitlines()]
    return kept, rejects, json.loads((Path(cfg.output_dir) / "stats.json").read_text())


def is_machine(doc: dict) -> bool:
    return doc["offset"] % 2 == 0  # 1-based lines: machine passages are lines 2, 4, ...


def verdict(doc: dict) -> dict:
    return next(v for v in doc["provenance"] if v["step"] == "synthetic")


def test_max_score_drops_machine_text_and_every_verdict_has_its_score(files: dict) -> None:
    kept, rejects, stats = run(files, "out-threshold", max_score=0.5)
    assert len(kept) + len(rejects) == 60
    assert sum(is_machine(d) for d in rejects) >= 27 and sum(not is_machine(d) for d in kept) >= 27
    for doc in kept:
        v = verdict(doc)
        assert v["verdict"] == "keep" and 0 <= v["score"] <= 0.5
    for doc in rejects:
        v = verdict(doc)
        assert doc["reason"] == "synthetic" and doc["stage"] == "synthetic"
        assert v["verdict"] == "drop" and 0.5 < v["score"] <= 1 and "P(machine)" in v["detail"]
    g = stats["steps"]["synthetic"]["global"]
    assert g["documents"] == 60 and g["dropped"] == len(rejects) and g["detector_trained"] is True
    assert g["machine_samples"] == 80 and g["passage_chars"] > 250


def test_keep_top_fraction_keeps_the_most_human_like(files: dict) -> None:
    kept, rejects, _ = run(files, "out-top", keep_top_fraction=0.4)
    assert len(kept) == 24 and len(rejects) == 36
    assert max(verdict(d)["score"] for d in kept) <= min(verdict(d)["score"] for d in rejects)
    assert not any(is_machine(d) for d in kept)


def test_the_detector_is_cached_in_the_run_and_retrained_when_the_samples_change(files: dict, tmp_path: Path) -> None:
    cfg = parse_pipeline(pipeline(files, str(tmp_path / "o"), max_score=0.5), files["root"], "t.toml")
    spec = cfg.steps[-1].options
    det, trained = SyntheticStep(spec, "run").detector(tmp_path)
    t0 = time.perf_counter()
    again, trained_again = SyntheticStep(spec, "run").detector(tmp_path)
    assert trained and not trained_again and time.perf_counter() - t0 < 5
    texts = [json.loads(line)["text"] for line in files["docs"].read_text().splitlines()]
    assert (det.score(texts) == again.score(texts)).all()
    samples = tmp_path / "samples.jsonl"
    samples.write_text(files["samples"].read_text().splitlines()[0] + "\n" + files["samples"].read_text())
    changed = parse_pipeline(pipeline(files, str(tmp_path / "o"), max_score=0.5, machine=str(samples)),
                             files["root"], "t.toml").steps[-1].options
    assert SyntheticStep(changed, "run").detector(tmp_path)[1] is True


@pytest.mark.parametrize(("options", "key", "phrase"), [
    ({}, "max_score", "exactly one of max_score and keep_top_fraction"),
    ({"max_score": 0.5, "keep_top_fraction": 0.5}, "max_score", "exactly one"),
    ({"max_score": 1.5}, "max_score", "[0, 1]"),
    ({"keep_top_fraction": 0.0}, "keep_top_fraction", "(0, 1]"),
    ({"max_score": 0.5, "machine": "nope.jsonl"}, "machine", "is not a file"),
    ({"max_score": 0.5, "c": -1.0}, "c", "> 0"),
    ({"max_score": 0.5, "window": 3}, "window", "unknown key"),
])
def test_bad_options_are_one_line_errors(files: dict, options: dict, key: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_pipeline(pipeline(files, "o", **options), files["root"], "t.toml")
    assert f"steps[1].{key} = " in str(err.value) and phrase in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- with a real model

TARGET_AUROC = 0.95


def tiny_model(tmp: Path) -> tuple[Path, Path]:
    """A debug-sized model trained for 200 steps on 600 documents of the embedded corpus (~20 s
    on 2 cores): (run dir, the reference corpus.jsonl)."""
    from lmforge.config import DataConfig, TokenizerConfig, load_job_config, parse_override_args
    from lmforge.data.pack import prepare_data
    from lmforge.train.trainer import Trainer
    from tests.helpers.cli import tiny_run_args

    data = prepare_data(DataConfig(corpus="default", dir=str(tmp / "data"), max_documents=600, val_fraction=0.05),
                        TokenizerConfig(vocab_size=512, min_frequency=2), log=lambda *_: None)
    args = tiny_run_args(data, tmp / "run", "--data.max_documents", "600", "--train.steps", "200",
                         "--train.global_batch_size", "8", "--train.micro_batch_size", "8",
                         "--train.eval_interval", "0", "--checkpoint.interval", "200")
    trainer = Trainer(load_job_config(None, parse_override_args(args)), echo=False)
    try:
        losses = trainer.fit()
    finally:
        trainer.close()
    assert losses[-1] < losses[0] - 2  # it learned something: its samples are not uniform noise
    return tmp / "run", data / "corpus.jsonl"


@pytest.mark.slow
def test_samples_of_a_trained_model_are_detected_on_held_out_passages(tmp_path: Path, capsys) -> None:
    from lmforge.serve.sample import add_sample_parser, sample_passages

    run_dir, reference = tiny_model(tmp_path)
    res = sample_passages(run_dir, reference, tmp_path / "samples.jsonl", 150, prompt_tokens=16, max_new_tokens=48,
                          min_chars=600, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert res.samples == len(rows) >= 140
    refs = reference.read_text().splitlines()
    assert len({r["reference_line"] for r in rows}) == len(rows)  # one prompt per document
    for r in rows[:20]:
        human = json.loads(refs[r["reference_line"] - 1])["text"]
        assert human.startswith(r["prompt"]) and r["prompt_chars"] == len(r["prompt"])
        assert r["text"] and not r["text"].startswith(r["prompt"])
    # `lmforge data sample` (the handler cli.py registers), one seed: the same file
    parser = argparse.ArgumentParser()
    add_sample_parser(parser.add_subparsers())
    args = parser.parse_args(["sample", str(run_dir), "--reference", str(reference), "--out", str(tmp_path / "again.jsonl"),
                              "--n", "150", "--prompt-tokens", "16", "--max-new-tokens", "48", "--min-chars", "600",
                              "--auroc"])
    assert args.func(args) == 0
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "samples.jsonl").read_text()
    result = holdout_auroc(reference, tmp_path / "samples.jsonl", test_fraction=0.5, seed=0)
    print(result.line())
    assert capsys.readouterr().out.splitlines()[-2] == result.line()  # what --auroc printed
    assert result.test_machine >= 70 and result.test_human == result.test_machine
    assert result.auroc >= TARGET_AUROC, result.line()


MAIN_RUN = REPO / "runs" / "tiny-dense"
MAIN_REFERENCE = REPO / "data" / "default" / "corpus.jsonl"


@pytest.mark.slow
@pytest.mark.skipif(not (MAIN_RUN / "checkpoints").is_dir() or not MAIN_REFERENCE.is_file(),
                    reason="the main job's run (bash scripts/run_default.sh) is not in this checkout")
def test_samples_of_the_main_job_are_detected_on_held_out_passages(tmp_path: Path) -> None:
    from lmforge.serve.sample import sample_passages

    sample_passages(MAIN_RUN, MAIN_REFERENCE, tmp_path / "samples.jsonl", 200, prompt_tokens=32, max_new_tokens=128,
                    seed=0)
    result = holdout_auroc(MAIN_REFERENCE, tmp_path / "samples.jsonl", test_fraction=0.5, seed=0)
    print(result.line())
    assert result.auroc >= TARGET_AUROC, result.line()


def test_holdout_human_passages_come_from_the_held_out_documents_after_the_prompt(tmp_path: Path) -> None:
    refs = [d["text"] for d in iter_shakespeare()][:40]
    reference = write_jsonl(tmp_path / "ref.jsonl", refs)
    lines = []
    for i, t in enumerate(markov_passages(refs, 40, 200, seed=2)):
        lines.append(json.dumps({"text": t, "reference_line": i + 1, "prompt_chars": 60, "prompt": refs[i][:60]}))
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    result = holdout_auroc(reference, tmp_path / "s.jsonl", test_fraction=0.5, seed=0)
    assert result.test_machine == result.test_human == 20 and result.train_machine == 20
    assert result.train_human_docs == 20  # the 20 held-out documents are not trained on
    assert result.auroc >= TARGET_AUROC

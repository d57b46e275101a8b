"""`lmforge eval` end to end: a run, one of its checkpoints and its Hugging Face export evaluate to
the same numbers; the printed tables and the JSON (a deterministic section identical on a second
evaluation, a timing section apart); bad inputs end in one line and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.config.job import DataConfig, TokenizerConfig
from lmforge.data.pack import prepare_data
from lmforge.eval.errors import EvalError
from lmforge.eval.heldout import check_tokenizer, open_heldout
from tests.helpers.cli import tiny_run_args, train_in_process

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("eval-cli-run")
    train_in_process(tiny_run_args(tiny_data_dir, run, "--train.steps", "4", "--train.global_batch_size", "4",
                                   "--train.micro_batch_size", "4", "--train.eval_interval", "4"))
    return run


def eval_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_eval_prints_tables_and_writes_json(run_dir: Path, tmp_path: Path, capsys) -> None:
    code, out, err = eval_main([str(run_dir), "--items", "16", "--max-batches", "20", "--out", str(tmp_path / "a.json")],
                               capsys)
    assert code == 0, err
    for title in ("perplexity, held-out split", "trainer's validation", "chinese", "shakespeare",
                  "cloze: the true next line among 4", "speed, batch 1", "prefill", "decode", f"wrote {tmp_path / 'a.json'}"):
        assert title in out, out
    a = json.loads((tmp_path / "a.json").read_text())
    assert set(a) >= {"deterministic", "timing", "about", "source", "notes"}
    speed = a["timing"]["speed"]
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert speed["memory"]["peak_rss_bytes"] > speed["memory"]["parameter_bytes"] > 0
    cloze = a["deterministic"]["cloze"]
    assert cloze["items"] == 16
    se = (cloze["accuracy"] * (1 - cloze["accuracy"]) / 16) ** 0.5
    assert cloze["accuracy_stderr"] == pytest.approx(se) and f"{cloze['accuracy']:.3f} ± {se:.3f}" in out, out
    code, _, err = eval_main([str(run_dir), "--items", "16", "--max-batches", "20", "--no-speed", "--out",
                              str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["deterministic"] == a["deterministic"] and b["timing"] is None
    # the same checkpoint named by its directory
    step = a["source"]["checkpoint"]
    assert eval_main([step, "--items", "16", "--max-batches", "20", "--no-speed", "--out", str(tmp_path / "c.json")],
                     capsys)[0] == 0
    assert json.loads((tmp_path / "c.json").read_text())["deterministic"] == a["deterministic"]


def test_a_hugging_face_export_evaluates_to_the_same_numbers(run_dir: Path, tiny_data_dir: Path, tmp_path: Path,
                                                             capsys) -> None:
    hf = tmp_path / "hf"
    assert main(["export", str(run_dir), str(hf)]) == 0
    capsys.readouterr()
    out = tmp_path / "hf.json"
    # an HF directory names no seq_len: the run's is given (the whole split is read either way)
    assert eval_main([str(hf), "--data-dir", str(tiny_data_dir), "--seq-len", "32", "--items", "16", "--no-speed",
                      "--out", str(out)], capsys)[0] == 0
    assert eval_main([str(run_dir), "--items", "16", "--no-speed", "--out", str(tmp_path / "run.json")], capsys)[0] == 0
    h, r = json.loads(out.read_text())["deterministic"], json.loads((tmp_path / "run.json").read_text())["deterministic"]
    assert h["perplexity"]["windows"] == r["perplexity"]["windows"] > 500
    assert h["perplexity"]["loss"] == pytest.approx(r["perplexity"]["loss"], rel=1e-6)
    assert h["cloze"]["items_sha256"] == r["cloze"]["items_sha256"]
    # no data named: speed only, and a note saying how to get the rest
    code, text, err = eval_main([str(hf)], capsys)
    assert code == 0 and "speed, batch 1" in text and "perplexity" not in text
    assert "pass --data-dir" in err


@pytest.fixture(scope="module")
def other_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packed data dir whose tokenizer is not the tiny run's."""
    d = tmp_path_factory.mktemp("other-data")
    corpus = d / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i} of a small corpus about apples and pears\n" * 5}) + "\n"
                              for i in range(40)))
    return prepare_data(DataConfig(corpus=str(corpus), dir=str(d / "packed"), val_fraction=0.1),
                        TokenizerConfig(vocab_size=300), log=lambda *_: None)


def _run_without_checkpoints(run_dir: Path, t: Path) -> Path:
    d = t / "no-ckpt"
    d.mkdir()
    shutil.copy(run_dir / "config.json", d / "config.json")
    return d


def _run_with_missing_data(run_dir: Path, t: Path) -> Path:
    d = t / "moved"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("lmforge.lock"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["data"]["dir"] = str(t / "gone")
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("case,args,expect", [
    ("missing-source", lambda r, t, o: [str(t / "nope")], "nope: no such file or directory"),
    ("empty-dir", lambda r, t, o: [str(t)], "not a Hugging Face directory"),
    ("run-without-checkpoint", lambda r, t, o: [str(_run_without_checkpoints(r, t))], "no valid checkpoint"),
    ("run-data-moved", lambda r, t, o: [str(_run_with_missing_data(r, t))], "gone (data.dir of"),
    ("data-dir-missing", lambda r, t, o: [str(r), "--data-dir", str(t / "nowhere")], "nowhere (--data-dir) does not exist"),
    ("data-dir-not-packed", lambda r, t, o: [str(r), "--data-dir", str(t)], "not a packed data dir"),
    ("data-dir-other-tokenizer", lambda r, t, o: [str(r), "--data-dir", str(o)], "is not the model's"),
    ("items-negative", lambda r, t, o: [str(r), "--items", "-1"], "--items -1: must be >= 0"),
    ("seq-len-too-long", lambda r, t, o: [str(r), "--seq-len", "65"], "--seq-len 65: must be in [1, 64]"),
    ("max-batches-zero", lambda r, t, o: [str(r), "--max-batches", "0"], "--max-batches 0: must be >= 1"),
    ("device-banana", lambda r, t, o: [str(r), "--device", "banana"], "not a device"),
])
def test_bad_inputs_end_in_one_line(case: str, args, expect: str, run_dir: Path, other_data_dir: Path,
                                    tmp_path: Path, capsys) -> None:
    code, out, err = eval_main(args(run_dir, tmp_path, other_data_dir), capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lmforge eval: "), err
    assert expect in lines[0], lines[0]


def test_out_is_not_overwritten_unless_asked(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.json"
    out.write_text("keep")
    code, _, err = eval_main([str(run_dir), "--no-speed", "--items", "0", "--max-batches", "1", "--out", str(out)],
                             capsys)
    assert code == 2 and "--out" in err and "already exists" in err and out.read_text() == "keep"
    assert eval_main([str(run_dir), "--no-speed", "--items", "0", "--max-batches", "1", "--out", str(out),
                      "--overwrite"], capsys)[0] == 0
    assert "deterministic" in json.loads(out.read_text())


def test_a_data_dir_with_more_ids_than_the_model_is_refused(tiny_data_dir: Path) -> None:
    with pytest.raises(EvalError, match="its tokenizer has 512 ids, more than the model's vocab_size 300"):
        check_tokenizer(tiny_data_dir, ModelConfig(vocab_size=300), None)


def test_a_corpus_without_domain_labels_gets_overall_figures_and_a_note(other_data_dir: Path) -> None:
    held = open_heldout(other_data_dir)
    assert not held.labelled and len(held.texts) == held.dataset.n_documents > 0
    assert len(held.notes) == 1 and "carry no domain label" in held.notes[0]

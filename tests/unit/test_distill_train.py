"""Distillation through the trainer (in-process, debug-sized, fp32): the logged loss is alpha T^2 KL
+ (1 - alpha) CE of its logged parts; a full-logit cache gives the online run's losses exactly,
cold (written) and warm (read, the teacher not run); a top-k cache stays within its stated bound;
a corrupt entry is recomputed; a cache of another teacher set-up and a teacher that does not fit
the student are refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from lmforge.config import ConfigError, load_job_config, parse_override_args
from lmforge.serve.generate import load_for_generation
from lmforge.train.distill import Teacher, check_teacher
from lmforge.train.trainer import Trainer
from tests.helpers.cli import read_metrics, tiny_run_args

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4


def config(data_dir: Path, out: Path, *extra: str):
    args = tiny_run_args(data_dir, out, "--train.steps", str(STEPS), "--train.global_batch_size", "4",
                         "--train.micro_batch_size", "2", "--train.eval_interval", "0",
                         "--checkpoint.enabled", "false", *extra)
    return load_job_config(None, parse_override_args(args))


def train(cfg, teacher: Teacher | None) -> list[dict]:
    trainer = Trainer(cfg, echo=False, teacher=teacher)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return read_metrics(Path(cfg.train.output_dir))


@pytest.fixture(scope="module")
def teacher(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Teacher:
    """A 2-layer model trained 8 steps on the tiny data (so its distribution is not uniform)."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = config(tiny_data_dir, out, "--train.steps", "8", "--checkpoint.enabled", "true",
                 "--checkpoint.interval", "8")
    train(cfg, None)
    model, tcfg, tok = load_for_generation(out)
    return Teacher(model, tcfg, tok, str(out))


def student(data_dir: Path, out: Path, *extra: str):
    return config(data_dir, out, "--model.n_layers", "1", "--distill.teacher", "teacher-dir", *extra)


@pytest.fixture(scope="module")
def online(teacher: Teacher, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return train(student(tiny_data_dir, tmp_path_factory.mktemp("online")), teacher)


def test_logged_loss_is_alpha_kl_plus_ce(online: list[dict]) -> None:
    assert [r["step"] for r in online] == list(range(1, STEPS + 1))
    for r in online:  # alpha 0.5, T 2 (the defaults)
        assert r["loss"] == pytest.approx(0.5 * 4 * r["distill_kl"] + 0.5 * r["distill_ce"], rel=1e-6)
        assert r["distill_kl"] > 0
    assert online[-1]["distill_kl"] < online[0]["distill_kl"]  # the student moves towards the teacher
    assert "distill_cache_hit" not in online[0]


def test_hugging_face_teacher_is_the_same_teacher(online: list[dict], teacher: Teacher, tiny_data_dir: Path,
                                                 tmp_path: Path) -> None:
    """The teacher exported to a Hugging Face directory and loaded as `lmforge distill` loads it:
    the same fingerprint (config + weights) and the same distillation losses."""
    from lmforge.cli_distill import load_teacher
    from lmforge.interop.hf.exporter import export_hf
    from lmforge.train.teacher_cache import teacher_fingerprint

    export_hf(teacher.model, teacher.cfg, tmp_path / "hf", tokenizer_json=teacher.tokenizer)
    cfg = student(tiny_data_dir, tmp_path / "s")
    cfg = replace(cfg, distill=replace(cfg.distill, teacher=str(tmp_path / "hf")))
    hf = load_teacher(cfg)
    assert hf.source == str(tmp_path / "hf")
    assert teacher_fingerprint(hf.model, hf.cfg) == teacher_fingerprint(teacher.model, teacher.cfg)
    rows = train(cfg, hf)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in online], rel=1e-6)


def test_resumed_distillation_continues_exactly(online: list[dict], teacher: Teacher, tiny_data_dir: Path,
                                                tmp_path: Path) -> None:
    """Stopped after step 2 (checkpoint), resumed: the same losses as the uninterrupted run."""
    ckpt = ["--checkpoint.enabled", "true", "--checkpoint.interval", "2"]
    train(student(tiny_data_dir, tmp_path, *ckpt, "--train.stop_at", "2"), teacher)
    rows = train(student(tiny_data_dir, tmp_path, *ckpt, "--checkpoint.resume", "auto"), teacher)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in online], rel=1e-6)
    assert rows[2]["distill_kl"] == pytest.approx(online[2]["distill_kl"], rel=1e-6)


def test_full_logit_cache_equals_online_cold_and_warm(online: list[dict], teacher: Teacher,
                                                      tiny_data_dir: Path, tmp_path: Path) -> None:
    cache = ["--distill.teacher_logits", "cache", "--distill.cache_dir", str(tmp_path / "cache"),
             "--distill.cache_top_k", "0", "--distill.cache_dtype", "fp32"]
    cold = train(student(tiny_data_dir, tmp_path / "cold", *cache), teacher)
    entries = list((tmp_path / "cache").glob("*/*.safetensors"))
    assert len(entries) == STEPS * 4  # one per window (the tiny data does not repeat a window in 16)
    warm = train(student(tiny_data_dir, tmp_path / "warm", *cache), teacher)
    for rows, hit in ((cold, 0.0), (warm, 1.0)):
        assert [r["distill_cache_hit"] for r in rows] == [hit] * STEPS
        for a, b in zip(online, rows):
            for key in ("loss", "distill_kl", "distill_ce"):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (hit, key)
    # another layout (one micro-batch of 4, no accumulation) finds every entry: keys are the windows
    other = train(student(tiny_data_dir, tmp_path / "other", *cache, "--train.micro_batch_size", "4"), teacher)
    assert [r["distill_cache_hit"] for r in other] == [1.0] * STEPS
    assert [r["loss"] for r in other] == pytest.approx([r["loss"] for r in online], rel=1e-5)
    # a corrupt entry fails its checksum: recomputed (one warning), the losses unchanged
    blob = bytearray(entries[0].read_bytes())
    blob[-3] ^= 0xFF
    entries[0].write_bytes(bytes(blob))
    again = train(student(tiny_data_dir, tmp_path / "again", *cache), teacher)
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in online], rel=1e-6)
    assert sum(r["distill_cache_hit"] for r in again) == pytest.approx(STEPS - 1 / 4)


def test_top_k_cache_within_its_bound(online: list[dict], teacher: Teacher, tiny_data_dir: Path,
                                      tmp_path: Path) -> None:
    """Top-32 of 512 ids in fp16. Step 1 (same weights, same batch): the cross-entropy is the same
    and the coarsened KL is in (0, full KL] (data-processing inequality; the gap, tail mass x tail
    KL, is checked exactly in test_distill_loss.py). This barely trained teacher leaves 82% of its
    mass at T = 2 outside its top 32 (distill_teacher_tail), so the coarsened KL is 40% of the full
    one; still the run's cross-entropy stays within 3% of the online run's (measured 1.6%)."""
    rows = train(student(tiny_data_dir, tmp_path / "topk", "--distill.teacher_logits", "cache",
                         "--distill.cache_top_k", "32"), teacher)
    first, ref = rows[0], online[0]
    assert first["distill_ce"] == pytest.approx(ref["distill_ce"], rel=1e-6)
    assert 0 < first["distill_kl"] <= ref["distill_kl"] * (1 + 1e-3)
    assert all(0.5 < r["distill_teacher_tail"] < 0.95 for r in rows)
    for a, b in zip(online, rows):
        assert abs(b["distill_ce"] - a["distill_ce"]) <= 0.03 * a["distill_ce"]
    assert (tmp_path / "topk" / "teacher_logits" / "manifest.json").is_file()  # the default cache_dir
    # the same cache at another temperature: its top-k log-probabilities would be wrong -> one line
    with pytest.raises(ConfigError) as err:
        train(student(tiny_data_dir, tmp_path / "t3", "--distill.teacher_logits", "cache", "--distill.cache_top_k",
                      "32", "--distill.temperature", "3", "--distill.cache_dir",
                      str(tmp_path / "topk" / "teacher_logits")), teacher)
    assert "temperature = 2.0" in str(err.value) and "\n" not in str(err.value)


def test_teacher_that_does_not_fit_is_refused(teacher: Teacher, tiny_data_dir: Path, tmp_path: Path) -> None:
    cfg = student(tiny_data_dir, tmp_path / "s")
    bigger = replace(cfg, model=replace(cfg.model, vocab_size=640))
    with pytest.raises(ConfigError) as err:
        check_teacher(teacher, bigger, tiny_data_dir / "tokenizer.json")
    assert "512 ids" in str(err.value) and "640" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="shorter than train.seq_len"):
        check_teacher(replace(teacher, cfg=replace(teacher.cfg, max_seq_len=16)), cfg, None)
    other = json.loads((tiny_data_dir / "tokenizer.json").read_text())
    vocab = other["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: same size, other meaning
    (tmp_path / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match="differs from the student's"):
        check_teacher(replace(teacher, tokenizer=tmp_path / "tokenizer.json"), cfg, tiny_data_dir / "tokenizer.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable tokenizer.json"):
        check_teacher(replace(teacher, tokenizer=tmp_path / "broken.json"), cfg, tiny_data_dir / "tokenizer.json")
    check_teacher(teacher, cfg, tiny_data_dir / "tokenizer.json")  # the fitting teacher passes


def test_layouts_the_loss_cannot_use_are_refused_before_launch() -> None:
    from tests.helpers.config import BASE

    for extra, key in ((["--parallel.tp", "2", "--parallel.dp_shard", "1"], "parallel.tp"),
                       (["--parallel.pp", "2", "--parallel.dp_shard", "1"], "parallel.pp")):
        with pytest.raises(ConfigError) as err:
            load_job_config(None, parse_override_args([*BASE, *extra, "--distill.teacher", "t"]), world_size=2)
        assert f"{key} = 2" in str(err.value) and "data parallelism" in str(err.value)
    for bad, phrase in ((["--distill.alpha", "1.5"], "distill.alpha"), (["--distill.temperature", "0"],
                        "distill.temperature"), (["--distill.cache_dir", "x"], "distill.cache_dir")):
        with pytest.raises(ConfigError, match=phrase):
            load_job_config(None, parse_override_args([*BASE, "--distill.teacher", "t", *bad]))


def test_no_teacher_loaded_is_one_line(tiny_data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no teacher was loaded"):
        Trainer(student(tiny_data_dir, tmp_path / "s"), echo=False)




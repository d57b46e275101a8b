"""`lmforge watermark embed-model` and `verify-model` end to end on a tiny run directory made here
(no training): the marked run is read back with BER 0, the source run is left byte for byte as it
was, the marked run goes through `compress quantize` (int8 weight and dynamic), `compress prune` (30% magnitude) and
`train --train.init_from` and is still detected in each, the unmarked run and another key are not,
and bad inputs end in one line with exit code 2, never showing the key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from lmforge.checkpoint.weights import save_model_weights
from lmforge.cli import main
from lmforge.config import DataConfig, JobConfig, ModelConfig, TokenizerConfig, TrainConfig
from lmforge.models.registry import family_of
from tests.helpers.cli import tiny_run_args

pytestmark = pytest.mark.usefixtures("one_thread")

# the model of tests/helpers/cli.py TINY_MODEL, so `train --train.init_from` takes the run
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=64)


@pytest.fixture(scope="module")
def run_dir(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("model-wm") / "src"
    job = JobConfig(model=CFG, tokenizer=TokenizerConfig(vocab_size=512), data=DataConfig(dir=str(tiny_data_dir)),
                    train=TrainConfig(output_dir=str(run), seq_len=32, micro_batch_size=4, global_batch_size=4))
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(asdict(job)))
    (run / "tokenizer.json").write_bytes((tiny_data_dir / "tokenizer.json").read_bytes())
    save_model_weights(run / "checkpoints" / "step-00000007", family_of(CFG).build(CFG, "cpu", 0))
    return run


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("model-wm-keys")
    for name in ("owner.key", "other.key"):
        assert main(["watermark", "keygen", str(d / name)]) == 0
    return d / "owner.key", d / "other.key"


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def verify(source: Path, key: Path, capsys) -> dict:
    code, out, err = cli(["watermark", "verify-model", str(source), "--key-file", str(key), "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_embed_verify_and_the_mark_survives_quantize_and_prune(run_dir: Path, keys, tmp_path: Path,
                                                               capsys) -> None:
    owner, other = keys
    before = tree_digest(run_dir)
    out = tmp_path / "marked"
    code, text, err = cli(["watermark", "embed-model", str(run_dir), "--key-file", str(owner), "--out", str(out)],
                          capsys)
    assert code == 0, err
    assert "embedded 256 bits in 98304 weights of 14 block matrices" in text and "DETECTED" in text, text
    assert tree_digest(run_dir) == before  # the source is only read
    assert sorted(tree_digest(out)) == sorted(["config.json", "tokenizer.json", *(
        f"checkpoints/step-00000000/{f}" for f in tree_digest(out / "checkpoints" / "step-00000000"))])
    assert json.loads((out / "config.json").read_text())["train"]["output_dir"] == str(out)
    secret = owner.read_text().strip()
    assert secret not in text + err

    r = verify(out, owner, capsys)
    assert (r["errors"], r["bit_error_rate"], r["detected"]) == (0, 0.0, True) and r["p_value"] < 1e-6
    assert verify(run_dir, owner, capsys)["detected"] is False  # the unmarked source
    assert verify(out, other, capsys)["p_value"] > 0.01  # another key

    code, text, _ = cli(["watermark", "verify-model", str(out), "--key-file", str(owner)], capsys)
    assert code == 0 and "bit error rate 0.0000: 0/256 bits wrong" in text and "watermark DETECTED" in text

    for scheme in ("int8-weight", "int8-dynamic"):  # read from the stored int8 rows whatever the runtime
        q8 = tmp_path / scheme
        assert cli(["compress", "quantize", str(out), "--scheme", scheme, "--out", str(q8)], capsys)[0] == 0
        r = verify(q8, owner, capsys)
        assert r["detected"] and r["p_value"] < 1e-3 and r["errors"] == 0
    pruned = tmp_path / "pruned"
    assert cli(["compress", "prune", str(out), "--method", "magnitude", "--sparsity", "0.3", "--out", str(pruned)],
               capsys)[0] == 0
    r = verify(pruned, owner, capsys)
    assert r["detected"] and r["p_value"] < 1e-3 and r["errors"] == 0


def test_the_marked_run_fine_tunes_with_init_from_and_stays_marked(run_dir: Path, keys, tiny_data_dir: Path,
                                                                   tmp_path: Path, capsys) -> None:
    owner, _ = keys
    out = tmp_path / "marked"
    code, text, err = cli(["watermark", "embed-model", str(run_dir), "--key-file", str(owner), "--out", str(out),
                           "--json"], capsys)
    assert code == 0 and json.loads(text)["verify"]["errors"] == 0, err
    tuned = tmp_path / "tuned"
    code, _, err = cli(["train", *tiny_run_args(tiny_data_dir, tuned, "--train.steps", "3", "--train.init_from",
                                                str(out), "--train.eval_interval", "0", "--optimizer.lr", "1e-3",
                                                "--train.global_batch_size", "4", "--train.micro_batch_size", "4")],
                       capsys)
    assert code == 0, err
    r = verify(tuned, owner, capsys)
    assert r["detected"] and r["p_value"] < 1e-3


def test_bad_inputs_end_in_one_line_with_exit_2(run_dir: Path, keys, tmp_path: Path, capsys) -> None:
    owner, _ = keys
    short = tmp_path / "short.key"
    short.write_text("too short\n")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    embed = ["watermark", "embed-model", str(run_dir), "--out", str(tmp_path / "o")]
    cases = [
        ([*embed, "--key-file", str(tmp_path / "nope.key")], "no such file"),
        ([*embed, "--key-file", str(short)], "need at least 16"),
        (["watermark", "embed-model", str(tmp_path / "missing"), "--key-file", str(owner), "--out",
          str(tmp_path / "o")], "missing"),
        (["watermark", "verify-model", str(tmp_path / "missing"), "--key-file", str(owner)], "missing"),
        (["watermark", "verify-model", str(run_dir), "--key-file", str(short)], "need at least 16"),
        ([*embed, "--key-file", str(owner), "--bits", "8"], "bits = 8: must be in 32..512"),
        ([*embed, "--key-file", str(owner), "--margin", "0.5"], "above the dead zone"),
        (["watermark", "embed-model", str(run_dir), "--key-file", str(owner), "--out", str(tmp_path / "busy")],
         "already exists"),
        (["watermark", "embed-model", str(run_dir), "--key-file", str(owner), "--out",
          str(run_dir / "marked")], "source"),
        (["watermark", "verify-model", str(run_dir), "--key-file", str(owner), "--alpha", "2"], "alpha = 2"),
    ]
    before = tree_digest(run_dir)
    for argv, needle in cases:
        code, out, err = cli(argv, capsys)
        assert code == 2, (argv, out, err)
        assert len(err.strip().splitlines()) == 1 and needle in err, (argv, err)
        assert owner.read_text().strip() not in out + err
    assert not (tmp_path / "o").exists() and tree_digest(run_dir) == before

"""Config: recipes + overrides build typed dataclasses; each kind of bad value is one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config import ConfigError, JobConfig, load_job_config, parse_override_args

REPO = Path(__file__).resolve().parents[2]


def test_recipe_and_overrides_are_typed(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\ndim = 128\nn_heads = 4\n[train]\nsteps = 7\nmixed_precision = "fp32"\n'
                      '[scheduler]\nwarmup_steps = 2\n')
    cfg = load_job_config(str(recipe), parse_override_args(["--model.n_layers", "3", "--optimizer.lr=0.01",
                                                            "--model.n_kv_heads", "2", "--model.tie_embeddings",
                                                            "true"]))
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.n_kv_heads) == (128, 3, 2)
    assert cfg.model.tie_embeddings is True
    assert cfg.optimizer.lr == pytest.approx(0.01)
    assert cfg.train.steps == 7 and cfg.train.mixed_precision == "fp32"


def test_shipped_cpu_recipes_are_valid() -> None:
    """CPU recipes run as one process; GPU layouts are checked at their world size in test_recipes."""
    recipes = sorted((REPO / "recipes").glob("tiny-*.toml"))
    assert recipes, "no recipes shipped"
    for r in recipes:
        assert isinstance(load_job_config(str(r)), JobConfig)


BAD_CASES = [
    # (kind, overrides, key in message, phrase in message)
    ("unknown key", ["--model.widht", "3"], "model.widht", "unknown key"),
    ("unknown section", ["--modle.dim", "3"], "modle", "unknown key"),
    ("wrong type int", ["--train.steps", "many"], "train.steps", "must be an integer"),
    ("wrong type float", ["--optimizer.lr", "fast"], "optimizer.lr", "must be a number"),
    ("wrong type bool", ["--train.compile", "maybe"], "train.compile", "true or false"),
    ("not a choice", ["--train.mixed_precision", "fp8"], "train.mixed_precision", "one of"),
    ("out of range negative", ["--train.steps", "-5"], "train.steps", "must be > 0"),
    ("out of range beta", ["--optimizer.beta2", "1.5"], "optimizer.beta2", "[0, 1)"),
    ("heads not dividing width", ["--model.dim", "250", "--model.n_heads", "4"], "model.n_heads", "must divide"),
    ("kv heads not dividing heads", ["--model.n_kv_heads", "3"], "model.n_kv_heads", "must divide"),
    ("odd head dim", ["--model.dim", "36", "--model.n_heads", "4"], "model.n_heads", "even head dim"),
    ("seq longer than model", ["--train.seq_len", "4096", "--model.max_seq_len", "2048"], "train.seq_len",
     "model.max_seq_len"),
    ("batch not divisible", ["--train.global_batch_size", "10", "--train.micro_batch_size", "4"],
     "train.global_batch_size", "multiple of"),
    ("warmup longer than run", ["--train.steps", "10", "--scheduler.warmup_steps", "20"],
     "scheduler.warmup_steps", "train.steps"),
    ("tokenizer larger than model", ["--tokenizer.vocab_size", "9000", "--model.vocab_size", "8192"],
     "tokenizer.vocab_size", "model.vocab_size"),
    ("missing value", ["--train.steps"], "train.steps", "missing value"),
    ("section set as value", ["--model", "3"], "model", "section"),
]


@pytest.mark.parametrize("kind,overrides,key,phrase", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_override_is_one_line_exit_2(kind, overrides, key, phrase, capsys) -> None:
    code = main(["data", "prepare", *overrides])
    err = capsys.readouterr().err
    assert code == 2, kind
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert key in lines[0] and phrase in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("text,key,phrase", [
    ("[model]\nwidth = 3\n", "model.width", "unknown key"),
    ('[model]\ndim = "big"\n', "model.dim", "must be an integer"),
    ("[train]\nsteps = 1.5\n", "train.steps", "must be an integer"),
    ("[model\n", "recipe", "not valid TOML"),
    ("model = 3\n", "model", "table"),
])
def test_bad_recipe_is_one_line_exit_2(tmp_path: Path, capsys, text: str, key: str, phrase: str) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    code = main(["train", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert key in err[0] and phrase in err[0] and "bad.toml" in err[0]


def test_missing_recipe_file(capsys) -> None:
    assert main(["train", "no/such/recipe.toml"]) == 2
    err = capsys.readouterr().err.strip()
    assert "file not found" in err and "no/such/recipe.toml" in err


def test_world_size_checked_before_start() -> None:
    with pytest.raises(ConfigError, match=r"train.global_batch_size.*x 3"):
        load_job_config(None, parse_override_args(["--train.global_batch_size", "8",
                                                   "--train.micro_batch_size", "4"]), world_size=3)


def test_code_built_configs_with_nonfinite_floats_are_refused() -> None:
    """Not only parsed values: a JobConfig built in code is walked field by field (issue 10)."""
    from lmforge.config import ModelConfig, OptimizerConfig

    for cfg, key in ((JobConfig(optimizer=OptimizerConfig(lr=float("inf"))), r"optimizer\.lr"),
                     (JobConfig(model=ModelConfig(rope_theta=float("nan"))), r"model\.rope_theta")):
        with pytest.raises(ConfigError, match=key + ".*finite"):
            cfg.validate()
    JobConfig().validate()  # the defaults stay valid

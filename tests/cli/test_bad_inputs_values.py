"""Bad inputs, the values half (issue 10 items 3, 4, 5, 8): non-finite and out-of-range options,
sizes that cannot fit, refusals before launch, corrupted packed data, invalid UTF-8, strict JSON,
exported file modes, and a 50 MB document in bounded memory.

Every case checks the exit code (2 for user errors), that stderr is at most a few lines without
"Traceback", and, where it touches existing data, that a hash of that data is unchanged. Most
cases run `lmforge.cli.main` in-process (validation fails before any training); the launcher
cases and the memory case run a real process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.data.files import fingerprint
from lmforge.data.verify import pack_files
from tests.helpers.cli import REPO, tiny_run_args, train_in_process

MAX_STDERR_LINES = 3


def tree_hash(path: Path) -> str:
    """sha256 over names and contents of every file under `path` (or of the file itself)."""
    h = hashlib.sha256()
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in paths:
        h.update(str(p.relative_to(path) if p != path else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def assert_clean_stderr(err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) <= MAX_STDERR_LINES, f"{len(lines)} stderr lines:\n{err}"


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    assert_clean_stderr(err)
    return code, out, err


# -- fixtures: one tiny data dir (session), one tiny trained run (module) ----------------------------


@pytest.fixture(scope="module")
def run_dir(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("values-run")
    train_in_process(tiny_run_args(tiny_data_dir, run, "--train.steps", "2", "--train.global_batch_size", "2",
                                   "--train.micro_batch_size", "2", "--train.eval_interval", "0",
                                   "--checkpoint.interval", "2"))
    return run


def train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *tiny_run_args(data_dir, out, "--train.steps", "1", "--train.global_batch_size", "2",
                                    "--train.micro_batch_size", "2", "--train.eval_interval", "0",
                                    "--checkpoint.enabled", "false", "--scheduler.warmup_steps", "1", *extra)]


# -- item 3 and 5: refused by validation, before any data or model is touched -------------------------


@dataclass
class Refusal:
    name: str
    overrides: list[str]
    expect: list[str]  # substrings of the one error line
    recipe: str | None = None  # TOML text of a recipe file, when the case is about recipes
    extra_check: Callable[[str], None] | None = field(default=None, repr=False)


REFUSALS = [
    Refusal("lr inf", ["--optimizer.lr", "inf"], ["optimizer.lr", "finite"]),
    Refusal("lr nan", ["--optimizer.lr", "nan"], ["optimizer.lr", "finite"]),
    Refusal("lr above range", ["--optimizer.lr", "10"], ["optimizer.lr", "(0, 1]"]),
    Refusal("norm_eps 1e400", ["--model.norm_eps", "1e400"], ["model.norm_eps", "finite"]),
    Refusal("norm_eps above range", ["--model.norm_eps", "0.5"], ["model.norm_eps", "(0, 0.1]"]),
    Refusal("init_std 1e30", ["--model.init_std", "1e30"], ["model.init_std", "(0, 1]"]),
    Refusal("init_std -inf", ["--model.init_std", "-inf"], ["model.init_std", "finite"]),
    Refusal("adam eps inf", ["--optimizer.eps", "-inf"], ["optimizer.eps", "finite"]),
    Refusal("adam eps above range", ["--optimizer.eps", "1"], ["optimizer.eps", "(0, 0.1]"]),
    Refusal("beta1 nan", ["--optimizer.beta1", "nan"], ["optimizer.beta1", "finite"]),
    Refusal("weight decay inf", ["--optimizer.weight_decay", "inf"], ["optimizer.weight_decay", "finite"]),
    Refusal("min_lr_ratio nan", ["--scheduler.min_lr_ratio", "NaN"], ["scheduler.min_lr_ratio", "finite"]),
    Refusal("rope_theta inf", ["--model.rope_theta", "Infinity"], ["model.rope_theta", "finite"]),
    Refusal("max_grad_norm inf", ["--train.max_grad_norm", "inf"], ["train.max_grad_norm", "finite"]),
    Refusal("peak_flops inf", ["--metrics.peak_flops", "inf"], ["metrics.peak_flops", "finite"]),
    Refusal("spike_zscore nan", ["--stability.spike_zscore", "nan"], ["stability.spike_zscore", "finite"]),
    Refusal("val_fraction nan", ["--data.val_fraction", "nan"], ["data.val_fraction", "finite"]),
    Refusal("recipe lr = nan", [], ["optimizer.lr", "finite", "recipe.toml"], recipe="[optimizer]\nlr = nan\n"),
    Refusal("recipe norm_eps = inf", [], ["model.norm_eps", "finite"], recipe="[model]\nnorm_eps = inf\n"),
    Refusal("recipe of random bytes", [], ["recipe", "not UTF-8"], recipe=b"\xff\xfe\x00\x9c" * 64),  # type: ignore[arg-type]
    Refusal("10**12 layers cannot fit (refused at once)", ["--model.n_layers", "1000000000000"],
            ["model", "GiB", "parameters"]),
    Refusal("max_seq_len 10**10: RoPE tables cannot fit", ["--model.max_seq_len", "10000000000"],
            ["RoPE", "GiB"]),
    Refusal("dim 1048576 cannot fit", ["--model.dim", "1048576", "--model.n_heads", "8", "--model.max_seq_len", "64"],
            ["model", "GiB", "parameters"]),
]


@pytest.mark.parametrize("case", REFUSALS, ids=lambda c: c.name)
def test_refused_before_training(case: Refusal, tiny_data_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    before = tree_hash(tiny_data_dir)
    out_dir = tmp_path / "run"
    argv = train_args(tiny_data_dir, out_dir, *case.overrides)
    if case.recipe is not None:
        recipe = tmp_path / "recipe.toml"
        recipe.write_bytes(case.recipe if isinstance(case.recipe, bytes) else case.recipe.encode())
        argv.insert(1, str(recipe))
    code, _, err = run_main(argv, capsys)
    assert code == 2, err
    for phrase in case.expect:
        assert phrase in err, f"{phrase!r} not in {err!r}"
    assert not out_dir.exists(), "refused before the run directory was created"
    assert tree_hash(tiny_data_dir) == before


def test_memory_refusal_gives_the_estimate(tiny_data_dir: Path, tmp_path: Path, capsys) -> None:
    from lmforge.config import load_job_config, parse_override_args
    from lmforge.train.preflight import TRAIN_BYTES_PER_PARAM, fixed_buffer_bytes, training_state_bytes

    over = ["--model.dim", "1048576", "--model.n_heads", "8", "--model.max_seq_len", "64"]
    cfg = load_job_config(None, parse_override_args(train_args(tiny_data_dir, tmp_path / "r", *over)[1:]))
    params, need = training_state_bytes(cfg, 1)
    assert need == params * TRAIN_BYTES_PER_PARAM and params > 2e13
    code, _, err = run_main(train_args(tiny_data_dir, tmp_path / "r", *over), capsys)
    assert code == 2 and f"{(need + fixed_buffer_bytes(cfg)) / 2**30:,.1f} GiB" in err


def test_cuda_device_without_cuda_is_one_line(tiny_data_dir: Path, tmp_path: Path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: train.device = 'cuda' is valid here")
    code, _, err = run_main(train_args(tiny_data_dir, tmp_path / "r", "--train.device", "cuda"), capsys)
    assert code == 2 and "train.device" in err and "no CUDA device" in err


# -- item 5: pipeline refusals answered by the launcher, no torchrun started -------------------------


BATCH4 = ["--train.micro_batch_size", "4", "--train.global_batch_size", "4"]  # 4 pipeline microbatches
LAUNCH_REFUSALS = [
    ("tied embeddings pp2", ["--parallel.pp", "2", "--model.tie_embeddings", "true"], "model.tie_embeddings"),
    ("compile with zbv", ["--parallel.pp", "2", "--parallel.pp_schedule", "zbv", "--train.compile", "true",
                          "--model.n_layers", "4", *BATCH4], "train.compile"),
    ("compile with interleaved_zb", ["--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_zb",
                                     "--train.compile", "true", "--model.n_layers", "4", *BATCH4], "train.compile"),
    ("interleaved rounds", ["--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_1f1b", "--model.n_layers",
                            "4", "--train.micro_batch_size", "10", "--train.global_batch_size", "10",
                            "--parallel.pp_microbatches", "5"], "parallel.pp_microbatches"),
]


def _timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("name,overrides,key", LAUNCH_REFUSALS, ids=[c[0] for c in LAUNCH_REFUSALS])
def test_launcher_refuses_before_torchrun(name: str, overrides: list[str], key: str, tiny_data_dir: Path,
                                          tmp_path: Path) -> None:
    # Baseline in the same run (the machine is shared): a bare interpreter importing torch, which a
    # started torchrun with two workers would need three times over.
    _, baseline = _timed([sys.executable, "-c", "import torch"])
    before = tree_hash(tiny_data_dir)
    argv = train_args(tiny_data_dir, tmp_path / "run", *overrides)
    proc, took = _timed([sys.executable, "-m", "lmforge", argv[0], "--nproc", "2", *argv[1:]])
    assert proc.returncode == 2, proc.stderr
    assert_clean_stderr(proc.stderr)
    assert key in proc.stderr and "rank" not in proc.stderr.lower() and "torch.distributed" not in proc.stderr
    # torchrun would run a launcher and two workers, each importing torch (>= 3x the baseline on 2
    # cores) and print its failure report (many lines, caught above); the launcher alone is one
    # import plus validation. 2x leaves room for the noise of a shared machine.
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge train: config error:"), proc.stderr
    assert took < 2 * baseline + 5.0, f"{took:.1f} s (baseline {baseline:.1f} s): was torchrun started?"
    assert not (tmp_path / "run").exists()
    assert tree_hash(tiny_data_dir) == before


# -- item 3 at trainer start: batch larger than the data, eval batches capped ------------------------


def _train_windows(data_dir: Path, seq_len: int) -> int:
    """Windows of the training split; with domains, windows stay inside each domain's range."""
    train = json.loads((data_dir / "manifest.json").read_text())["splits"]["train"]
    if train.get("domains"):
        return sum(max(0, (d["tokens"] - 1) // seq_len) for d in train["domains"])
    return (train["tokens"] - 1) // seq_len


def test_global_batch_larger_than_the_data_is_refused(tiny_data_dir: Path, tmp_path: Path, capsys) -> None:
    before = tree_hash(tiny_data_dir)
    n = _train_windows(tiny_data_dir, 32) + 1
    code, _, err = run_main(train_args(tiny_data_dir, tmp_path / "r", "--train.global_batch_size", str(n),
                                       "--train.micro_batch_size", str(n)), capsys)
    assert code == 2 and "train.global_batch_size" in err and f"{n - 1} windows" in err
    assert tree_hash(tiny_data_dir) == before


def test_huge_eval_batches_are_capped_with_a_note(tiny_data_dir: Path, tmp_path: Path, capsys) -> None:
    before = tree_hash(tiny_data_dir)
    t0 = time.perf_counter()
    code, out, err = run_main(train_args(tiny_data_dir, tmp_path / "r", "--train.eval_interval", "1",
                                         "--train.eval_batches", "1000000"), capsys)
    assert code == 0, err
    assert time.perf_counter() - t0 < 120  # a million batches would run for hours
    notes = [ln for ln in out.splitlines() if "eval_batches = 1000000 capped to" in ln]
    assert len(notes) == 1, out
    m = json.loads((tiny_data_dir / "manifest.json").read_text())
    assert f"capped to {max(1, ((m['splits']['val']['tokens'] - 1) // 32) // 2)}:" in notes[0]
    val = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["prefix"] == "val" and math.isfinite(r["loss"]) for r in val)
    assert tree_hash(tiny_data_dir) == before


# -- item 4: packed data verified against its manifest ----------------------------------------------


@pytest.fixture
def data_copy(tiny_data_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(tiny_data_dir, d)
    return d


def _overwrite_same_size(path: Path, seed: int = 0) -> None:
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    assert path.stat().st_size == size


def test_verify_intact_pack(data_copy: Path, capsys) -> None:
    before = tree_hash(data_copy)
    code, out, _ = run_main(["data", "verify", str(data_copy)], capsys)
    assert code == 0 and out.strip() == f"{data_copy}: ok"
    assert tree_hash(data_copy) == before


@pytest.mark.parametrize("name", ["train.bin", "val.bin", "train.idx.npy", "val.docs.npy"])
def test_verify_finds_same_size_overwrite(name: str, data_copy: Path, capsys) -> None:
    _overwrite_same_size(data_copy / name)
    before = tree_hash(data_copy)
    code, _, err = run_main(["data", "verify", str(data_copy)], capsys)
    assert code == 1 and name in err and "sha256" in err
    assert tree_hash(data_copy) == before  # verify never writes


def test_prepare_repacks_a_modified_shard_instead_of_up_to_date(data_copy: Path, capsys) -> None:
    good = (data_copy / "train.bin").read_bytes()
    _overwrite_same_size(data_copy / "train.bin")
    code, out, _ = run_main(["data", "prepare", "--data.dir", str(data_copy), "--data.max_documents", "120",
                             "--data.val_fraction", "0.05", "--tokenizer.vocab_size", "512"], capsys)
    assert code == 0
    assert "train.bin: content differs" in out and "packed again" in out
    shards = [ln for ln in out.splitlines() if ln.startswith("data: shards")]
    assert shards and "up to date" not in shards[0]
    assert (data_copy / "train.bin").read_bytes() == good


def test_dataset_open_refuses_a_modified_index(data_copy: Path) -> None:
    from lmforge.data.errors import DataError
    from lmforge.data.loader import TokenDataset

    _overwrite_same_size(data_copy / "train.idx.npy")
    with pytest.raises(DataError, match="train.idx.npy: content differs"):
        TokenDataset(data_copy, "train")
    TokenDataset(data_copy, "val")  # the other split is intact


def _all_ff_but_consistent(d: Path) -> None:
    """Every train token 0xFFFF and the manifest re-fingerprinted: a pack whose hashes agree but
    whose ids are outside the vocabulary (what a buggy external packer could write)."""
    (d / "train.bin").write_bytes(b"\xff" * (d / "train.bin").stat().st_size)
    m = json.loads((d / "manifest.json").read_text())
    m["files"] = {name: fingerprint(d / name) for name in pack_files()}
    (d / "manifest.json").write_text(json.dumps(m))


def test_token_ids_outside_vocabulary_refused_in_training(data_copy: Path, tmp_path: Path, capsys) -> None:
    _all_ff_but_consistent(data_copy)
    before = tree_hash(data_copy)
    code, _, err = run_main(train_args(data_copy, tmp_path / "r"), capsys)
    assert code == 2 and "token id 65535" in err and "outside the vocabulary" in err
    assert tree_hash(data_copy) == before


def test_verify_finds_token_ids_outside_vocabulary(data_copy: Path, capsys) -> None:
    _all_ff_but_consistent(data_copy)
    before = tree_hash(data_copy)
    code, _, err = run_main(["data", "verify", str(data_copy)], capsys)
    assert code == 1 and "token id 65535 at position 0 is outside the vocabulary (512 ids)" in err
    assert tree_hash(data_copy) == before


def test_verify_of_a_dir_that_is_not_packed(tmp_path: Path, capsys) -> None:
    code, _, err = run_main(["data", "verify", str(tmp_path)], capsys)
    assert code == 1 and "no readable manifest.json" in err


def test_verify_of_a_missing_dir_says_so(tmp_path: Path, capsys) -> None:
    code, _, err = run_main(["data", "verify", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.strip() == f"lmforge data verify: {tmp_path / 'nope'}: no such file or directory"


def test_invalid_utf8_is_counted_per_source(tmp_path: Path, capsys) -> None:
    src = tmp_path / "c.jsonl"
    lines = [b'{"text": "fine text number %d here", "source": "good"}' % i for i in range(6)]
    lines += [b'{"text": "bad \xff\xfe bytes %d", "source": "latin"}' % i for i in range(3)]
    lines += [b'{"text": "lone \\ud800 surrogate", "source": "escaped"}']
    src.write_bytes(b"\n".join(lines) + b"\n")
    before = tree_hash(src)
    code, out, err = run_main(["data", "prepare", "--data.corpus", str(src), "--data.dir", str(tmp_path / "d"),
                               "--tokenizer.vocab_size", "300", "--data.val_fraction", "0.2"], capsys)
    assert code == 0, err
    assert "invalid UTF-8 replaced with U+FFFD in 1 documents of escaped, 3 documents of latin" in out
    corpus = (tmp_path / "d" / "corpus.jsonl").read_bytes().decode("utf-8")  # strict: valid UTF-8 out
    assert corpus.count("\ufffd") == 3 * 2 + 1
    assert tree_hash(src) == before


# -- item 3: generate and bench peak arguments --------------------------------------------------------


@pytest.mark.parametrize("flag,value,phrase", [
    ("--temperature", "inf", "temperature = inf"),
    ("--temperature", "nan", "temperature = nan"),
    ("--temperature", "-1", "temperature = -1"),
    ("--top-p", "nan", "top_p = nan"),
])
def test_generate_refuses_bad_sampling(flag: str, value: str, phrase: str, run_dir: Path, capsys) -> None:
    before = tree_hash(run_dir)
    code, _, err = run_main(["generate", str(run_dir), "--prompt", "And", flag, value], capsys)
    assert code == 2 and phrase in err
    assert tree_hash(run_dir) == before


def test_generate_says_when_the_context_ends_it(run_dir: Path, capsys) -> None:
    before = tree_hash(run_dir)
    code, out, err = run_main(["generate", str(run_dir), "--prompt", "And God said", "--max-new-tokens",
                               "1000000", "--temperature", "0"], capsys)
    assert code == 0
    note = [ln for ln in err.splitlines() if ln.startswith("note:")]
    assert len(note) == 1 and "of --max-new-tokens 1000000" in note[0] and "context is 64 tokens" in note[0]
    assert tree_hash(run_dir) == before


@pytest.mark.parametrize("n", ["100000", "0", "-5"])
def test_bench_peak_refuses_n_it_would_not_measure(n: str, capsys) -> None:
    t0 = time.perf_counter()
    code, _, err = run_main(["bench", "peak", "--n", n, "--dtypes", "fp32"], capsys)
    assert code == 2 and "--n" in err and "[16, 16384]" in err
    assert time.perf_counter() - t0 < 5  # refused, not measured


@pytest.mark.skipif(torch.cuda.is_available(), reason="tf32 is measured where there is a GPU")
@pytest.mark.parametrize("dtypes", ["tf32", "fp32,TF32"])
def test_bench_peak_refuses_tf32_without_a_gpu(dtypes: str, capsys) -> None:
    """It used to measure nothing for tf32 and exit 0, printing no line for it."""
    t0 = time.perf_counter()
    code, out, err = run_main(["bench", "peak", "--dtypes", dtypes], capsys)
    assert code == 2 and "--dtypes" in err and "without a GPU" in err and "bf16, fp16, fp32" in err
    assert out == "" and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - t0 < 5  # refused before any dtype was measured


@pytest.mark.parametrize("size", ["inf", "nanGB", "-1MB"])
def test_export_refuses_nonfinite_shard_size(size: str, run_dir: Path, tmp_path: Path, capsys) -> None:
    before = tree_hash(run_dir)
    with pytest.raises(SystemExit) as e:  # argparse's own usage error: exit 2, usage + one line
        main(["export", str(run_dir), str(tmp_path / "hf"), f"--max-shard-size={size}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    # argparse prints its usage (wrapped over lines), then the one error line
    assert_clean_stderr("\n".join(ln for ln in err.splitlines() if not ln.startswith(("usage:", " "))))
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("lmforge export: error:")
    assert "must be a positive size" in err and not (tmp_path / "hf").exists()
    assert tree_hash(run_dir) == before


# -- item 8: strict JSON, modes under the umask -------------------------------------------------------


def _strict_load(text: str):
    def refuse(token: str):
        raise AssertionError(f"non-strict JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_every_json_file_written_is_strict(run_dir: Path, tiny_data_dir: Path) -> None:
    files = [p for d in (run_dir, tiny_data_dir) for p in d.rglob("*.json")]
    assert any(p.name == "config.json" for p in files) and any(p.name == "manifest.json" for p in files)
    for p in files:
        _strict_load(p.read_text())
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        _strict_load(line)


def test_nonfinite_metrics_are_null_with_a_flag(tmp_path: Path) -> None:
    from lmforge.observability.metrics import MetricsLogger, read_metrics

    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    rec = _strict_load((tmp_path / "metrics.jsonl").read_text())
    assert rec["loss"] is None and rec["grad_norm"] is None and rec["lr"] == 1e-3
    assert rec["nonfinite"] == {"loss": "nan", "grad_norm": "inf"}
    back = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert math.isnan(back["loss"]) and back["grad_norm"] == math.inf and "nonfinite" not in back


def test_export_honours_the_umask(run_dir: Path, tmp_path: Path, capsys) -> None:
    before = tree_hash(run_dir)
    old = os.umask(0o022)
    try:
        code, _, _ = run_main(["export", str(run_dir), str(tmp_path / "hf")], capsys)
    finally:
        os.umask(old)
    assert code == 0
    out = tmp_path / "hf"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes
    assert tree_hash(run_dir) == before


# -- item 4: a 50 MB document in bounded memory -------------------------------------------------------


def test_long_document_pieces_tokenize_identically(tiny_data_dir: Path) -> None:
    """Cutting at pre-token boundaries gives exactly the ids of the whole text."""
    from lmforge.data.tokenizer import TextTokenizer, bounded_pieces

    tok = TextTokenizer.from_file(tiny_data_dir / "tokenizer.json")
    rng = np.random.default_rng(0)
    words = ["the", "Lord", "said", "  ", "\n", "ñandú", "42", "3.5", "'s", "—", "!!", " ", "a\tb", "日本"]
    text = "".join(words[i] + (" " if rng.random() < 0.7 else "") for i in rng.integers(0, len(words), 20000))
    pieces = list(bounded_pieces(text, max_chars=97))
    assert "".join(pieces) == text and len(pieces) > 100 and max(map(len, pieces)) <= 97
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def words_utf8(words: list[str], picks: np.ndarray) -> bytes:
    """`" ".join(words[i] for i in picks)` as UTF-8, built in numpy (the 50 MB document's 10.5M-word
    join took 3x as long in Python). Each word and its following space is one row of a padded byte
    table; the rows of `picks`, without the padding, are the text."""
    rows = [w.encode() + b" " for w in words]
    width = max(map(len, rows))
    table = np.zeros((len(rows), width), dtype=np.uint8)
    for i, row in enumerate(rows):
        table[i, :len(row)] = np.frombuffer(row, dtype=np.uint8)
    lengths = np.array([len(row) for row in rows])
    return table[picks][np.arange(width) < lengths[picks][:, None]][:-1].tobytes()  # no space after the last


BIG_DOC_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "élan", "naïve", "42", "3.14", "—",
                 "end.", "Lorem", "ipsum"]


def test_words_utf8_is_the_joined_text() -> None:
    picks = np.random.default_rng(1).integers(0, len(BIG_DOC_WORDS), 500)
    text = " ".join(BIG_DOC_WORDS[i] for i in picks)
    assert words_utf8(BIG_DOC_WORDS, picks) == text.encode()
    assert json.dumps({"text": text}, ensure_ascii=False) == '{"text": "' + text + '"}'  # nothing to escape


@pytest.mark.slow
def test_50mb_document_prepares_in_under_1gb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    text = words_utf8(BIG_DOC_WORDS, rng.integers(0, len(BIG_DOC_WORDS), 10_500_000))
    assert np.count_nonzero((np.frombuffer(text, dtype=np.uint8) & 0xC0) != 0x80) >= 50_000_000  # characters
    src = tmp_path / "big.jsonl"
    with open(src, "wb") as f:  # the line json.dumps(ensure_ascii=False) writes (no escapes: test above)
        f.write(b'{"text": "' + text + b'"}\n')
        for i in range(8):
            f.write((json.dumps({"text": f"a small document {i}"}) + "\n").encode())
    del text
    # VmHWM: the peak RSS of this process image. (getrusage's ru_maxrss would not do: Linux carries
    # the forking parent's peak, this test process's, across exec into it.)
    code = ("import sys; from lmforge.cli import main; rc = main(sys.argv[1:]); "
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0].split()[1]; "
            "print('PEAK_KB', hwm); sys.exit(rc)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, "data", "prepare", "--data.corpus", str(src), "--data.dir",
                           str(tmp_path / "d"), "--tokenizer.vocab_size", "300", "--data.val_fraction", "0.2"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_clean_stderr(proc.stderr)
    peak_kb = int(proc.stdout.split("PEAK_KB")[1].split()[0])
    assert peak_kb * 1024 < 2**30, f"peak RSS {peak_kb / 2**20:.2f} GiB"
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] > 10_000_000


@pytest.mark.parametrize("argv,line", [
    (["plan", "--model", "recipes/tiny-dense.toml", "--cluster", "cpu", "--world-size", "0"],
     "lmforge plan: --world-size 0: must be >= 1"),  # it silently planned for the default instead
    (["plan", "--model", "recipes/tiny-dense.toml", "--cluster", "cpu", "--top", "-1"],
     "lmforge plan: --top -1: must be >= 1"),  # it printed "best -1:" and 65 layouts
    (["compress", "quantize", "RUN", "--scheme", "int8-weight", "--calib-samples", "-5", "--out", "OUT"],
     "lmforge compress quantize: --calib-samples: int4-weight only; int8-weight quantizes per row without calibration"),
    (["compress", "quantize", "RUN", "--scheme", "int4-weight", "--calib-samples", "0", "--out", "OUT"],
     "lmforge compress quantize: --calib-samples 0: must be >= 1"),
    (["serve", "RUN", "--max-tokens-limit", "0"], "lmforge serve: --max-tokens-limit 0: must be >= 1"),
    (["safety", "scan", "-", "--filter", "no-such.toml"],
     "lmforge safety scan: config error: --filter = 'no-such.toml': file not found; a filter TOML (see "
     "recipes/safety/filter.toml)"),
    (["generate", "RUN", "--prompt", "KING", "--device", "bogus"],
     "lmforge generate: --device 'bogus': not a device; use cpu, cuda or cuda:N"),
    (["data", "sample", "RUN", "--reference", "REF", "--out", "OUT", "--device", "bogus"],
     "lmforge data sample: --device 'bogus': not a device; use cpu, cuda or cuda:N"),
])
def test_help_and_behaviour_agree_on_bad_values(argv: list[str], line: str, run_dir: Path, tmp_path: Path,
                                               capsys, monkeypatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("some text\n"))
    subst = {"RUN": str(run_dir), "OUT": str(tmp_path / "out"), "REF": str(tmp_path / "ref.jsonl")}
    (tmp_path / "ref.jsonl").write_text('{"text": "a reference document"}\n')
    code, _, err = run_main([subst.get(a, a) for a in argv], capsys)
    assert code == 2 and err.strip() == line, err
    assert not (tmp_path / "out").exists()


def test_generate_runs_on_device_auto(run_dir: Path, capsys) -> None:
    """--device auto passed the check and then failed as an internal error ("device string: auto")."""
    code, out, err = run_main(["generate", str(run_dir), "--prompt", "KING", "--max-new-tokens", "3",
                               "--temperature", "0", "--device", "auto"], capsys)
    assert code == 0 and out.strip(), err

"""Bad inputs that touch storage, table-driven (issue 10 items 1, 2, 6, 7): every command refuses to
destroy data, and every full disk, read-only directory, unreadable file or bad device ends in one
line (exit code 2, no traceback). Cases that touch existing data hash it before and after.

One tiny run (two checkpoints), one HF export of it and one converted file are made once per
module; most cases are one in-process `lmforge` call that is refused before any work. Full-disk
and read-only cases run on a size-limited tmpfs or a read-only bind mount the test creates (we
run as root; skipped with the reason where mounting is impossible) and always unmount.

Separate tests: a full disk during a checkpoint save (the previous checkpoint verifies and
`--resume auto` continues bit-identically), leftover `step-N.tmp` directories, two jobs into one
run directory, a stale lock, `--overwrite` moving a run aside, and a SIGKILLed `--nproc 2` launcher
leaving no worker behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lmforge.cli import main
from tests.helpers.cli import REPO, read_metrics

# A smaller model than tests/helpers/cli.py's TINY_MODEL: the cases here are about files, not training.
MICRO_MODEL = ["--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "1",
               "--model.vocab_size", "512", "--model.multiple_of", "32", "--model.max_seq_len", "32"]
STEPS = 6


def micro_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return [*MICRO_MODEL, "--tokenizer.vocab_size", "512", "--data.dir", str(data_dir),
            "--data.max_documents", "120", "--data.val_fraction", "0.05", "--train.output_dir", str(out_dir),
            "--train.seq_len", "16", "--train.mixed_precision", "fp32", "--train.global_batch_size", "2",
            "--train.micro_batch_size", "2", "--train.eval_interval", "0", "--train.steps", str(STEPS),
            "--scheduler.warmup_steps", "2", "--optimizer.lr", "0.01", "--metrics.log_interval", "1",
            "--metrics.tensorboard", "false", "--metrics.progress", "none", "--metrics.peak_flops", "1e11",
            "--metrics.plot", "false", "--checkpoint.interval", "2", "--checkpoint.keep_last", "5", *extra]


# -- helpers -----------------------------------------------------------------------------------------


def tree_hash(path: Path) -> str:
    """sha256 over a file, or a directory's names, kinds, symlink targets and file contents.
    `lmforge.lock` is left out: it is the lock's own bookkeeping (its holder line), not data."""
    h = hashlib.sha256()
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return "missing"
    entries = [path] if not path.is_dir() else sorted(path.rglob("*"))
    for p in entries:
        if p.name == "lmforge.lock":
            continue
        rel = p.relative_to(path).as_posix() if p != path else "."
        if p.is_symlink():
            h.update(f"L {rel} {os.readlink(p)}\n".encode())
        elif p.is_dir():
            h.update(f"D {rel}\n".encode())
        else:
            h.update(f"F {rel} ".encode() + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def cli(args: list[str]) -> tuple[int, str, str]:
    """`lmforge ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def cli_process(args: list[str], timeout: int = 180) -> tuple[int, str, str]:
    """`lmforge ARGS` in a fresh process (argv bytes exactly as given; tracebacks would show)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = [os.fsencode(a) for a in args]
    proc = subprocess.run([os.fsencode(sys.executable), b"-m", b"lmforge", *argv], cwd=REPO, env=env,
                          capture_output=True, timeout=timeout)
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def assert_one_line_error(code: int, err: str, expect_code: int = 2, max_lines: int = 3) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("WARNING", "INFO", "  "))
             and "UserWarning" not in ln]
    assert code == expect_code, f"exit code {code}, expected {expect_code}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert 1 <= len(lines) <= max_lines, err[-3000:]


def _mount(args: list[str]) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount ({' '.join(args)}): {proc.stderr.strip()} -- needs root or CAP_SYS_ADMIN")


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A size-limited tmpfs at `path` (created) for the duration: writes beyond `size` get ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    _mount(["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` (created) bind-mounted read-only onto itself for the duration: writes get EROFS."""
    path.mkdir(parents=True, exist_ok=True)
    _mount(["--bind", "-o", "ro", str(path), str(path)])
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def lock_held_by_other_process(run_dir: Path) -> Iterator[int]:
    """Another process holds `run_dir`'s lock (as a running job would); yields its pid."""
    code = ("import sys, time; from lmforge.storage.lock import RunLock; l = RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# -- the module's shared run ---------------------------------------------------------------------------


@dataclass
class World:
    data: Path  # a prepared dataset
    run: Path  # a finished run: checkpoints step-2 .. step-6, metrics, config
    hf: Path  # an HF export of it
    pt: Path  # `ckpt convert` of step 2
    straight: dict[int, float] = field(default_factory=dict)  # its per-step losses

    @property
    def ckpt2(self) -> Path:
        return self.run / "checkpoints" / "step-00000002"

    @property
    def ckpt4(self) -> Path:
        return self.run / "checkpoints" / "step-00000004"


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}  # a rerun step: its last value


@pytest.fixture(scope="module")
def world(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("storage")
    run = root / "run"
    code, out, err = cli(["train", *micro_args(tiny_data_dir, run)])
    assert code == 0, err
    hf, pt = root / "hf", root / "step2.pt"
    assert cli(["export", run, hf])[0] == 0
    assert cli(["ckpt", "convert", run / "checkpoints" / "step-00000002", pt])[0] == 0
    return World(data=tiny_data_dir, run=run, hf=hf, pt=pt, straight=losses(run))


# -- the table -----------------------------------------------------------------------------------------

Env = tuple[World, Path]  # the shared run, this case's own temp dir
ArgsFn = Callable[[World, Path], list]


@dataclass
class Case:
    id: str
    args: ArgsFn
    expect: str  # regex the error line must match (case-insensitive)
    protects: Callable[[World, Path], list[Path]] = lambda w, t: []  # data whose hash must not change
    setup: Callable[[World, Path], contextlib.AbstractContextManager] | None = None
    code: int = 2
    process: bool = False  # run in a fresh process (raw argv bytes, or to show there is no traceback)
    max_lines: int = 3  # of stderr, besides warnings and log records


def _nonempty_dir(t: Path, name: str = "keep") -> Path:
    d = t / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "precious.txt").write_text("do not lose me\n")
    return d


def _hf_like_dir(t: Path) -> Path:
    """What every Hugging Face directory holds: config.json and tokenizer.json (the two files an lmforge
    run writes first), and weights."""
    d = _nonempty_dir(t, "hf-like")
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}\n')
    (d / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (d / "model.safetensors").write_bytes(b"weights")
    (d / "precious.txt").unlink()
    return d


def _file(t: Path, name: str, text: str = '{"text": "do not lose me, a line of a corpus"}\n') -> Path:
    f = t / name
    f.write_text(text)
    return f


def _key(t: Path) -> Path:
    from lmforge.safety.secret_key import write_new_key

    write_new_key(t / "wm.key")
    return t / "wm.key"


def _copy_run(w: World, t: Path, name: str = "copy") -> Path:
    dst = t / name
    if not dst.exists():
        shutil.copytree(w.run, dst, symlinks=True)
    return dst


def _truncated_hf(w: World, t: Path) -> Path:
    d = t / "hf-trunc"
    if not d.exists():
        shutil.copytree(w.hf, d)
        st = d / "model.safetensors"
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    return d


def _damaged_step(t: Path) -> Path:
    """A checkpoint step directory by its marker (so the CLI's early path check passes it) whose
    manifest is no JSON: only the workers' checkpoint stack finds it invalid."""
    d = t / "ckpt" / "step-00000003"
    d.mkdir(parents=True, exist_ok=True)
    (d / "lmforge-checkpoint.json").write_text("not json\n")
    return d


def _random_bytes_recipe(t: Path) -> Path:
    path = t / "r.toml"
    path.write_bytes(os.urandom(200).replace(b"\xff", b"") + b"\xff\xfe")  # never valid UTF-8
    return path


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def _with_ro_run(w: World, t: Path) -> contextlib.AbstractContextManager:
    _copy_run(w, t / "ro", "run")
    return read_only(t / "ro")


def _foreign_data_dir(w: World, t: Path) -> Path:
    return _nonempty_dir(t, "not-data")


def _corpus_in_its_own_output(w: World, t: Path) -> Path:
    d = t / "ds"
    d.mkdir(exist_ok=True)
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(30)))
    return d


def _outer_with_data(w: World, t: Path) -> Path:
    outer = t / "outer"
    if not (outer / "data").exists():
        shutil.copytree(w.data, outer / "data")
    return outer


def _raise_in(target: str, exc: BaseException) -> Callable[[World, Path], contextlib.AbstractContextManager]:
    """Setup: `target` ("module:function") raises `exc` (faults a test cannot make for real: EIO, EACCES as root)."""
    import importlib

    @contextlib.contextmanager
    def patched(_w: World, _t: Path) -> Iterator[None]:
        mod_name, fn = target.split(":")
        mod = importlib.import_module(mod_name)
        orig = getattr(mod, fn)

        def boom(*_a, **_k):
            raise exc

        setattr(mod, fn, boom)
        try:
            yield
        finally:
            setattr(mod, fn, orig)

    return patched


CASES = [
    # ---- item 1: no clobbering (every case hashes what it must not touch) ----
    Case("export-onto-its-source", lambda w, t: ["export", w.run, w.run, "--overwrite"], r"same path.*refused even",
         lambda w, t: [w.run]),
    Case("export-inside-its-source", lambda w, t: ["export", w.run, w.run / "hf", "--overwrite"], r"is inside the source",
         lambda w, t: [w.run]),
    Case("export-over-dir-containing-source", lambda w, t: ["export", w.ckpt4, w.run, "--overwrite"],
         r"contains the source", lambda w, t: [w.run]),
    Case("export-into-another-checkpoint", lambda w, t: ["export", w.ckpt2, w.ckpt4, "--overwrite"],
         r"inside the checkpoint", lambda w, t: [w.run]),
    Case("export-over-nonempty-dir", lambda w, t: ["export", w.run, _nonempty_dir(t)], r"not empty.*--overwrite",
         lambda w, t: [t / "keep"]),
    Case("export-over-a-file", lambda w, t: ["export", w.run, w.pt, "--overwrite"], r"is a file",
         lambda w, t: [w.pt]),
    Case("export-symlink-to-source", lambda w, t: [
        "export", w.run, (t / "link").symlink_to(w.run) or t / "link", "--overwrite"], r"same path",
         lambda w, t: [w.run]),
    Case("train-into-existing-run", lambda w, t: ["train", *micro_args(w.data, w.run)],
         r"already holds a run.*resume auto.*--overwrite", lambda w, t: [w.run]),
    Case("train-overwrite-and-resume-auto", lambda w, t: [
        "train", *micro_args(w.data, w.run, "--checkpoint.resume", "auto"), "--overwrite"],
         r"pass one of them", lambda w, t: [w.run]),
    Case("train-overwrite-resuming-from-inside", lambda w, t: [
        "train", *micro_args(w.data, w.run, "--checkpoint.resume", str(w.ckpt2)), "--overwrite"],
         r"inside .*--overwrite would move", lambda w, t: [w.run]),
    # ---- a result file never replaces what its command reads ----
    Case("plan-out-onto-its-recipe", lambda w, t: [
        "plan", "--model", _file(t, "r.toml", (REPO / "recipes/tiny-dense.toml").read_text()), "--cluster", "cpu",
        "--out", t / "r.toml", "--overwrite"], r"--out \S+r.toml is the --model .*refused even with --overwrite",
         lambda w, t: [t / "r.toml"]),
    Case("plan-out-over-a-file", lambda w, t: [
        "plan", "--model", "recipes/tiny-dense.toml", "--cluster", "cpu", "--out", _file(t, "mine.toml")],
         r"already exists.*--overwrite", lambda w, t: [t / "mine.toml"]),
    Case("data-report-onto-its-corpus", lambda w, t: ["data", "report", _file(t, "c.jsonl"), "--out", t / "c.jsonl",
                                                      "--overwrite"], r"is the input .*refused even",
         lambda w, t: [t / "c.jsonl"]),
    Case("data-report-over-a-file", lambda w, t: ["data", "report", _file(t, "c.jsonl"), "--out", _file(t, "o.txt")],
         r"already exists.*--overwrite", lambda w, t: [t / "o.txt"]),
    Case("eval-out-onto-the-runs-config", lambda w, t: ["eval", w.run, "--out", w.run / "config.json", "--overwrite"],
         r"is a file of the source .*refused even", lambda w, t: [w.run]),
    Case("watermark-detect-out-onto-its-text", lambda w, t: [
        "watermark", "detect", _file(t, "t.txt", "some text\n"), "--key-file", _key(t), "--tokenizer", w.run,
        "--out", t / "t.txt", "--overwrite"], r"is the text file .*refused even", lambda w, t: [t / "t.txt"]),
    Case("data-sample-out-onto-its-reference", lambda w, t: [
        "data", "sample", w.run, "--reference", _file(t, "ref.jsonl"), "--out", t / "ref.jsonl", "--overwrite"],
         r"is the reference .*refused even", lambda w, t: [t / "ref.jsonl"]),
    # ---- what is not a run: never written into unasked, not even the lock file ----
    Case("train-into-a-hugging-face-dir", lambda w, t: ["train", *micro_args(w.data, _hf_like_dir(t))],
         r"hf-like is not empty \(config.json \(not a run's\), model.safetensors\) and holds no lmforge run.*"
         r"--overwrite", lambda w, t: [t / "hf-like"]),
    Case("train-into-someones-files", lambda w, t: [
        "train", *micro_args(w.data, _nonempty_dir(t), "--checkpoint.resume", "auto")],
         r"keep is not empty \(precious.txt\) and holds no lmforge run", lambda w, t: [t / "keep"]),
    Case("train-into-a-checkpoint-dir", lambda w, t: ["train", *micro_args(w.data, w.ckpt2), "--overwrite"],
         r"is a checkpoint directory.*refused even with --overwrite", lambda w, t: [w.run]),
    Case("train-into-a-checkpoint-folder", lambda w, t: ["train", *micro_args(w.data, w.ckpt2.parent)],
         r"checkpoints is not empty \(step-\d+.*holds no lmforge run", lambda w, t: [w.run]),
    Case("train-output-is-data-dir", lambda w, t: ["train", *micro_args(w.data, w.data)], r"is the data directory",
         lambda w, t: [w.data]),
    Case("train-overwrite-run-holding-its-data", lambda w, t: [
        "train", *micro_args(_outer_with_data(w, t) / "data", t / "outer"), "--overwrite"],
         r"contains the data directory", lambda w, t: [t / "outer" / "data"]),
    Case("train-into-foreign-data-dir", lambda w, t: ["train", *micro_args(_foreign_data_dir(w, t), t / "r")],
         r"holds no lmforge dataset", lambda w, t: [t / "not-data"]),
    Case("convert-over-existing-file", lambda w, t: ["ckpt", "convert", w.ckpt4, w.pt], r"not empty.*--overwrite",
         lambda w, t: [w.pt]),
    Case("convert-into-another-checkpoint", lambda w, t: ["ckpt", "convert", w.ckpt2, w.ckpt4 / "__0_0.distcp"],
         r"inside the checkpoint", lambda w, t: [w.run]),
    Case("convert-into-another-checkpoint-overwrite", lambda w, t: [
        "ckpt", "convert", w.ckpt2, w.ckpt4 / "__0_0.distcp", "--overwrite"], r"refused even with --overwrite",
         lambda w, t: [w.run]),
    Case("convert-onto-existing-dir", lambda w, t: ["ckpt", "convert", w.ckpt2, _nonempty_dir(t)],
         r"is a directory", lambda w, t: [t / "keep"]),
    Case("convert-inside-its-source", lambda w, t: ["ckpt", "convert", w.ckpt2, w.ckpt2 / "x.pt", "--overwrite"],
         r"inside", lambda w, t: [w.run]),
    Case("convert-hf-over-run-containing-source", lambda w, t: [
        "ckpt", "convert", w.ckpt2, w.run, "--to", "hf", "--overwrite"], r"contains the source",
         lambda w, t: [w.run]),
    Case("import-over-existing-run", lambda w, t: ["import", w.hf, w.run], r"not empty.*--overwrite",
         lambda w, t: [w.run, w.hf]),
    Case("import-onto-its-source", lambda w, t: ["import", w.hf, w.hf, "--overwrite"], r"same path",
         lambda w, t: [w.hf]),
    Case("import-inside-its-source", lambda w, t: ["import", w.hf, w.hf / "run", "--overwrite"], r"is inside",
         lambda w, t: [w.hf]),
    Case("prepare-into-foreign-dir", lambda w, t: [
        "data", "prepare", "--data.dir", _foreign_data_dir(w, t), "--tokenizer.vocab_size", "300"],
         r"holds no lmforge dataset.*--overwrite", lambda w, t: [t / "not-data"]),
    Case("prepare-corpus-is-its-own-output", lambda w, t: [
        "data", "prepare", "--data.corpus", _corpus_in_its_own_output(w, t) / "corpus.jsonl", "--data.dir", t / "ds",
        "--tokenizer.vocab_size", "300", "--overwrite"], r"writes its own corpus.jsonl",
         lambda w, t: [t / "ds"]),
    Case("export-over-dir-in-use", lambda w, t: ["export", w.ckpt2, _copy_run(w, t), "--overwrite"], r"in use",
         lambda w, t: [t / "copy"], setup=lambda w, t: lock_held_by_other_process(_copy_run(w, t))),
    Case("train-into-run-in-use", lambda w, t: ["train", *micro_args(w.data, w.run, "--checkpoint.resume", "auto")],
         r"in use by another lmforge job \(host \S+, pid \d+", lambda w, t: [w.run],
         setup=lambda w, t: lock_held_by_other_process(w.run)),
    Case("train-overwrite-run-in-use", lambda w, t: ["train", *micro_args(w.data, w.run), "--overwrite"],
         r"in use by another lmforge job", lambda w, t: [w.run], setup=lambda w, t: lock_held_by_other_process(w.run)),

    # ---- item 2: storage faults (tmpfs / read-only bind mounts) ----
    Case("prepare-disk-full", lambda w, t: ["data", "prepare", "--data.dir", t / "full" / "d", "--data.max_documents",
                                            "120", "--tokenizer.vocab_size", "300"], r"full/d/\S+: no space left",
         setup=lambda w, t: tmpfs(t / "full", "64k")),
    Case("convert-disk-full", lambda w, t: ["ckpt", "convert", w.ckpt2, t / "full" / "x.pt"],
         r"full/x.pt: no space left", lambda w, t: [w.run], setup=lambda w, t: tmpfs(t / "full", "64k")),
    Case("export-disk-full", lambda w, t: ["export", w.run, t / "full" / "hf"], r"full/hf: no space left",
         lambda w, t: [w.run], setup=lambda w, t: tmpfs(t / "full", "64k")),
    Case("import-disk-full", lambda w, t: ["import", w.hf, t / "full" / "imp"], r"full/imp\S*: no space left",
         lambda w, t: [w.hf], setup=lambda w, t: tmpfs(t / "full", "96k")),
    Case("train-read-only-new-run", lambda w, t: ["train", *micro_args(w.data, t / "ro" / "run")],
         r"ro/run\S*: the filesystem is read-only", setup=lambda w, t: read_only(t / "ro")),
    Case("train-read-only-existing-run", lambda w, t: [
        "train", *micro_args(w.data, t / "ro" / "run", "--checkpoint.resume", "auto")],
         r"ro/run/lmforge.lock: the filesystem is read-only", lambda w, t: [t / "ro" / "run"], setup=_with_ro_run),
    Case("prepare-read-only", lambda w, t: ["data", "prepare", "--data.dir", t / "ro" / "d",
                                            "--tokenizer.vocab_size", "300"], r"ro/d\S*: the filesystem is read-only",
         setup=lambda w, t: read_only(t / "ro")),
    Case("export-read-only", lambda w, t: ["export", w.run, t / "ro" / "hf"], r"ro/hf: the filesystem is read-only",
         lambda w, t: [w.run], setup=lambda w, t: read_only(t / "ro")),
    Case("convert-read-only", lambda w, t: ["ckpt", "convert", w.ckpt2, t / "ro" / "x.pt"],
         r"ro/x.pt: the filesystem is read-only", lambda w, t: [w.run], setup=lambda w, t: read_only(t / "ro")),
    Case("import-read-only", lambda w, t: ["import", w.hf, t / "ro" / "imp"], r"ro/imp: the filesystem is read-only",
         lambda w, t: [w.hf], setup=lambda w, t: read_only(t / "ro")),
    Case("convert-io-error", lambda w, t: ["ckpt", "convert", w.ckpt2, t / "x.pt"],
         r"x.pt: input/output error.*retry", lambda w, t: [w.run],
         setup=_raise_in("lmforge.checkpoint.tools:read_checkpoint", OSError(5, "Input/output error", "x.pt"))),
    Case("export-permission-denied", lambda w, t: ["export", w.run, t / "hf"], r"permission denied",
         lambda w, t: [w.run],
         setup=_raise_in("lmforge.interop.hf.io:atomic_dir", PermissionError(13, "Permission denied", "hf"))),

    # ---- item 6: one line for bad text, devices, memory, unreadable files ----
    Case("recipe-of-random-bytes", lambda w, t: ["train", _random_bytes_recipe(t)], r"r\.toml.*not UTF-8 text",
         process=True),
    Case("train-device-cuda-without-cuda", lambda w, t: ["train", *micro_args(w.data, t / "r", "--train.device",
                                                                              "cuda")], r"no CUDA device"),
    Case("generate-device-banana", lambda w, t: ["generate", w.run, "--device", "banana"], r"'banana': not a device"),
    Case("generate-device-cuda-without-cuda", lambda w, t: ["generate", w.run, "--device", "cuda"], r"no CUDA device"),
    Case("generate-prompt-invalid-utf8", lambda w, t: ["generate", w.run, "--prompt", b"\xff\xfe"],
         r"--prompt: not valid UTF-8 text \(bytes ff fe\)", process=True),
    Case("import-truncated-safetensors", lambda w, t: ["import", _truncated_hf(w, t), t / "imp"],
         r"model.safetensors: not a readable safetensors file.*truncated", lambda w, t: [t / "hf-trunc"]),
    Case("generate-truncated-safetensors", lambda w, t: ["generate", _truncated_hf(w, t), "--prompt", "hi"],
         r"model.safetensors: not a readable safetensors file", lambda w, t: [t / "hf-trunc"]),
    Case("nproc-superscript-two", lambda w, t: ["train", *micro_args(w.data, t / "r"), "--nproc", "²"],
         r"--nproc = '²'", process=True),
    Case("model-too-large-to-allocate", lambda w, t: ["train", *micro_args(w.data, t / "r", "--model.dim", "1048576")],
         r"memory"),
    Case("generate-missing-source", lambda w, t: ["generate", t / "nope"], r"nope"),
    Case("error-in-nproc2-workers-stays-short", lambda w, t: [
        "train", *micro_args(w.data, t / "r", "--train.global_batch_size", "4", "--checkpoint.resume",
                             _damaged_step(t)),
        "--nproc", "2"], r"resume checkpoint \S+step-00000003: ", process=True,
         max_lines=4),  # each rank's line, and torchrun's one log line per failed rank
]


def _ids(cases: list[Case]) -> list[str]:
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    return ids


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 35


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_bad_input(case: Case, world: World, tmp_path: Path) -> None:
    if "cuda" in case.id:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    with (case.setup(world, tmp_path) if case.setup else _nothing()):
        args = case.args(world, tmp_path)
        guarded = case.protects(world, tmp_path)
        before = {p: tree_hash(p) for p in guarded}
        code, _out, err = cli_process(args) if case.process else cli(args)
        assert_one_line_error(code, err, case.code, case.max_lines)
        import re

        assert re.search(case.expect, err, re.IGNORECASE), err
        for p, h in before.items():
            assert tree_hash(p) == h, f"{p} changed"
    assert not list(tmp_path.rglob("*.tmp")), "temp files left behind"


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(world: World, tmp_path: Path) -> None:
    with _raise_in("lmforge.checkpoint.tools:read_checkpoint", ZeroDivisionError("a bug"))(world, tmp_path):
        code, _, err = cli(["ckpt", "convert", world.ckpt2, tmp_path / "x.pt"])
        assert_one_line_error(code, err, expect_code=1)
        assert "internal error: ZeroDivisionError: a bug" in err and "--debug" in err
        code, _, err = cli(["--debug", "ckpt", "convert", world.ckpt2, tmp_path / "x.pt"])
        assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err


# -- full disk during a checkpoint save --------------------------------------------------------------------


def test_disk_full_during_save_keeps_previous_checkpoint_and_resume_is_bit_identical(world: World,
                                                                                     tmp_path: Path) -> None:
    """checkpoints/ on a tmpfs that holds one checkpoint and a half: the save at step 4 fails with one
    line, its temp directory is removed, step 2 verifies; after freeing space (a bigger tmpfs),
    --checkpoint.resume auto continues from step 2 with the uninterrupted run's losses bit for bit."""
    run = tmp_path / "run"
    size = sum(p.stat().st_size for p in world.ckpt2.iterdir())
    with tmpfs(run / "checkpoints", f"{int(size * 1.5) // 1024}k") as ckpts:
        code, _, err = cli(["train", *micro_args(world.data, run)])
        assert_one_line_error(code, err)
        assert "step-00000004 failed" in err and "no space left" in err and "step-00000002 is intact" in err
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]  # no step-4.tmp left
        code, out, err = cli(["ckpt", "verify", ckpts / "step-00000002"])
        assert code == 0 and ": ok (step 2" in out, err
        subprocess.run(["mount", "-o", f"remount,size={size * 8 // 1024}k", str(ckpts)], check=True)
        code, out, err = cli(["train", *micro_args(world.data, run, "--checkpoint.resume", "auto")])
        assert code == 0, err
        assert "resumed from" in out and "step-00000002" in out
        got = losses(run)
        assert sorted(got) == sorted(world.straight)
        assert all(got[s] == world.straight[s] for s in got), {s: (got[s], world.straight[s]) for s in got}


def test_a_first_save_that_fails_does_not_offer_a_checkpoint_to_resume(world: World, tmp_path: Path) -> None:
    """With no earlier checkpoint the line said "no earlier checkpoint exists (rerun with
    --checkpoint.resume auto to continue from it)": from nothing. It now says how to start over."""
    run = tmp_path / "run"
    size = sum(p.stat().st_size for p in world.ckpt2.iterdir())
    with tmpfs(run / "checkpoints", f"{size // 2 // 1024}k") as ckpts:
        code, _, err = cli(["train", *micro_args(world.data, run)])
        assert_one_line_error(code, err)
        assert "step-00000002 failed" in err and "no space left" in err
        assert "no earlier checkpoint exists (rerun with --overwrite to start over)" in err and "resume" not in err
        assert list(ckpts.iterdir()) == []


def test_leftover_tmp_dirs_never_block_resume_auto(world: World, tmp_path: Path) -> None:
    """A save killed before its rename leaves step-N.tmp: resume 'auto' ignores it (a run whose only
    checkpoint is unfinished starts fresh instead of refusing; a newer .tmp is skipped)."""
    run = _copy_run(world, tmp_path, "run")
    ckpts = run / "checkpoints"
    for p in ckpts.iterdir():
        if p.name != "step-00000002":
            shutil.rmtree(p)
    shutil.copytree(ckpts / "step-00000002", ckpts / "step-00000004.tmp")
    (ckpts / "step-00000004.tmp" / "lmforge-checkpoint.json").unlink()
    from lmforge.checkpoint import CheckpointManager

    mgr = CheckpointManager(ckpts, keep_last=5)
    assert mgr.resolve_resume("auto") == ckpts / "step-00000002"
    os.rename(ckpts / "step-00000002", ckpts / "step-00000002.tmp")
    assert mgr.resolve_resume("auto") is None  # nothing published: a fresh start, not a refusal


# -- one writer per run directory ------------------------------------------------------------------------


def test_overwrite_moves_the_old_run_aside(world: World, tmp_path: Path) -> None:
    run = _copy_run(world, tmp_path, "run")
    before = tree_hash(run)
    code, out, err = cli(["train", *micro_args(world.data, run, "--train.steps", "2"), "--overwrite"])
    assert code == 0, err
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and f"moved the earlier run in {run} to {moved[0]}" in out
    assert tree_hash(moved[0]) == before  # every file of the old run, unchanged
    assert [r["step"] for r in read_metrics(run)] == [1, 2]  # the new run's metrics only


def test_overwrite_moves_someones_files_aside_before_training_there(world: World, tmp_path: Path) -> None:
    """The refusal of a non-empty directory without a run offers --overwrite, which moves what is
    there aside as it does a run (it trained among the files before)."""
    d = _hf_like_dir(tmp_path)
    before = tree_hash(d)
    code, out, err = cli(["train", *micro_args(world.data, d, "--train.steps", "2"), "--overwrite"])
    assert code == 0, err
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("hf-like.old-")]
    assert len(moved) == 1 and f"moved the earlier contents in {d} to {moved[0]}" in out
    assert tree_hash(moved[0]) == before and not (d / "model.safetensors").exists()
    assert [r["step"] for r in read_metrics(d)] == [1, 2]


def test_a_run_that_stopped_before_its_first_step_does_not_block_the_rerun(world: World, tmp_path: Path) -> None:
    """A resume checkpoint found invalid stops the run after it wrote its config and tokenizer: the
    corrected command then starts over in place (saying so) instead of asking for --overwrite. A run
    with any progress (metrics, checkpoints) is still refused (train-into-existing-run)."""
    run = tmp_path / "run"
    code, _, err = cli(["train", *micro_args(world.data, run, "--checkpoint.resume", _damaged_step(tmp_path))])
    assert code == 2 and "resume checkpoint" in err, err
    assert sorted(p.name for p in run.iterdir() if p.name != "lmforge.lock") == ["config.json", "tokenizer.json"]
    code, out, err = cli(["train", *micro_args(world.data, run, "--train.steps", "2")])
    assert code == 0, err
    assert f"train.output_dir {run}: the run there stopped before its first step" in out
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]  # nothing to move aside


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    from lmforge.storage.lock import LOCK_NAME, RunLock, holder_if_locked

    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": dead.pid, "since": "earlier"}) + "\n")
    assert holder_if_locked(run) == ""  # nobody holds the flock: stale
    with RunLock(run):
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()


def _descendants(pid: int) -> set[int]:
    """Every process under `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_second_job_refuses_and_killed_launcher_leaves_no_worker(world: World, tmp_path: Path, sig: int) -> None:
    """A `--nproc 2` job runs; a second job into its run directory refuses in one line naming the
    launcher's host and pid, and its files are unchanged by it; then the launcher gets SIGKILL (or
    SIGTERM, which it passes on) and within a few seconds no process it started (torchrun, workers)
    is left."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = micro_args(world.data, run, "--train.steps", "100000", "--train.global_batch_size", "4",
                      "--checkpoint.interval", "100000")
    # stderr to a file, not a pipe nobody reads while the job runs: the ranks' warnings (stragglers
    # on a loaded machine) filled a 64 KiB pipe once, blocked the workers and hung the test
    err_path = tmp_path / "launcher.err"
    with err_path.open("w") as err_file:
        launcher = subprocess.Popen([sys.executable, "-m", "lmforge", "train", *args, "--nproc", "2"], cwd=REPO,
                                    env=env, stdout=subprocess.DEVNULL, stderr=err_file, start_new_session=True)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size) \
                and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert launcher.poll() is None, err_path.read_text()[-3000:]
        workers |= _descendants(launcher.pid)
        assert len(workers) >= 3, workers  # torchrun + 2 workers

        job = [launcher.pid, *workers]
        for p in job:  # freeze the whole job, so its files hold still while they are hashed
            os.kill(p, signal.SIGSTOP)
        try:
            before = tree_hash(run)
            for second in (["--checkpoint.resume", "auto"], ["--overwrite"]):
                code, _, err = cli(["train", *micro_args(world.data, run), *second])
                assert_one_line_error(code, err)
                assert f"pid {launcher.pid}" in err and "in use by another lmforge job (host " in err, err
            assert tree_hash(run) == before
        finally:
            for p in job:
                os.kill(p, signal.SIGCONT)

        os.kill(launcher.pid, sig)
        launcher.wait(timeout=120)
        t0 = time.monotonic()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in workers if _alive(p)]
        assert not survivors, f"processes of the killed launcher still running: {survivors}"
        print(f"{signal.Signals(sig).name}: all {len(workers)} processes gone {time.monotonic() - t0:.2f} s later")
    finally:
        for p in [launcher.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def test_exports_and_imports_follow_the_umask(world: World, tmp_path: Path) -> None:
    """Files and directories written through the atomic primitives get 0666/0777 minus the umask
    (group- and world-readable under 022), not the 0600/0700 of temp files."""
    old = os.umask(0o022)
    try:
        assert cli(["export", world.run, tmp_path / "hf"])[0] == 0
        assert cli(["import", tmp_path / "hf", tmp_path / "imp"])[0] == 0
        assert cli(["ckpt", "convert", world.ckpt2, tmp_path / "x.pt"])[0] == 0
    finally:
        os.umask(old)
    for p in [tmp_path / "hf", *(tmp_path / "hf").rglob("*"), tmp_path / "imp", *(tmp_path / "imp").rglob("*"),
              tmp_path / "x.pt"]:
        mode = p.stat().st_mode & 0o777
        assert mode == (0o755 if p.is_dir() else 0o644), f"{p}: {oct(mode)}"

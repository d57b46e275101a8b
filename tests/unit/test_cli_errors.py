"""The CLI's user-error handler (lmforge/cli_errors.py): every listed exception class is real and
explained in one line with exit code 2, and an OSError names its path."""

from __future__ import annotations

import errno
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli_errors import USER_ERRORS, UserError, explain, user_error_types

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module,name", USER_ERRORS, ids=[name for _, name in USER_ERRORS])
def test_each_listed_error_is_a_one_line_exit_2(module: str, name: str) -> None:
    """A typo in the table would turn that class's errors into 'internal error' lines (exit 1)."""
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, BaseException)
    assert cls in user_error_types()  # its module is loaded now
    exc = cls.__new__(cls)
    BaseException.__init__(exc, "what went wrong, where, what is allowed")
    assert explain(exc) == (2, "what went wrong, where, what is allowed")


def test_a_cli_check_and_an_unknown_error() -> None:
    assert explain(UserError("--out x: exists")) == (2, "--out x: exists")
    code, line = explain(KeyError("boom"))
    assert code == 1 and line.startswith("internal error: KeyError")


def test_a_missing_path_is_named() -> None:
    exc = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/runs/nope")
    assert explain(exc) == (2, "/runs/nope: no such file or directory")


def test_a_torchrun_worker_leaves_on_a_user_error_without_finalisers() -> None:
    """gloo's teardown can abort a worker's interpreter shutdown (signal 6, seen in CI after a
    resume refused in one line), which would replace exit code 2: a worker skips finalisers."""
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print('finalisers ran', flush=True))\n"
             "from lmforge.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, "-c", probe, "train", "recipes/tiny-dense.toml", "--model.dim", "-1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "lmforge train: config error: model.dim = -1: must be > 0"], proc.stderr
    assert "finalisers ran" not in proc.stdout
    plain = subprocess.run([sys.executable, "-c", probe, "train", "recipes/tiny-dense.toml", "--model.dim", "-1"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "finalisers ran" in plain.stdout  # one process: a normal exit


def test_a_package_of_an_extra_not_installed_is_named_with_its_extra() -> None:
    """`lmforge serve` after the main job's install (no `serve` extra) said "internal error:
    ModuleNotFoundError: No module named 'fastapi'", exit 1. The extra comes from the installed
    metadata (pyproject.toml's lists), the test extra only where nothing else has the package."""
    import tomllib

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, dist, extra in (("fastapi", "fastapi", "serve"), ("sklearn", "scikit-learn", "data"),
                                ("torchao.quantization", "torchao", "quant"), ("transformers", "transformers", "quant"),
                                ("faker", "faker", "eval"), ("onnxscript", "onnxscript", "export")):
        assert any(r.startswith(dist) for r in extras[extra])
        code, line = explain(ModuleNotFoundError(f"No module named {module!r}", name=module))
        assert (code, line) == (2, f"this needs the {dist} package, which is not installed: pip install -e '.[{extra}]'")
    for module in ("lmforge.no_such_module", "numpy_typo", ""):  # ours or unknown: a bug, not the user's to fix
        code, line = explain(ModuleNotFoundError(f"No module named {module!r}", name=module))
        assert code == 1 and line.startswith("internal error: ModuleNotFoundError")


def test_serve_without_its_extra_is_one_line_exit_2(monkeypatch, capsys, tmp_path) -> None:
    from lmforge.cli import main

    (tmp_path / "config.json").write_text("{}")  # a model directory by its files: served only after the imports
    (tmp_path / "model.safetensors").write_bytes(b"")

    for name in [m for m in sys.modules if m.startswith("lmforge.serve.server")]:
        monkeypatch.delitem(sys.modules, name)  # imported again, now without fastapi
    monkeypatch.setitem(sys.modules, "fastapi", None)
    code = main(["serve", str(tmp_path), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err == "lmforge serve: this needs the fastapi package, which is not installed: pip install -e '.[serve]'\n"


@pytest.mark.parametrize("argv", [["generate", "run", "--max-new-tokens", "abc"], ["serve", "run", "--adversarial", "foo"],
                                  ["export"], ["no-such-verb"]])
def test_a_wrong_argument_is_one_line_exit_2(argv: list[str], capsys) -> None:
    """argparse printed its usage block first (17 lines for generate, 31 for serve)."""
    from lmforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error:" in err and "--help)" in err, err

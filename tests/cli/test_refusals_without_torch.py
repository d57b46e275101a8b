"""Argument and config mistakes, and a model path that is mistyped or no model directory, are answered before torch is imported:
in ~0.2 s instead of the 1.3-3 s that loading torch, the model code and the checkpoint stack took
on 2 cores before the answer came (the error handler itself imported them to look up its
exception classes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers.cli import REPO

PROBE = """
import json, sys
from lmforge.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""

CASES = [
    ("train", ["train", "recipes/tiny-dense.toml", "--model.dim", "-1"], "model.dim = -1: must be > 0"),
    ("train --nproc 2", ["train", "recipes/tiny-dense.toml", "--nproc", "2", "--parallel.pp", "2",
                         "--model.tie_embeddings", "true"], "model.tie_embeddings"),
    ("train --train.init_from missing", ["train", "recipes/tiny-dense.toml", "--train.init_from", "no-such-run"],
     "train.init_from = 'no-such-run': no such directory"),
    ("train --nproc 2 --train.init_from no run", ["train", "recipes/tiny-dense.toml", "--nproc", "2",
                                                  "--train.global_batch_size", "16",
                                                  "--train.init_from", "docs"],
     "train.init_from = 'docs': is neither a run directory"),
    ("train --checkpoint.resume missing", ["train", "recipes/tiny-dense.toml", "--checkpoint.resume", "no-such-step"],
     "checkpoint.resume = 'no-such-step': no such directory"),
    ("train --checkpoint.resume no checkpoint", ["train", "recipes/tiny-dense.toml", "--checkpoint.resume", "docs"],
     "checkpoint.resume = 'docs': is no checkpoint"),
    ("distill --teacher missing", ["distill", "recipes/tiny-dense.toml", "--teacher", "no-such-run"],
     "distill.teacher = 'no-such-run': cannot be loaded: no-such-run: no such file or directory"),
    ("distill --teacher no model", ["distill", "recipes/tiny-dense.toml", "--teacher", "docs"],
     "distill.teacher = 'docs': cannot be loaded: docs: not a Hugging Face directory"),
    ("data prepare", ["data", "prepare", "recipes/tiny-dense.toml", "--data.seq_len", "0"], "data.seq_len"),
    ("bench cluster", ["bench", "cluster", "--out", "cluster.json"], "give a path ending in .toml"),
    ("serve", ["serve", "no-such-run"], "no-such-run: no such file or directory"),
    ("eval", ["eval", "no-such-run"], "no-such-run: no such file or directory"),
    ("generate", ["generate", "no-such-run", "--prompt", "hi"], "no-such-run: no such file or directory"),
    ("import", ["import", "no-such-hf", "/nonexistent/imp"], "no-such-hf: no such file or directory"),
    ("import a directory that is no HF model", ["import", "recipes", "/nonexistent/imp"],
     "recipes: not a Hugging Face directory (config.json + model.safetensors or model.safetensors.index.json)"),
    ("ckpt ls", ["ckpt", "ls", "no-such-run"], "no-such-run: no such file or directory"),
    ("ckpt inspect", ["ckpt", "inspect", "no-such-step"], "no-such-step: no such file or directory"),
    ("ckpt convert", ["ckpt", "convert", "no-such-step", "/nonexistent/x.pt"], "no-such-step: no such file or directory"),
    ("ckpt verify", ["ckpt", "verify", "no-such-run"], "no-such-run: no such file or directory"),
    # the line names the whole verb, subcommand included
    ("watermark embed-model", ["watermark", "embed-model", "no-such-run", "--key-file", "k", "--out", "/nonexistent/w"],
     "lmforge watermark embed-model: no-such-run: no such file or directory"),
    ("exit-gates fit", ["exit-gates", "fit", "no-such-run"], "lmforge exit-gates fit: no-such-run: no such file"),
    ("serve a directory that is no model", ["serve", "docs"], "docs: not a Hugging Face directory"),
    ("compress quantize a directory that is no model", ["compress", "quantize", "recipes", "--scheme", "int8-weight",
                                                        "--out", "/nonexistent/q"],
     "recipes: not a Hugging Face directory"),
]


@pytest.mark.parametrize("argv,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_answered_without_importing_torch(argv: list[str], needle: str) -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = proc.stderr.strip().splitlines()
    assert result["code"] == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not result["torch"], f"{argv[0]}: torch was imported before the mistake was answered"


def test_the_readmes_config_error_example_is_what_the_cli_prints() -> None:
    """The README shows a config mistake and its one line; that line stays the real one (it had
    drifted: another prefix, and the width of an older recipe)."""
    readme = (REPO / "README.md").read_text()
    prompt = "$ lmforge train recipes/tiny-dense.toml --model.n_heads 5\n"
    assert prompt in readme
    shown = readme.split(prompt, 1)[1].splitlines()[0]
    proc = subprocess.run([sys.executable, "-c", PROBE, *prompt.split()[2:]], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.stderr.strip() == shown, (proc.stderr, shown)


@pytest.mark.parametrize("marker,needle", [
    (("config.json", "model.safetensors"), "is a Hugging Face directory; import it first"),
    (("quantization.json",), "is a quantized directory; start from the run it was quantized from"),
])
def test_init_from_a_model_directory_that_is_no_run_is_named_before_torch(tmp_path, marker, needle) -> None:
    """A Hugging Face directory has a config.json too: it passed for a run, and the job failed after
    torch loaded with "<dir>/checkpoints holds no valid checkpoint". The kinds are storage/model_dir.py's."""
    for name in marker:
        (tmp_path / name).write_text("{}")
    argv = ["train", "recipes/tiny-dense.toml", "--train.init_from", str(tmp_path),
            "--train.output_dir", str(tmp_path / "new")]
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = proc.stderr.strip().splitlines()
    assert result["code"] == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not result["torch"] and not (tmp_path / "new").exists()

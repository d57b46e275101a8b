"""storage/model_dir.py names the kind of a model directory from its marker files, torch-free, and
answers in one line a path that is none (the CLI asks it before torch loads)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli_errors import explain
from lmforge.storage.model_dir import ModelDirError, model_dir_kind, require_hf_dir
from tests.helpers.cli import REPO


def _touch(path: Path, text: str = "{}") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_each_kind_by_its_markers(tmp_path: Path) -> None:
    _touch(tmp_path / "q" / "quantization.json")
    _touch(tmp_path / "hf" / "config.json")
    _touch(tmp_path / "hf" / "model.safetensors", "")
    _touch(tmp_path / "sharded" / "config.json")
    _touch(tmp_path / "sharded" / "model.safetensors.index.json")
    _touch(tmp_path / "run" / "config.json", '{"model": {"dim": 64}}')
    _touch(tmp_path / "run" / "checkpoints" / "step-00000010" / "lmforge-checkpoint.json")
    _touch(tmp_path / "dcp" / ".metadata", "")
    kinds = {d: model_dir_kind(tmp_path / d) for d in ("q", "hf", "sharded", "run", "dcp")}
    assert kinds == {"q": "quantized", "hf": "hf", "sharded": "hf", "run": "run", "dcp": "checkpoint"}
    assert model_dir_kind(tmp_path / "run" / "checkpoints" / "step-00000010") == "checkpoint"


@pytest.mark.parametrize("config", ["{not json", '{"dim": 64}', '["model"]', None])
def test_a_directory_that_is_no_model_is_one_line(tmp_path: Path, config: str | None) -> None:
    """A config.json without a "model" table (or unreadable, or none) makes no run directory."""
    if config is not None:
        _touch(tmp_path / "config.json", config)
    with pytest.raises(ModelDirError) as err:
        model_dir_kind(tmp_path)
    assert explain(err.value) == (2, f"{tmp_path}: not a Hugging Face directory (config.json + model.safetensors), "
                                     "an lmforge run directory, a checkpoint step directory or a quantized "
                                     "directory (quantization.json)")


def test_a_config_json_that_is_not_text_makes_no_run(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ModelDirError):
        model_dir_kind(tmp_path)


def test_a_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        model_dir_kind(tmp_path / "nope")
    assert explain(missing.value) == (2, f"{tmp_path / 'nope'}: no such file or directory")


def test_import_takes_hugging_face_directories_only(tmp_path: Path) -> None:
    """`lmforge import` reads a Hugging Face directory: any other kind (a run has a config.json too)
    is one line naming what it needs."""
    _touch(tmp_path / "hf" / "config.json")
    _touch(tmp_path / "hf" / "model.safetensors.index.json")
    _touch(tmp_path / "run" / "config.json", '{"model": {"dim": 64}}')
    _touch(tmp_path / "bin" / "config.json")
    _touch(tmp_path / "bin" / "pytorch_model.bin", "")
    assert require_hf_dir(tmp_path / "hf") == tmp_path / "hf"
    for other in ("run", "bin"):
        with pytest.raises(ModelDirError) as err:
            require_hf_dir(tmp_path / other)
        assert explain(err.value) == (2, f"{tmp_path / other}: not a Hugging Face directory (config.json + "
                                         "model.safetensors or model.safetensors.index.json)")
    with pytest.raises(FileNotFoundError):
        require_hf_dir(tmp_path / "nope")


def test_the_module_needs_no_torch() -> None:
    probe = "import sys, lmforge.storage.model_dir; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr

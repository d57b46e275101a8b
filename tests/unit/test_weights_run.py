"""The weights-only run directory that `import`, `compress prune` and `watermark embed-model` write
(lmforge/checkpoint/weights_run.py): its config points at itself and at data that resolves from
anywhere, the weights load back exactly, reports sit beside config.json, and an existing run is
replaced only when asked."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint.manifest import verify_checkpoint
from lmforge.checkpoint.weights import load_model_weights
from lmforge.checkpoint.weights_run import derived_run_config, write_weights_run
from lmforge.config import ModelConfig
from lmforge.models.registry import family_of

CFG = ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)


def test_derived_config_points_at_the_new_run_and_at_data_that_resolves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    source = {"train": {"output_dir": "runs/a"}, "data": {"dir": "data"}, "checkpoint": {"folder": "ck"}}
    got = derived_run_config(source, tmp_path / "b")
    assert got["train"]["output_dir"] == str(tmp_path / "b") and got["data"]["dir"] == str(tmp_path / "data")
    assert got["checkpoint"] == {"folder": "ck"} and source["data"]["dir"] == "data"  # the source is not touched
    moved = {"data": {"dir": "gone"}}
    assert derived_run_config(moved, tmp_path / "b")["data"]["dir"] == "gone"  # kept as it was: nothing better
    other = tmp_path / "other"
    assert derived_run_config(moved, tmp_path / "b", other)["data"]["dir"] == str(other.resolve())


def test_the_run_is_written_whole_and_its_weights_load_back(tmp_path):
    model = family_of(CFG).build(CFG, "cpu", 0)
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text("{}")
    config = {"train": {"output_dir": str(tmp_path / "run")}, "checkpoint": {"folder": "ck"}}
    step = write_weights_run(tmp_path / "run", model, config, tokenizer, False, files={"report.json": "{}\n"})
    assert step == tmp_path / "run" / "ck" / "step-00000000" and verify_checkpoint(step).ok
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == config
    assert (tmp_path / "run" / "tokenizer.json").read_text() == "{}" and (tmp_path / "run" / "report.json").is_file()
    fresh = family_of(CFG).build(CFG, "cpu", 1)
    assert load_model_weights(step, fresh) == 0
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(FileExistsError):  # an existing run stays unless the caller says --overwrite
        write_weights_run(tmp_path / "run", model, config, None, False)
    write_weights_run(tmp_path / "run", model, config, None, True)
    assert not (tmp_path / "run" / "tokenizer.json").exists() and not (tmp_path / "run" / "report.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tok.json"]  # no temp or old directory left

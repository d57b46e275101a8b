"""`lmforge ckpt ls|verify|inspect|convert` on a run directory holding a full zstd checkpoint with
int8 moments and an incremental one based on it (in-process, no training run needed)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint.manager import CheckpointManager
from lmforge.checkpoint.state import ModelOptimizerState
from lmforge.cli import main
from lmforge.config.job import JobConfig
from lmforge.interop.hf.importer import import_hf
from tests.helpers.checkpoint import CFG, trained


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps(asdict(JobConfig(model=CFG))))
    model, opt, _ = trained(seed=0)
    model.tok_embeddings.weight.requires_grad_(False)  # unchanged between the two saves
    mgr = CheckpointManager(run / "checkpoints", keep_last=3, compression="zstd", optimizer_states="int8",
                            full_every=2)
    mgr.save(1, {"app": ModelOptimizerState(model, opt), "train": {"step": 1}})
    with torch.no_grad():
        model.output.weight.add_(0.5)
    mgr.save(2, {"app": ModelOptimizerState(model, opt), "train": {"step": 2}})
    return run, model, opt


def test_ls_lists_kind_compression_size_and_validity(run, capsys):
    root, _, _ = run
    assert main(["ckpt", "ls", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["step", "tier", "kind"]
    one, two = lines[1].split(), lines[2].split()
    assert one[:6] == ["1", "disk", "full", "zstd", "int8", one[5]] and float(one[5]) > 0 and one[6] == "yes"
    assert two[:3] == ["2", "disk", "incremental"] and two[6] == "yes" and "(base step-00000001)" in lines[2]


def test_verify_ok_then_invalid_after_one_flipped_byte(run, capsys, tmp_path):
    root, _, _ = run
    good = root / "checkpoints" / "step-00000002"
    assert main(["ckpt", "verify", str(good)]) == 0
    assert "ok (step 2, incremental" in capsys.readouterr().out
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(root / "checkpoints", copy)
    victim = max(copy.glob("step-00000001/*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    assert main(["ckpt", "verify", str(copy / "step-00000001")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0]
    assert main(["ckpt", "verify", str(copy / "step-00000002")]) == 1  # its base is damaged
    assert "base checkpoint step-00000001" in capsys.readouterr().err


def test_verify_takes_a_run_or_a_folder_as_ls_does(run, capsys, tmp_path):
    """`ckpt verify RUN` checks each checkpoint of the run (it said INVALID: no manifest, before);
    a directory with no checkpoint in it is a wrong argument (exit 2, one line), not an invalid one."""
    root, _, _ = run
    for target in (root, root / "checkpoints"):
        assert main(["ckpt", "verify", str(target)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert [ln.split(": ")[0] for ln in out] == [str(root / "checkpoints" / f"step-0000000{k}") for k in (1, 2)]
        assert "ok (step 1, full" in out[0] and "ok (step 2, incremental" in out[1]
    (tmp_path / "empty").mkdir()
    assert main(["ckpt", "verify", str(root), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lmforge ckpt verify: {tmp_path / 'empty'}: no checkpoints in it; pass a run directory, "
                   "a checkpoint folder or a step-N directory"]


def test_inspect_lists_tensors_with_shapes_dtypes_and_where(run, capsys):
    root, model, _ = run
    assert main(["ckpt", "inspect", str(root / "checkpoints" / "step-00000002")]) == 0
    out = capsys.readouterr().out
    emb = next(ln for ln in out.splitlines() if ln.startswith("model.tok_embeddings.weight "))
    shape = "x".join(map(str, model.tok_embeddings.weight.shape))
    assert shape in emb and "float32" in emb and "base step-00000001" in emb
    assert f"{model.tok_embeddings.weight.numel() * 4:,}" in emb
    assert any("exp_avg::int8" in ln and "int8" in ln.split()[2] for ln in out.splitlines())
    assert "entries" in out.splitlines()[-1]


def test_convert_to_torch_and_hf(run, tmp_path, capsys):
    root, model, opt = run
    step = root / "checkpoints" / "step-00000002"
    out = tmp_path / "ckpt.pt"
    assert main(["ckpt", "convert", str(step), str(out)]) == 0
    sd = torch.load(out, weights_only=False)
    assert sd["train"]["step"] == 2
    assert all(torch.equal(sd["model"][k], v) for k, v in model.state_dict().items())  # weights exact
    fqn = "layers.0.attention.wq.weight"
    m = opt.state[model.layers["0"].attention.wq.weight]["exp_avg"]
    assert torch.allclose(sd["optim"][f"state.{fqn}.exp_avg"], m, atol=m.abs().max().item() / 127)

    hf = tmp_path / "hf"
    assert main(["ckpt", "convert", str(step), str(hf), "--to", "hf"]) == 0
    back, cfg = import_hf(hf)
    assert cfg.dim == CFG.dim
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_inspect_and_convert_take_a_run_as_generate_does(run, capsys, tmp_path):
    """`ckpt inspect RUN` said "no lmforge-checkpoint.json (an incomplete save...)" of a healthy run;
    now a run or a folder means its latest valid checkpoint, named on the first line."""
    root, _, _ = run
    latest = root / "checkpoints" / "step-00000002"
    assert main(["ckpt", "inspect", str(latest)]) == 0
    direct = capsys.readouterr().out.splitlines()
    for target in (root, root / "checkpoints"):
        assert main(["ckpt", "inspect", str(target)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"{target}: step 2, {latest} (the latest valid of 2 checkpoints)" and out[1:] == direct
    assert main(["ckpt", "convert", str(root), str(tmp_path / "run.pt")]) == 0
    assert main(["ckpt", "convert", str(root), str(tmp_path / "bf16.pt"), "--dtype", "bf16"]) == 2  # it was ignored
    assert "applies to --to hf only" in capsys.readouterr().err and not (tmp_path / "bf16.pt").exists()
    assert torch.load(tmp_path / "run.pt", weights_only=False)["train"]["step"] == 2
    (tmp_path / "empty").mkdir()
    assert main(["ckpt", "inspect", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.strip() == (f"lmforge ckpt inspect: {tmp_path / 'empty'}: no checkpoints in it; "
                                               "pass a run directory, a checkpoint folder or a step-N directory")

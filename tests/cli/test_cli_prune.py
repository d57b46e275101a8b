"""`lmforge compress prune` end to end: a trained tiny run pruned with Wanda (50%) and magnitude
(2:4 with recovery) into run directories that `lmforge eval` and `lmforge generate` load with no
extra flag; the printed table and pruning.json counted from the saved weights; bad inputs end in
one line and exit code 2, with nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.serve.generate import load_for_generation
from tests.helpers.cli import tiny_run_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("prune-cli-run")
    assert main(["train", *tiny_run_args(tiny_data_dir, run, "--train.steps", "12", "--train.global_batch_size", "4",
                                         "--train.micro_batch_size", "4", "--train.eval_interval", "12")]) == 0
    return run


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def saved_zeros(model_dir: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_for_generation(model_dir)
    return {k: v == 0 for k, v in model.state_dict().items()}


def test_wanda_half_sparse_run_dir_that_eval_and_generate_load(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "wanda50"
    code, text, err = cli(["compress", "prune", str(run_dir), "--method", "wanda", "--sparsity", "0.5",
                           "--out", str(out), "--calib-samples", "16"], capsys)
    assert code == 0, err
    for needle in ("wanda pruning, 50% unstructured", "layers.1.feed_forward.w2.weight", "total, pruned weights",
                   "total, all parameters", f"wrote {out}"):
        assert needle in text, text
    assert "pruned block 1" in err and "calibration: 16 windows x 32 tokens" in err
    report = json.loads((out / "pruning.json").read_text())
    zeros = saved_zeros(out)
    assert len(report["sparsity"]["layers"]) == 14  # 2 blocks x q, k, v, o, gate, up, down
    for row in report["sparsity"]["layers"]:
        assert row["sparsity"] == 0.5 and row["zeros"] == int(zeros[row["name"]].sum())
        assert row["input_feature_max_over_median"] >= 1.0
    assert not zeros["tok_embeddings.weight"].any() and not zeros["output.weight"].any()
    total = report["sparsity"]["all_parameters"]
    assert total["zeros"] == sum(int(z.sum()) for z in zeros.values()) and 0.2 < total["sparsity"] < 0.5
    cal = report["calibration"]
    assert cal["samples"] == 16 and cal["seq_len"] == 32 and cal["split"] == "train"
    assert cal["sampling"].startswith("the run's domain mixture")
    assert report["source"]["kind"] == "run" and report["source"]["step"] == 12
    assert report["recovery"] is None and report["procedure"].startswith("sequential")

    code, text, err = cli(["eval", str(out), "--items", "0", "--no-speed", "--out", str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    pruned_ppl = json.loads((tmp_path / "e.json").read_text())["deterministic"]["perplexity"]
    assert cli(["eval", str(run_dir), "--items", "0", "--no-speed", "--out", str(tmp_path / "d.json")], capsys)[0] == 0
    dense_ppl = json.loads((tmp_path / "d.json").read_text())["deterministic"]["perplexity"]
    assert pruned_ppl["windows"] == dense_ppl["windows"] and pruned_ppl["loss"] != dense_ppl["loss"]
    code, text, err = cli(["generate", str(out), "--prompt", "The king", "--max-new-tokens", "5"], capsys)
    assert code == 0 and text.strip(), err


def test_two_four_magnitude_with_recovery_keeps_the_pattern(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mag24"
    code, text, err = cli(["compress", "prune", str(run_dir), "--method", "magnitude", "--pattern", "2:4",
                           "--targets", "wq,wk,wv,wo,w1,w3", "--out", str(out), "--recover-steps", "6",
                           "--recover-lr", "3e-3"], capsys)
    assert code == 0, err
    assert "recovery fine-tune: 6 steps" in text and "val perplexity" in text
    report = json.loads((out / "pruning.json").read_text())
    assert report["pattern"] == "2:4" and report["calibration"] is None
    names = [r["name"] for r in report["sparsity"]["layers"]]
    assert not any("w2" in n for n in names) and len(names) == 12
    zeros = saved_zeros(out)
    for name in names:  # after the fine-tune: still two zeros in every group of four inputs
        z = zeros[name]
        assert (z.reshape(z.shape[0], -1, 4).sum(-1) >= 2).all(), name
    assert not zeros["layers.0.feed_forward.w2.weight"].any()
    rec = report["recovery"]
    assert rec["steps"] == 6 and rec["val_loss_after"] < rec["val_loss_before"]
    assert rec["val_perplexity_after"] == pytest.approx(math.exp(rec["val_loss_after"]))
    # its "after" loss is the trainer's validation that `lmforge eval` reports for the output
    assert cli(["eval", str(out), "--items", "0", "--no-speed", "--out", str(tmp_path / "e.json")], capsys)[0] == 0
    val = json.loads((tmp_path / "e.json").read_text())["deterministic"]["perplexity"]["validation"]
    assert val["loss"] == pytest.approx(rec["val_loss_after"], rel=1e-5)


def _hf_export(run_dir: Path, t: Path) -> Path:
    assert main(["export", str(run_dir), str(t / "hf")]) == 0
    return t / "hf"


def _moe_run(data: Path, t: Path) -> Path:
    run = t / "moe"
    assert main(["train", *tiny_run_args(data, run, "--train.steps", "2", "--train.global_batch_size", "2",
                                         "--train.micro_batch_size", "2", "--model.moe.n_experts", "4",
                                         "--train.eval_interval", "0")]) == 0
    return run


def _taken(t: Path) -> Path:
    (t / "taken").mkdir()
    (t / "taken" / "f").write_text("x")
    return t / "taken"


@pytest.mark.parametrize("case,args,expect", [
    ("sparsity-too-high", lambda r, d, t: ["--method", "magnitude", "--sparsity", "1.5"],
     "--sparsity 1.5: must be in (0, 1)"),
    ("sparsity-zero", lambda r, d, t: ["--method", "wanda", "--sparsity", "0"], "--sparsity 0.0: must be in (0, 1)"),
    ("pattern-reversed", lambda r, d, t: ["--method", "wanda", "--pattern", "4:2"], "must be N:M with 0 < N < M"),
    ("pattern-not-n-m", lambda r, d, t: ["--method", "wanda", "--pattern", "half"], "must be N:M with 0 < N < M"),
    ("pattern-untileable", lambda r, d, t: ["--method", "magnitude", "--pattern", "2:5"],
     "64 input features are not a multiple of 5"),
    ("unknown-target", lambda r, d, t: ["--method", "magnitude", "--sparsity", "0.5", "--targets", "wq,output"],
     "unknown output; allowed: wq"),
    ("hf-wanda-without-data", lambda r, d, t: ["--method", "wanda", "--sparsity", "0.5", "--source",
                                               str(_hf_export(r, t))],
     "a Hugging Face directory names no training data; pass --calib-data DIR"),
    ("moe", lambda r, d, t: ["--method", "magnitude", "--sparsity", "0.5", "--source", str(_moe_run(d, t))],
     "model has MoE layers (4 experts in layers 0, 1)"),
    ("calib-seq-len", lambda r, d, t: ["--method", "wanda", "--sparsity", "0.5", "--calib-seq-len", "65"],
     "calibration windows of 65 tokens (--calib-seq-len): must be in [1, 64]"),
    ("out-exists", lambda r, d, t: ["--method", "magnitude", "--sparsity", "0.5", "--out", str(_taken(t))],
     "already exists and is not empty"),
    ("out-inside-source", lambda r, d, t: ["--method", "magnitude", "--sparsity", "0.5", "--out", str(r / "pruned")],
     "is inside the source"),
    ("calib-data-missing", lambda r, d, t: ["--method", "wanda", "--sparsity", "0.5", "--calib-data", str(t / "no")],
     "does not exist; pass --calib-data DIR"),
])
def test_bad_inputs_one_line_exit_2(case: str, args, expect: str, run_dir: Path, tiny_data_dir: Path,
                                    tmp_path: Path, capsys) -> None:
    argv = args(run_dir, tiny_data_dir, tmp_path)
    source = str(run_dir)
    if "--source" in argv:
        i = argv.index("--source")
        source = argv[i + 1]
        del argv[i:i + 2]
    capsys.readouterr()
    out = tmp_path / "out"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    code, _, err = cli(["compress", "prune", source, *argv], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], err
    assert not out.exists() and not (run_dir / "pruned").exists()

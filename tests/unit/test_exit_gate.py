"""The learned early-exit confidence (serve/exit_gate.py): the ridge fit recovers a planted linear
law, the gate read from the raw state equals the gate on the normed state, decoding with gates
matches one parallel forward (so `eval --early-exit-measure learned` measures what `generate`
does), the file round-trips atomically, and bad gates or a missing file are refused in one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.cli import main
from lmforge.config.model import EarlyExitConfig
from lmforge.models.llama import SIZES, build_model
from lmforge.serve.early_exit import (
    EarlyExitDecoder,
    EarlyExitError,
    ExitPolicy,
    check_early_exit,
    exit_index,
)
from lmforge.serve.exit_gate import KL_FLOOR, ExitGateError, ExitGates, exit_features, fit_exit_gates

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def exit_model(seed: int = 0, dtype: torch.dtype = torch.float64):
    cfg = replace(SIZES["debug"], n_layers=4, max_seq_len=96, early_exit=EarlyExitConfig(layers=[1, 2]))
    return build_model(cfg, seed=seed).to(dtype).eval()


def windows(n: int, length: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 512, length + 1) for _ in range(n)]


def test_features_are_the_normed_exit_state_and_the_log_kl_to_the_full_model():
    model = exit_model()
    tokens = torch.from_numpy(np.stack(windows(2, 12, 0)))
    feats, targets = exit_features(model, tokens)
    with torch.inference_mode():
        final, exits = model(tokens[:, :-1], exits=True)
        h = model.tok_embeddings(tokens[:, :-1])
        cos, sin = model.rope_cos, model.rope_sin
        h = model.layers["0"](h, cos, sin, None, None)
    torch.testing.assert_close(feats[0], model.norm(h).reshape(-1, model.cfg.dim).float())
    p, q = final.double().softmax(-1), exits[0].double().softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1).clamp(min=0)
    torch.testing.assert_close(targets[0].double(), torch.log(kl + KL_FLOOR).reshape(-1), rtol=1e-4, atol=1e-4)
    assert len(feats) == len(targets) == 2 and targets[1].shape == (2 * 12,)


def test_ridge_fit_recovers_a_planted_linear_law(monkeypatch: pytest.MonkeyPatch):
    """With targets that ARE a linear function of the features, the fit returns that function."""
    model = exit_model()
    dim = model.cfg.dim
    g = torch.Generator().manual_seed(1)
    w_true, b_true = torch.randn(2, dim, generator=g, dtype=torch.float64) * 0.1, torch.tensor([-2.0, 0.5])

    def planted(m, tokens):
        feats = [torch.randn(tokens.shape[0] * 40, dim, generator=g, dtype=torch.float64) for _ in range(2)]
        return feats, [f @ w_true[i] + b_true[i] for i, f in enumerate(feats)]

    monkeypatch.setattr("lmforge.serve.exit_gate.exit_features", planted)
    gates = fit_exit_gates(model, windows(16, 8, 0), alpha=1e-6)
    torch.testing.assert_close(gates.weight.double(), w_true, rtol=0, atol=1e-4)
    torch.testing.assert_close(gates.bias.double(), b_true.double(), rtol=0, atol=1e-4)
    assert gates.layers == (1, 2) and gates.windows == 16


def test_the_decoders_test_folds_the_norm_and_agrees_with_the_confidence():
    model = exit_model()
    gates = ExitGates((1, 2), torch.randn(2, model.cfg.dim) * 0.05, torch.tensor([-3.0, -2.0]))
    h = torch.randn(5, model.cfg.dim, dtype=torch.float64) * 3
    with torch.inference_mode():
        for k in (1, 2):
            a = gates.confidence(k, model.norm(h))
            assert ((a > 0) & (a <= 1)).all() and len(set(a.tolist())) == 5
            for t in (0.0, float(a.median()) + 1e-6, float(a.min()) - 1e-6, 1.0):  # the decoder's test, per row
                decide = gates.decision(model.norm.weight, model.norm.eps, t)
                want = (a >= t).tolist() if t < 1 else [False] * 5
                assert [decide.leaves(k, h[i:i + 1]) for i in range(5)] == want, (k, t, a)


def test_learned_decoding_matches_one_parallel_forward():
    """Each decoded token's logits are the first exit whose gate passes, computed in one forward:
    what eval's perplexity under early exit reads."""
    model = exit_model(seed=3)
    gates = fit_exit_gates(model, windows(8, 32, 5))
    feed = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    p = [7, 8, 9, 10]
    seq = torch.tensor([p + feed])
    feats, _ = exit_features(model, torch.cat([seq, seq[:, :1]], 1))  # features at every position of seq
    conf = [gates.confidence(k, feats[i]).reshape(-1) for i, k in enumerate((1, 2))]
    ranked = torch.cat([c[len(p):] for c in conf]).sort().values
    mid = len(ranked) // 2  # a mid threshold between two confidences: no step sits on it
    threshold = float((ranked[mid - 1] + ranked[mid]) / 2)
    dec = EarlyExitDecoder(model, 1, 96, ExitPolicy(threshold, "learned", gates=gates))
    with torch.inference_mode():
        steps = [dec.prefill(torch.tensor([p]))] + [dec.step(torch.tensor([[t]])) for t in feed]
        final, exits = model(seq, exits=True)
    n = len(p)
    idx = exit_index([c[n:] for c in conf], threshold)
    assert {0, 1, 2} <= set(idx.tolist()), idx  # every depth is taken somewhere
    want = torch.stack([*exits, final])[:, 0, n:].gather(0, idx[None, :, None].expand(1, -1, final.shape[-1]))[0]
    torch.testing.assert_close(torch.cat(steps[1:]), want, rtol=1e-9, atol=1e-9)
    assert dec.depths == [(1, 2, 4)[i] for i in idx.tolist()]


def test_gates_file_round_trips_and_bad_files_are_one_line(tmp_path: Path):
    gates = ExitGates((1, 2), torch.randn(2, 16), torch.tensor([0.5, -1.0]), windows=7)
    path = tmp_path / "g.safetensors"
    gates.save(path)
    back = ExitGates.load(path)
    assert back.layers == (1, 2) and back.windows == 7
    torch.testing.assert_close(back.weight, gates.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]  # no temp file left
    with pytest.raises(ExitGateError, match="no such exit-gates file"):
        ExitGates.load(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExitGateError, match="not an exit-gates file"):
        ExitGates.load(tmp_path / "bad.safetensors")
    model = exit_model()
    with pytest.raises(ExitGateError, match="gates for dim 16, the model has dim"):
        check_early_exit(model.cfg, ExitPolicy(0.9, "learned", gates=gates))
    with pytest.raises(EarlyExitError, match="needs exit gates"):
        check_early_exit(model.cfg, ExitPolicy(0.9, "learned"))
    narrow = ExitGates((2,), torch.zeros(1, model.cfg.dim), torch.zeros(1))
    with pytest.raises(ExitGateError, match=r"no gate for exits \[1\]"):
        check_early_exit(model.cfg, ExitPolicy(0.9, "learned", gates=narrow))


def test_cli_fits_beside_the_run_and_generate_and_eval_use_it(tiny_data_dir: Path, tmp_path: Path, capsys):
    from tests.helpers.cli import tiny_run_args

    run = tmp_path / "run"
    assert main(["train", *tiny_run_args(tiny_data_dir, run, "--train.steps", "2",
                                         "--model.early_exit.layers", "1")]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "KING", "--early-exit-threshold", "0.5",
                 "--early-exit-measure", "learned"]) == 2
    assert "no such exit-gates file" in capsys.readouterr().err
    assert main(["exit-gates", "fit", str(run), "--windows", "4", "--seq-len", "32"]) == 0
    assert (run / "exit_gates.safetensors").is_file() and "wrote" in capsys.readouterr().out
    assert main(["exit-gates", "fit", str(run), "--windows", "4"]) == 2  # exists: --overwrite needed
    assert "exists" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "KING", "--max-new-tokens", "8", "--temperature", "0",
                 "--early-exit-threshold", "0", "--early-exit-measure", "learned"]) == 0
    assert "mean depth 1.00" in capsys.readouterr().err  # threshold 0: every step leaves at exit 1
    results = tmp_path / "eval.json"
    assert main(["eval", str(run), "--items", "0", "--no-speed", "--max-batches", "1", "--early-exit", "0,1",
                 "--early-exit-measure", "learned", "--out", str(results)]) == 0
    rows = json.loads(results.read_text())["deterministic"]["early_exit"]["rows"]
    assert [r["mean_depth"] for r in rows] == [1.0, 2.0]  # 0: always exit 1; 1: never (the model has 2 blocks)
    assert rows[0]["measure"] == "learned"

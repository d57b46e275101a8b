"""Pruning: Wanda vs magnitude on one model (issue 16, item 3), one run, every result measured the
same way (lmforge.eval: perplexity over the run's whole held-out split).

For 50% unstructured and 2:4 semi-structured, magnitude and Wanda, without and with a short
recovery fine-tune (`--recover-steps`, masks held): the pruned model's held-out perplexity
against the dense model's, per domain too. Gate (exit 1 when missed): at 50% unstructured without
recovery, Wanda's perplexity increase is less than half of magnitude's (ratio magnitude increase /
Wanda increase >= 2). Also printed: how far each linear's loudest input feature stands out
(max / median of ||X_j||_2 over the calibration tokens), the property Wanda's edge rests on, and
with `--sweep` the same comparison at higher sparsities (information, not gated).

The model (default `runs/prune-bench`, `--train` trains it when missing, ~10 min on 2 AMX cores):
recipes/prune-bench.toml, the main job's shape and data trained 3,000 steps at 3x its learning rate
without weight decay, which gives it outlier input features like a large LLM's (its q/k/v inputs'
loudest feature ~7x the median); Wanda's edge over magnitude grows with them (the recipe's comment
and docs/benchmarks.md have the figures). `--run runs/tiny-dense` compares on the main job's model,
which has almost none (ratio 1.15 there: the gate fails, as the paper's account predicts).

Baselines in the same run: the dense model, and for the recovery rows the dense model after the
same fine-tune (no masks). `--planted-scale S` adds a control (not gated): the same comparison on
a copy whose norms' channels are scaled by S and the reading weight columns divided by S (the same
function with planted outlier features; Wanda's scores are invariant to it, magnitude's are not).

Every model goes through `lmforge compress prune` (in process) into a temp dir; the source is
only read. The paper's figures for scale (Sun et al. 2023, Llama-2-7B, WikiText perplexity at
50% unstructured): dense 5.12, magnitude 14.89, SparseGPT 6.51, Wanda 6.42.

    PYTHONPATH=. python bench/prune.py [--train] [--run runs/prune-bench] [--data-dir DIR]
        [--recover-steps 50] [--recover-lr 1e-4] [--calib-samples 128] [--sweep 0.6,0.7]
        [--planted-scale 20 [--planted-only]] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402
from _runs import main_run_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET = 2.0  # magnitude's perplexity increase / Wanda's, at 50% unstructured
RECIPE = REPO / "recipes" / "prune-bench.toml"
DEFAULT_RUN = REPO / "runs" / "prune-bench"


def train_model(run: Path) -> None:
    """Train recipes/prune-bench.toml into `run` (what `--train` does when it is missing)."""
    import subprocess

    print(f"training {RECIPE.relative_to(REPO)} into {run} (~10 min on 2 AMX cores)", flush=True)
    cmd = [sys.executable, "-m", "lmforge", "train", str(RECIPE), "--train.output_dir", str(run),
           "--metrics.progress", "none"]
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit(f"training {RECIPE.name} failed: {' '.join(cmd)}")


def perplexity(model_dir: Path, data_dir: Path) -> dict:
    from lmforge.eval.runner import EvalOptions, evaluate

    p = evaluate(model_dir, EvalOptions(data_dir=data_dir, items=0, speed=False), say=lambda _: None)
    p = p["deterministic"]["perplexity"]
    return {"perplexity": p["perplexity"], "loss": p["loss"], "tokens": p["tokens"],
            "domains": {k: v["perplexity"] for k, v in p["domains"].items()}}


def prune(run: Path, out: Path, method: str, scheme: list[str], data_dir: Path, args: argparse.Namespace,
          recover: int) -> dict:
    from lmforge.cli import main

    argv = ["compress", "prune", str(run), "--method", method, *scheme, "--out", str(out), "--calib-data",
            str(data_dir), "--calib-samples", str(args.calib_samples)]
    if recover:
        argv += ["--recover-steps", str(recover), "--recover-lr", str(args.recover_lr)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"lmforge {' '.join(argv)} failed ({code}):\n{printed.getvalue()[-2000:]}")
    return json.loads((out / "pruning.json").read_text())


def write_run(model, tokenizer: Path | None, config: dict, data_dir: Path, out: Path) -> Path:
    """`model` as a run directory `lmforge eval` reads: its config (data.dir = `data_dir`), the
    tokenizer and a weights-only checkpoint at step 0."""
    import shutil

    from lmforge.checkpoint.weights import save_model_weights

    out.mkdir(parents=True)
    config["data"]["dir"] = str(data_dir)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        shutil.copy(tokenizer, out / "tokenizer.json")
    save_model_weights(out / "checkpoints" / "step-00000000", model, step=0)
    return out


def planted_copy(run: Path, data_dir: Path, out: Path, scale: float, channels: int) -> Path:
    """A copy of the run's newest weights with `channels` input features of every block's two norms
    scaled by `scale` and the matching weight columns of q/k/v (attention norm) and gate/up (MLP norm)
    divided by it: the same function (checked by perplexity), now with outlier features read by
    small weights, as large LLMs have them. A control for the method, not the gate."""

    import torch

    from lmforge.serve.generate import load_for_generation

    model, _, tokenizer = load_for_generation(run)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.layers.values():
            for norm, readers in ((block.attention_norm, (block.attention.wq, block.attention.wk, block.attention.wv)),
                                  (block.ffn_norm, (block.feed_forward.w1, block.feed_forward.w3))):
                idx = torch.randperm(norm.weight.numel(), generator=gen)[:channels]
                norm.weight[idx] *= scale
                for lin in readers:
                    lin.weight[:, idx] /= scale
    return write_run(model, tokenizer, json.loads((run / "config.json").read_text()), data_dir, out)


def dense_finetuned(run: Path, data_dir: Path, out: Path, steps: int, lr: float) -> Path:
    """The dense model after the same fine-tune the recovery runs (prune_recover.recover with no
    masks): the baseline that separates recovery from further training of the model."""

    from lmforge.compress.prune_recover import RecoverySetup, recover
    from lmforge.compress.train_data import open_train_data
    from lmforge.serve.generate import load_for_generation

    model, cfg, tokenizer = load_for_generation(run)
    config = json.loads((run / "config.json").read_text())
    train = config["train"]
    data = open_train_data(data_dir, "--data-dir", cfg, tokenizer, config["data"])
    setup = RecoverySetup(steps, lr, train["seq_len"], train["micro_batch_size"],
                          train["eval_batches"] * max(1, train["global_batch_size"] // train["micro_batch_size"]), seed=1)
    recover(model, {}, data, setup, data.eos_id if cfg.attention.doc_mask else None)
    return write_run(model, tokenizer, config, data_dir, out)


def outlier_summary(report: dict) -> dict[str, float]:
    """Median over blocks of each linear's max/median input-feature norm (wanda's report)."""
    by_kind: dict[str, list[float]] = {}
    for r in report["sparsity"]["layers"]:
        by_kind.setdefault(r["name"].split(".")[-2], []).append(r["input_feature_max_over_median"])
    return {k: statistics.median(v) for k, v in by_kind.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=DEFAULT_RUN)
    ap.add_argument("--train", action="store_true", help=f"train {RECIPE.name} into --run first when it has no checkpoint")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--recover-steps", type=int, default=50)
    ap.add_argument("--recover-lr", type=float, default=1e-4)
    ap.add_argument("--sweep", default="", help="extra unstructured sparsities to compare, e.g. 0.6,0.7 (not gated)")
    ap.add_argument("--out", type=Path, default=None, help="also write all figures here (JSON)")
    ap.add_argument("--planted-scale", type=float, default=0.0,
                    help="control (not gated): also compare at 50%% on a copy with outlier features planted "
                         "function-preservingly (norm channels x scale, reading columns / scale); 0: off")
    ap.add_argument("--planted-channels", type=int, default=4, help="planted outlier channels per norm")
    ap.add_argument("--planted-only", action="store_true", help="run only the planted control (no verdict)")
    args = ap.parse_args(argv)
    if args.train and not any((args.run / "checkpoints").glob("step-*")):
        train_model(args.run)
    data_dir = main_run_data(args.run, args.data_dir, f"pass --train to train {RECIPE.relative_to(REPO)} there")
    if data_dir is None:
        return 2
    t_start = time.perf_counter()
    dense = perplexity(args.run, data_dir)
    print(f"dense: held-out perplexity {dense['perplexity']:.3f} over {dense['tokens']:,} tokens ({data_dir})",
          flush=True)
    rows: list[dict] = []
    schemes = [("50% unstructured", ["--sparsity", "0.5"]), ("2:4", ["--pattern", "2:4"])]
    schemes += [(f"{float(s):.0%} unstructured", ["--sparsity", s]) for s in args.sweep.split(",") if s.strip()]
    outliers = None
    tuned = None
    if args.recover_steps and not args.planted_only:
        with tempfile.TemporaryDirectory(prefix="bench-prune-dense-") as tmp:
            t0 = time.perf_counter()
            tuned = perplexity(dense_finetuned(args.run, data_dir, Path(tmp) / "d", args.recover_steps,
                                               args.recover_lr), data_dir)
            print(f"dense + the same {args.recover_steps}-step fine-tune (no masks): ppl {tuned['perplexity']:.3f} "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    # the gated rows first, then recovery, then the sweep: a slow machine still gets the verdict's figures early
    plan = [(i, m, 0) for i in (0, 1) for m in ("magnitude", "wanda")]
    plan += [(i, m, args.recover_steps) for i in (0, 1) for m in ("magnitude", "wanda") if args.recover_steps]
    plan += [(i, m, 0) for i in range(2, len(schemes)) for m in ("magnitude", "wanda")]
    if args.planted_only:
        plan = []
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        for i, method, recover in plan:
            name, flags = schemes[i]
            out = Path(tmp) / f"{method}-{i}-{recover}"
            t0 = time.perf_counter()
            report = prune(args.run, out, method, flags, data_dir, args, recover)
            ppl = perplexity(out, data_dir)
            if method == "wanda" and outliers is None:
                outliers = outlier_summary(report)
            row = {"scheme": name, "method": method, "recover_steps": recover, **ppl,
                   "increase": ppl["perplexity"] - dense["perplexity"],
                   "sparsity_pruned": report["sparsity"]["pruned_weights"]["sparsity"],
                   "sparsity_all": report["sparsity"]["all_parameters"]["sparsity"],
                   "recovery": report["recovery"], "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"{name:>18} {method:>9} recover {recover:>3}: ppl {ppl['perplexity']:8.3f} "
                  f"(+{row['increase']:7.3f}, {row['increase'] / dense['perplexity']:+.2%}) "
                  f"sparsity {row['sparsity_pruned']:.2%} of pruned, {row['sparsity_all']:.2%} of all "
                  f"[{row['seconds']:.0f} s]", flush=True)
            shutil_rm(out)
    control = None
    if args.planted_scale:
        with tempfile.TemporaryDirectory(prefix="bench-prune-planted-") as tmp:
            planted = planted_copy(args.run, data_dir, Path(tmp) / "planted", args.planted_scale, args.planted_channels)
            base = perplexity(planted, data_dir)
            control = {"scale": args.planted_scale, "channels_per_norm": args.planted_channels,
                       "dense": base["perplexity"]}
            for method in ("magnitude", "wanda"):
                report = prune(planted, Path(tmp) / method, method, ["--sparsity", "0.5"], data_dir, args, 0)
                control[method] = perplexity(Path(tmp) / method, data_dir)["perplexity"]
                control[f"{method}_outliers"] = outlier_summary(report) if method == "wanda" else None
            inc = {m: control[m] - control["dense"] for m in ("magnitude", "wanda")}
            control["ratio"] = inc["magnitude"] / inc["wanda"] if inc["wanda"] > 0 else float("inf")
            print(f"control, outliers planted (x{args.planted_scale:g}, {args.planted_channels} channels per norm; "
                  f"dense ppl {control['dense']:.3f} vs {dense['perplexity']:.3f} unplanted): 50% magnitude "
                  f"{control['magnitude']:.3f} (+{inc['magnitude']:.3f}), wanda {control['wanda']:.3f} "
                  f"(+{inc['wanda']:.3f}); ratio {control['ratio']:.2f}; input-feature max/median "
                  + ", ".join(f"{k} {v:.1f}" for k, v in control["wanda_outliers"].items()), flush=True)
    if args.planted_only:
        return 0
    domains = list(dense["domains"])
    print("\nheld-out perplexity (whole val split), per domain; increase over dense")
    print(f"{'scheme':>18} {'method':>9} {'rec':>4} {'ppl':>9} {'+ppl':>8} {'+%':>7} "
          + " ".join(f"{d[:11]:>11}" for d in domains))
    print(f"{'dense':>18} {'':>9} {'':>4} {dense['perplexity']:9.3f} {'':>8} {'':>7} "
          + " ".join(f"{dense['domains'][d]:11.2f}" for d in domains))
    if tuned:
        print(f"{'dense, fine-tuned':>18} {'':>9} {args.recover_steps:>4} {tuned['perplexity']:9.3f} "
              f"{tuned['perplexity'] - dense['perplexity']:+8.3f} "
              f"{(tuned['perplexity'] - dense['perplexity']) / dense['perplexity']:+7.2%} "
              + " ".join(f"{tuned['domains'][d]:11.2f}" for d in domains))
    for r in rows:
        print(f"{r['scheme']:>18} {r['method']:>9} {r['recover_steps']:>4} {r['perplexity']:9.3f} "
              f"{r['increase']:+8.3f} {r['increase'] / dense['perplexity']:+7.2%} "
              + " ".join(f"{r['domains'][d]:11.2f}" for d in domains))
    for r in rows:
        if r["recovery"]:
            rec = r["recovery"]
            print(f"recovery {r['scheme']} {r['method']}: val loss {rec['val_loss_before']:.4f} -> "
                  f"{rec['val_loss_after']:.4f} ({rec['steps']} steps, lr {rec['lr']:g})")
    if outliers:
        print("input-feature outliers (Wanda's calibration, max/median of ||X_j||, median over blocks): "
              + ", ".join(f"{k} {v:.1f}" for k, v in outliers.items()))
    print("paper, Llama-2-7B, WikiText ppl at 50% unstructured: dense 5.12, magnitude 14.89, SparseGPT 6.51, "
          "Wanda 6.42 (magnitude increase / Wanda increase = 9.77 / 1.30 = 7.5)")
    print(f"total {time.perf_counter() - t_start:.0f} s")

    def inc(method: str) -> float:
        return next(r["increase"] for r in rows if r["scheme"] == schemes[0][0] and r["method"] == method
                    and r["recover_steps"] == 0)
    mag, wanda = inc("magnitude"), inc("wanda")
    ratio = mag / wanda if wanda > 0 else (float("inf") if mag > 0 else 0.0)
    if args.out:
        args.out.write_text(json.dumps({"run": str(args.run), "data_dir": str(data_dir), "dense": dense,
                                        "rows": rows, "outliers": outliers, "ratio": ratio, "control": control,
                                        "dense_finetuned": tuned},
                                       indent=2))
    return verdict("prune", "magnitude pruning, 50% unstructured, same model",
                   "perplexity increase magnitude / wanda", min(ratio, 1e6), TARGET)


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

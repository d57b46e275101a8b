"""The weight-space model watermark on the main job's model (issue 18, item 2): embed, verify, and
verify again after the three attacks of the issue, each through the lmforge command a user would run.

    1. `lmforge watermark keygen` + `embed-model RUN --key-file K --out MARKED` (256 bits, margin 6);
    2. `verify-model MARKED`: bit error rate 0 and p < 1e-6 (the exact Binomial(256, 1/2) tail);
    3. 100 wrong keys on the marked model (fixed, derived from --wrong-key-seed): every p > 0.01;
       and the control: the unmarked run read with the true key, p > 0.01;
    4. held-out perplexity (lmforge.eval, the whole val split) of MARKED against the unmarked run
       (the named baseline): |change| <= 0.5%;
    5. attacks, each verified with `verify-model` (p < 1e-3):
       - `lmforge train recipes/tiny-dense.toml --train.init_from MARKED` for --ft-steps (200) steps of
         8 x 256 tokens at --ft-lr (3e-4: bench/continual.py's fine-tuning rate, 0.15 x the recipe's
         pretraining peak; 20 warm-up steps, cosine), AdamW with the recipe's weight decay 0.1;
       - `lmforge compress quantize MARKED --scheme int8-weight` (int8 per-row weights, read back as
         q x scale);
       - `lmforge compress prune MARKED --method magnitude --sparsity 0.3` (each block linear's 30%
         smallest weights zeroed);
       and, not gated, all three in a row (fine-tuned, then pruned, then int8).

Each attacked model's perplexity is printed too (so the attack is seen to change the model). Exit 1
when any target is missed. Needs the main job's run and data (`bash scripts/run_default.sh`); run by
hand, not by run_all.py. Writes only under --work (a temp dir by default); the run is only read.

    PYTHONPATH=. python bench/model_watermark.py [--run runs/tiny-dense] [--data-dir data/default]
        [--ft-steps 200] [--ft-lr 3e-4] [--wrong-keys 100] [--work DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402
from _runs import lmforge, main_run_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
P_TRUE, P_WRONG, P_ATTACKED, PPL_CHANGE = 1e-6, 0.01, 1e-3, 0.005


def verify(model_dir: Path, key: Path) -> dict:
    return json.loads(lmforge(["watermark", "verify-model", str(model_dir), "--key-file", str(key), "--json"]))


def perplexity(model_dir: Path, data_dir: Path) -> float:
    from lmforge.eval.runner import EvalOptions, evaluate

    r = evaluate(model_dir, EvalOptions(data_dir=data_dir, items=0, speed=False), say=lambda _: None)
    return float(r["deterministic"]["perplexity"]["perplexity"])


def wrong_key_readings(marked: Path, n: int, seed: int) -> list:
    """The marked model read with `n` keys that are not the owner's (deterministic from `seed`)."""
    from lmforge.safety.model_watermark import read_watermark
    from lmforge.safety.secret_key import WatermarkKey
    from lmforge.serve.generate import load_for_generation

    model, _, _ = load_for_generation(marked)
    weights = [(name, t.detach()) for name, t in model.named_parameters()]
    keys = [WatermarkKey(hashlib.sha256(f"bench wrong key {seed} {i}".encode()).hexdigest().encode())
            for i in range(n)]
    return [read_watermark(weights, k) for k in keys]


def fine_tune(marked: Path, out: Path, data_dir: Path, steps: int, lr: float) -> float:
    """`lmforge train` from the marked run's weights (a fresh process, as a user runs it); seconds."""
    args = [sys.executable, "-m", "lmforge", "train", str(REPO / "recipes" / "tiny-dense.toml"),
            "--train.init_from", str(marked), "--train.output_dir", str(out), "--data.dir", str(data_dir),
            "--train.steps", str(steps), "--optimizer.lr", str(lr), "--scheduler.warmup_steps", "20",
            "--train.eval_interval", "0", "--checkpoint.interval", str(steps), "--checkpoint.keep_last", "1",
            "--metrics.progress", "none", "--metrics.tensorboard", "false", "--metrics.plot", "false",
            "--metrics.log_interval", "50"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"fine-tuning failed ({' '.join(args)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith(("init_from", "done:")):
            print(f"  [fine-tune] {line}", flush=True)
    return time.perf_counter() - t0


def log10p(p: float) -> float:
    return -math.log10(p) if p > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "tiny-dense")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--ft-steps", type=int, default=200)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--wrong-keys", type=int, default=100)
    ap.add_argument("--wrong-key-seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="keep the models here (default: a temp dir, removed)")
    ap.add_argument("--out", type=Path, default=None, help="also write all figures here (JSON)")
    args = ap.parse_args(argv)
    data_dir = main_run_data(args.run, args.data_dir)
    if data_dir is None:
        return 2
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-model-wm-")))
        work.mkdir(parents=True, exist_ok=True)
        return run(args, data_dir, work, t_start)


def run(args: argparse.Namespace, data_dir: Path, work: Path, t_start: float) -> int:
    key, marked = work / "owner.key", work / "marked"
    lmforge(["watermark", "keygen", str(key), "--overwrite"])
    t0 = time.perf_counter()
    embed = json.loads(lmforge(["watermark", "embed-model", str(args.run), "--key-file", str(key), "--out",
                                str(marked), "--json", "--overwrite"]))["embed"]
    print(f"embedded {embed['bits']} bits over {embed['weights']:,} weights of {embed['tensors']} block matrices, "
          f"margin {embed['margin']:g}: ||delta||/||W|| = {embed['relative_change']:.4f}, largest |delta| "
          f"{embed['max_abs_change']:.3g} [{time.perf_counter() - t0:.0f} s]", flush=True)
    rows: dict[str, dict] = {"marked": verify(marked, key), "unmarked (control)": verify(args.run, key)}
    t0 = time.perf_counter()
    wrong = wrong_key_readings(marked, args.wrong_keys, args.wrong_key_seed)
    min_p_wrong = min(r.p_value for r in wrong)
    print(f"{len(wrong)} wrong keys: smallest p {min_p_wrong:.3g}, bit error rates "
          f"{min(r.bit_error_rate for r in wrong):.3f}..{max(r.bit_error_rate for r in wrong):.3f} "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    ppl = {"unmarked (control)": perplexity(args.run, data_dir), "marked": perplexity(marked, data_dir)}
    change = ppl["marked"] / ppl["unmarked (control)"] - 1
    print(f"held-out perplexity: unmarked {ppl['unmarked (control)']:.4f}, marked {ppl['marked']:.4f} ({change:+.4%})", flush=True)

    attacked = {"int8": work / "int8", "pruned 30%": work / "pruned30", f"fine-tuned {args.ft_steps}": work / "tuned"}
    lmforge(["compress", "quantize", str(marked), "--scheme", "int8-weight", "--out", str(attacked["int8"]),
             "--overwrite"])
    lmforge(["compress", "prune", str(marked), "--method", "magnitude", "--sparsity", "0.3", "--out",
             str(attacked["pruned 30%"]), "--overwrite"])
    seconds = fine_tune(marked, attacked[f"fine-tuned {args.ft_steps}"], data_dir, args.ft_steps, args.ft_lr)
    print(f"fine-tuned {args.ft_steps} steps at lr {args.ft_lr:g} [{seconds:.0f} s]", flush=True)
    chain = work / "tuned-pruned-int8"
    lmforge(["compress", "prune", str(attacked[f"fine-tuned {args.ft_steps}"]), "--method", "magnitude",
             "--sparsity", "0.3", "--out", str(work / "tuned-pruned"), "--overwrite"])
    lmforge(["compress", "quantize", str(work / "tuned-pruned"), "--scheme", "int8-weight", "--out", str(chain),
             "--overwrite"])
    attacked["all three (not gated)"] = chain
    for name, path in attacked.items():
        rows[name] = verify(path, key)
        ppl[name] = perplexity(path, data_dir)

    print(f"\nweight watermark, {embed['bits']} bits (p: P(Binomial({embed['bits']}, 1/2) <= errors), "
          f"errors = flipped + erased |z| < {rows['marked']['dead_zone']:g})")
    print(f"{'model':>24} {'BER':>7} {'flipped':>7} {'erased':>6} {'p':>10} {'z min':>7} {'z median':>8} "
          f"{'ppl':>9}  verdict")
    for name, r in rows.items():
        print(f"{name:>24} {r['bit_error_rate']:7.4f} {r['flipped']:7d} {r['erased']:6d} {r['p_value']:10.3g} "
              f"{r['z_min']:7.2f} {r['z_median']:8.2f} {ppl[name]:9.3f}  {'detected' if r['detected'] else 'not detected'}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    result = {"embed": embed, "readings": rows, "perplexity": ppl, "perplexity_change": change,
              "wrong_keys": {"n": len(wrong), "min_p": min_p_wrong,
                             "bit_error_rates": [r.bit_error_rate for r in wrong]},
              "fine_tune": {"steps": args.ft_steps, "lr": args.ft_lr}}
    if args.out:
        from lmforge.storage.atomic import write_text_atomic

        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")

    m = rows["marked"]
    status = verdict("model_wm_ber", "every embedded bit", "1 - bit error rate after embedding",
                     1 - m["bit_error_rate"], 1.0)
    status |= verdict("model_wm_p_true_key", "Binomial(256, 1/2) null", "-log10 p, true key", log10p(m["p_value"]),
                      -math.log10(P_TRUE))
    status |= verdict("model_wm_wrong_keys", "Binomial(256, 1/2) null", f"smallest p of {len(wrong)} wrong keys / 0.01",
                      min_p_wrong / P_WRONG, 1.0)
    status |= verdict("model_wm_control", "the unmarked run, true key", "p / 0.01",
                      rows["unmarked (control)"]["p_value"] / P_WRONG, 1.0)
    status |= verdict("model_wm_ppl", "unmarked run's held-out perplexity", "1 - |marked ppl / unmarked ppl - 1|",
                      1 - abs(change), 1 - PPL_CHANGE)
    for name in ("int8", "pruned 30%", f"fine-tuned {args.ft_steps}"):
        status |= verdict(f"model_wm_{name.split()[0].replace('-', '_')}", "Binomial(256, 1/2) null",
                          f"-log10 p after {name}", log10p(rows[name]["p_value"]), -math.log10(P_ATTACKED))
    return status


if __name__ == "__main__":
    sys.exit(main())

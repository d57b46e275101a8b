"""Continual pre-training keeps what a model knew: from a model trained on two domains (Shakespeare
and the KJV Bible; the Chinese domain at weight 0), train on the third (Chinese) two ways for the
same steps and peak LR, in one run:

- continual: `--train.init_from BASE`, 10% replay of the old domains in every batch
  (`data.replay_fraction`) and gradual unfreezing top first (`train.unfreeze`);
- plain fine-tuning (the named baseline): `--train.init_from BASE`, Chinese only, every layer.

Each model is measured by `lmforge eval`'s per-domain held-out perplexity (lmforge/eval/runner.py:
evaluate, the same val split for all three). Targets (exit 1 when one is missed):

1. retention: each old domain's perplexity after continual training within 5% of the base model's
   (ratio base / after >= 1/1.05 for the worse of the two);
2. the baseline forgets more: plain fine-tuning's old-domain perplexity / the continual run's >= 1
   (worse domain);
3. the new domain is still learnt (not a target of the issue; kept so that freezing everything
   cannot pass): Chinese perplexity base / after continual >= 1 (its drop relative to plain
   fine-tuning's is printed).

The model is recipes/tiny-dense.toml (4 layers, width 192, vocab 8192) on the main job's packed data
(copied: the bench writes nothing next to it). `--base RUN` starts from an existing run instead of
training the two-domain base (e.g. the main job's runs/tiny-dense, read only: it saw all three
domains, Chinese at temperature-2 weight, so "new" is then "continued"). Every model is evaluated on
windows of `--eval-seq-len` tokens (the same for all), whatever seq_len the runs trained at.

Both continual runs take the same peak lr (`--lr`). The continual run's unfreezing stages (the
new-language recipe: the new tokens' output and input embeddings first, around a frozen body, then
the body top first): the output head and final norm (top:0) from step 0; the token embeddings
joining from step max(1, steps // 30); top:2 (with the embeddings) from a third of the run; all from
two thirds; their lr scales `--stage-scales` (head, embeddings, top:2 blocks, the rest). The
embeddings' scale is above 1: the new script's rows start from their (decayed) random init and
only ever meet the new domain's text, while the head, shared by every domain, moves slowly.
`--unfreeze TOML` replaces the whole stage list (e.g. the earlier top:1 / top:2 / all schedule).
The two are trained side by side, one thread each (`--serial`: one after the other, for a shared
machine; the figures are the same).

    .venv/bin/python bench/continual.py [--data-dir data/default] [--base RUN | --base-steps 240]
        [--steps 60] [--seq-len 128] [--eval-seq-len 128] [--lr 3e-4] [--stage-scales 0.3,5,0.3,0.2]
        [--unfreeze TOML] [--serial] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _check import verdict  # noqa: E402

OLD, NEW = ("bible", "shakespeare"), "chinese"
RETENTION = 1 / 1.05  # base perplexity / after continual training, each old domain
COMMON = ["--train.eval_interval", "0", "--metrics.progress", "none", "--metrics.tensorboard", "false",
          "--metrics.plot", "false", "--metrics.log_interval", "20", "--checkpoint.keep_last", "1"]


def train(runs: dict[str, list[str]], work: Path, data: Path, steps: int, threads: int,
          serial: bool = False) -> dict[str, float]:
    """Train each named run (extra overrides) at the same time (`serial`: one after the other),
    `threads` intra-op threads each; returns each one's wall seconds."""
    if serial and len(runs) > 1:
        return {k: v for name, extra in runs.items() for k, v in train({name: extra}, work, data, steps, threads).items()}
    started = {}
    for name, extra in runs.items():
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        args = [sys.executable, "-m", "lmforge", "train", str(REPO / "recipes" / "tiny-dense.toml"), *COMMON,
                "--data.dir", str(data), "--train.output_dir", str(out), "--train.steps", str(steps),
                "--checkpoint.interval", str(steps), *extra]
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        started[name] = (proc, args, time.perf_counter())
    seconds = {}
    for name, (proc, args, t0) in started.items():
        stdout, stderr = proc.communicate()
        seconds[name] = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed ({' '.join(args)}):\n{stdout[-2000:]}\n{stderr[-3000:]}")
        for line in stdout.splitlines():
            if line.startswith(("domains:", "unfreeze:", "init_from", "done:")):
                print(f"  [{name}] {line}", flush=True)
    return seconds


def perplexities(run: Path, data: Path, seq_len: int) -> dict[str, float]:
    from lmforge.eval.runner import EvalOptions, evaluate

    result = evaluate(run, EvalOptions(data_dir=data, items=0, speed=False, seq_len=seq_len), say=lambda _: None)
    ppl = result["deterministic"]["perplexity"]
    return {d: v["perplexity"] for d, v in ppl["domains"].items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=REPO / "data" / "default",
                    help="a packed data dir of the default corpus (three domains); copied")
    ap.add_argument("--base", type=Path, default=None, help="start from this run (read only) instead of training one")
    ap.add_argument("--base-steps", type=int, default=240, help="steps of the two-domain base run")
    # The defaults are the recorded run's (docs/benchmarks.md): 60 steps of 8 x 128 tokens, windows of 128
    ap.add_argument("--seq-len", type=int, default=128, help="train.seq_len of the continual runs")
    ap.add_argument("--eval-seq-len", type=int, default=128, help="window of every perplexity")
    ap.add_argument("--steps", type=int, default=60, help="steps of each continual run")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak lr of both continual runs")
    ap.add_argument("--stage-scales", default="0.3,5,0.3,0.2",
                    help="lr_scale of the four unfreezing stages: head (top:0), + token embeddings, + top:2 blocks, all")
    ap.add_argument("--unfreeze", default=None,
                    help='a train.unfreeze stage list (TOML) instead of the default, e.g. \'[{step = 0, layers = "top:1", '
                         'lr_scale = 0.5}, {step = 20, layers = "top:2", lr_scale = 0.3}, {step = 40, layers = "all", '
                         'lr_scale = 0.2}]\'')
    ap.add_argument("--serial", action="store_true",
                    help="train the runs one after the other, one thread each (for a shared machine)")
    ap.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = ap.parse_args()
    if not (args.data_dir / "manifest.json").is_file():
        raise SystemExit(f"{args.data_dir}: no packed data (run `lmforge data prepare recipes/tiny-dense.toml`)")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-continual-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        shutil.copytree(args.data_dir, data, dirs_exist_ok=True)
    s = args.steps
    third = max(1, s // 3)
    scales = [float(x) for x in args.stage_scales.split(",")]
    if len(scales) != 4:
        raise SystemExit(f"--stage-scales {args.stage_scales}: four scales (head, embeddings, top:2, all)")
    head, emb, top2, rest = scales
    schedule = args.unfreeze or (
        f'[{{step = 0, layers = "top:0", lr_scale = {head}}}, '
        f'{{step = {max(1, s // 30)}, layers = "top:0", embeddings = true, lr_scale = {emb}}}, '
        f'{{step = {third}, layers = "top:2", embeddings = true, lr_scale = {top2}}}, '
        f'{{step = {2 * third}, layers = "all", lr_scale = {rest}}}]')
    base = args.base or work / "base"
    new_run = ["--train.init_from", str(base), "--optimizer.lr", str(args.lr), "--train.seq_len", str(args.seq_len),
               "--scheduler.warmup_steps", str(max(1, s // 12)), "--data.domain_weights", f"{NEW}:1"]
    what = f"{args.base} (as it is)" if args.base else f"{args.base_steps} steps on {' + '.join(OLD)}"
    print(f"work dir {work}; base {what}, then {s} steps of 8 x {args.seq_len} tokens on {NEW} "
          f"(peak lr {args.lr:g})", flush=True)
    times = {} if args.base else train({"base": ["--data.domain_weights", ",".join(f"{d}:1" for d in OLD)]},
                                       work, data, args.base_steps, 2)
    # both at once, one thread each: the same two cores a two-thread run would take, in half the wall time
    times |= train({"continual": [*new_run, "--data.replay_fraction", "0.1", "--train.unfreeze", schedule],
                    "plain": new_run}, work, data, s, 1, args.serial)
    ppl = {"base": perplexities(base, data, args.eval_seq_len),
           **{name: perplexities(work / name, data, args.eval_seq_len) for name in ("continual", "plain")}}

    print(f"\nheld-out perplexity per domain (lmforge eval; train seconds {', '.join(f'{k} {v:.0f}' for k, v in times.items())})")
    print(f"{'domain':<12} {'base':>10} {'continual':>10} {'plain':>10} {'continual/base':>15} {'plain/base':>11}")
    for d in (*OLD, NEW):
        b, c, p = ppl["base"][d], ppl["continual"][d], ppl["plain"][d]
        print(f"{d:<12} {b:>10.2f} {c:>10.2f} {p:>10.2f} {c / b:>15.3f} {p / b:>11.3f}")
    retention = min(ppl["base"][d] / ppl["continual"][d] for d in OLD)
    forgets_more = min(ppl["plain"][d] / ppl["continual"][d] for d in OLD)
    drop_c = math.log(ppl["base"][NEW]) - math.log(ppl["continual"][NEW])
    drop_p = math.log(ppl["base"][NEW]) - math.log(ppl["plain"][NEW])
    print(f"{NEW} loss drop: continual {drop_c:.3f} nats, plain {drop_p:.3f} nats "
          f"(continual / plain {drop_c / drop_p if drop_p > 0 else float('nan'):.2f})", flush=True)
    print("BENCH_FIGURES " + json.dumps({"perplexity": ppl, "train_s": times}), flush=True)
    rc = verdict("continual_retention", "the base model before continual training",
                 "old-domain perplexity base / after continual (worse domain)", retention, round(RETENTION, 4))
    rc |= verdict("continual_vs_plain", "plain fine-tuning (no replay, all layers)",
                  "old-domain perplexity plain / continual (worse domain)", forgets_more, 1.0)
    rc |= verdict("continual_new_domain", "the base model before continual training",
                  f"{NEW} perplexity base / after continual", ppl["base"][NEW] / ppl["continual"][NEW], 1.0)
    return rc


if __name__ == "__main__":
    sys.exit(main())

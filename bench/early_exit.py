"""Adaptive depth on the main job's model (issue 17, item 5): early-exit decoding against the full
model, and self-speculative decoding's exactness, in one run.

    1. exits trained: `lmforge train recipes/tiny-dense.toml --train.init_from RUN
       --model.early_exit.layers 1,2 --model.early_exit.loss_weight 4` for --ft-steps (400) steps at
       --ft-lr (1e-3) (the exit loss of lmforge/train/exit_loss.py; every block trains), unless
       --exit-run gives such a run;
    2. the confidence: --measure learned (default) fits the exit gates with `lmforge exit-gates fit`
       (serve/exit_gate.py: a linear gate per exit predicting log KL(full || exit), on 200 train
       windows); max_prob and margin need nothing fitted;
    3. held-out perplexity (lmforge.eval, the whole val split) of that model at full depth and under
       early exit at every threshold of the sweep (one forward: eval/early_exit.py), with the mean
       blocks run and each exit's share; the chosen threshold is the one with the fewest mean blocks
       whose perplexity is within --max-ppl-increase (2%) of full depth (chosen on the same split);
    4. decode speed at batch 1 (the named baseline: `generate` of the same model at full depth,
       its KV cache; greedy, no EOS stop): --prompts (8) held-out prompts of 16 tokens, each
       continued 128 tokens, all runs interleaved for --rounds (5) rounds; the prefill (a 1-token
       generate) is subtracted from each, so the figure is decode tokens/s. Also timed: every token
       leaving at one exit ("always exit k": that depth's cost), and self-speculative decoding;
    5. the KL oracle: per exit, the largest share of held-out tokens that could leave within the
       perplexity bound had the decoder known each token's KL to the full model, and the speed-up
       that bounds with a free check (how much room any confidence measure has);
    6. self-speculative decoding (drafts from the first exit): its tokens must equal the full
       model's greedy tokens for every prompt; its speed is reported, not gated.

Exit 1 when the decode speed-up at the chosen threshold is below --target (1.4), when no threshold
keeps the perplexity within bounds, or when any self-speculative output differs. Needs the main
job's run and data (`bash scripts/run_default.sh`); run by hand, not by run_all.py.

    PYTHONPATH=. python bench/early_exit.py [--run runs/tiny-dense] [--data-dir data/default]
        [--measure learned|max_prob|margin] [--exit-run DIR] [--work DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402
from _runs import lmforge, main_run_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = {"learned": (0.9, 0.93, 0.95, 0.96, 0.963, 0.966, 0.97, 0.975, 0.98, 0.99),
              "max_prob": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
              "margin": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)}


def train_exits(base: Path, out: Path, data_dir: Path, args: argparse.Namespace) -> float:
    """`lmforge train` from the base run's weights with exits (a fresh process, as a user runs it); seconds."""
    cmd = [sys.executable, "-m", "lmforge", "train", str(REPO / "recipes" / "tiny-dense.toml"),
           "--train.init_from", str(base), "--train.output_dir", str(out), "--data.dir", str(data_dir),
           "--model.early_exit.layers", args.layers, "--model.early_exit.loss_weight", str(args.loss_weight),
           "--train.steps", str(args.ft_steps), "--optimizer.lr", str(args.ft_lr),
           "--scheduler.warmup_steps", str(min(20, args.ft_steps // 5)), "--train.eval_interval", "0",
           "--checkpoint.interval", str(args.ft_steps), "--checkpoint.keep_last", "1", "--metrics.progress", "none",
           "--metrics.tensorboard", "false", "--metrics.plot", "false", "--metrics.log_interval", "50",
           "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"exit training failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith(("init_from", "done:")) or "exit_loss" in line:
            print(f"  [train exits] {line}", flush=True)
    return time.perf_counter() - t0


def perplexities(model_dir: Path, data_dir: Path, thresholds: tuple[float, ...], measure: str = "max_prob",
                  gates: Path | None = None) -> tuple[float, list[dict]]:
    """Full-depth held-out perplexity and one row per threshold (eval/early_exit.py; none: no rows)."""
    from lmforge.eval.runner import EvalOptions, evaluate

    r = evaluate(model_dir, EvalOptions(data_dir=data_dir, items=0, speed=False, early_exit=thresholds,
                                        early_exit_measure=measure, exit_gates=gates), say=lambda _: None)["deterministic"]
    return float(r["perplexity"]["perplexity"]), r.get("early_exit", {}).get("rows", [])


def prompts_from(data_dir: Path, n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` tokens: the starts of evenly spaced held-out windows."""
    from lmforge.eval.heldout import open_heldout

    ds = open_heldout(data_dir).dataset
    windows = ds.n_windows(length)
    if windows < n:
        raise SystemExit(f"{data_dir}: {windows} held-out windows of {length + 1} tokens, fewer than --prompts {n}")
    return [ds.window(i * windows // n, length)[:length].tolist() for i in range(n)]


def oracle_shares(model, data_dir: Path, max_increase: float, seq_len: int = 255) -> dict[int, float]:
    """Per exit, the largest share of held-out tokens that could leave there with the perplexity
    within `max_increase`, had the decoder known each token's KL(full || exit) (the full model's
    distribution: what a real confidence measure can only estimate) and let the closest go first.
    An upper bound on what any confidence measure reaches at that exit."""
    import math

    import numpy as np
    import torch

    from lmforge.eval.heldout import open_heldout
    from lmforge.eval.scoring import token_nll

    ds = open_heldout(data_dir).dataset
    layers = list(model.cfg.early_exit.layers)
    gap: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    kl: dict[int, list[torch.Tensor]] = {k: [] for k in layers}
    with torch.inference_mode():
        n = ds.n_windows(seq_len)
        for first in range(0, n, 8):
            x = torch.from_numpy(np.stack([ds.window(i, seq_len) for i in range(first, min(first + 8, n))]))
            final, exits = model(x[:, :-1], exits=True)
            full_nll, full_lp = token_nll(final, x[:, 1:]), final.float().log_softmax(-1)
            for k, z in zip(layers, exits, strict=True):
                gap[k].append((token_nll(z, x[:, 1:]) - full_nll).reshape(-1))
                kl[k].append((full_lp.exp() * (full_lp - z.float().log_softmax(-1))).sum(-1).reshape(-1))
    shares = {}
    for k in layers:
        g, order = torch.cat(gap[k]).double(), torch.cat(kl[k]).argsort()
        within = (g[order].cumsum(0) <= math.log1p(max_increase) * g.numel()).nonzero()
        shares[k] = (int(within.max()) + 1) / g.numel() if within.numel() else 0.0
    return shares


def decode_seconds(run, prompt: list[int], new_tokens: int) -> float:
    """Seconds of `run(prompt, new_tokens)` minus its prefill (the same call for one token)."""
    t0 = time.perf_counter()
    run(prompt, 1)
    t1 = time.perf_counter()
    run(prompt, new_tokens)
    t2 = time.perf_counter()
    return (t2 - t1) - (t1 - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "tiny-dense", help="the main job's run (the base)")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--layers", default="1,2", help="exits after these many blocks (model.early_exit.layers)")
    ap.add_argument("--loss-weight", type=float, default=4.0, help="model.early_exit.loss_weight")
    ap.add_argument("--ft-steps", type=int, default=400)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--exit-run", type=Path, default=None, help="a run with trained exits (skips step 1)")
    ap.add_argument("--thresholds", type=lambda s: tuple(float(x) for x in s.split(",")), default=None,
                    help="the sweep (default: one per measure)")
    ap.add_argument("--measure", default="learned", choices=("learned", "max_prob", "margin"),
                    help="learned: gates fitted by `lmforge exit-gates fit` on the exit run's train windows")
    ap.add_argument("--max-ppl-increase", type=float, default=0.02)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", type=float, default=1.4)
    ap.add_argument("--work", type=Path, default=None, help="keep the exit run here (default: a temp dir, removed)")
    ap.add_argument("--out", type=Path, default=None, help="also write all figures here (JSON)")
    args = ap.parse_args(argv)
    data_dir = main_run_data(args.run, args.data_dir)
    if data_dir is None:
        return 2
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-early-exit-")))
        work.mkdir(parents=True, exist_ok=True)
        return run(args, data_dir, work)


def run(args: argparse.Namespace, data_dir: Path, work: Path) -> int:
    import torch

    from lmforge.serve.early_exit import ExitPolicy
    from lmforge.serve.exit_gate import ExitGates
    from lmforge.serve.generate import generate, load_for_generation
    from lmforge.serve.speculative import SpeculationStats, self_speculative_generate

    torch.set_num_threads(args.threads)
    exit_run = args.exit_run
    if exit_run is None:
        exit_run = work / "exits"
        seconds = train_exits(args.run, exit_run, data_dir, args)
        print(f"exits after {args.layers} blocks trained: {args.ft_steps} steps at lr {args.ft_lr:g}, loss weight "
              f"{args.loss_weight:g} [{seconds:.0f} s]", flush=True)
    gates_file = None
    if args.measure == "learned":
        gates_file = work / "exit_gates.safetensors"
        t0 = time.perf_counter()
        print(lmforge(["exit-gates", "fit", str(exit_run), "--data-dir", str(data_dir), "--out", str(gates_file),
                       "--overwrite"]).strip() + f" [{time.perf_counter() - t0:.0f} s]", flush=True)
    base_ppl, _ = perplexities(args.run, data_dir, ())
    full_ppl, rows = perplexities(exit_run, data_dir, args.thresholds or THRESHOLDS[args.measure], args.measure,
                                  gates_file)
    print(f"\nheld-out perplexity: base run {base_ppl:.4f}; with trained exits, full depth {full_ppl:.4f} "
          f"({full_ppl / base_ppl - 1:+.2%} vs base)")
    print(f"{'threshold':>9} {'perplexity':>10} {'vs full':>8} {'mean blocks':>11}  exit shares")
    for r in rows:
        shares = ", ".join(f"{k}: {v:.3f}" for k, v in r["exit_share"].items())
        print(f"{r['threshold']:9g} {r['perplexity']:10.4f} {r['perplexity'] / full_ppl - 1:+8.2%} "
              f"{r['mean_depth']:11.3f}  {shares}")
    within = [r for r in rows if r["perplexity"] <= full_ppl * (1 + args.max_ppl_increase)]
    if not within:
        print(f"FAIL: no threshold keeps the perplexity within {args.max_ppl_increase:.0%} of full depth",
              file=sys.stderr)
        return 1
    chosen = min(within, key=lambda r: (r["mean_depth"], r["threshold"]))
    threshold = chosen["threshold"]
    print(f"chosen threshold {threshold:g}: perplexity {chosen['perplexity']:.4f} "
          f"({chosen['perplexity'] / full_ppl - 1:+.2%}), mean blocks {chosen['mean_depth']:.3f}", flush=True)

    model, cfg, _ = load_for_generation(exit_run)
    policy = ExitPolicy(threshold, args.measure, gates=ExitGates.load(gates_file) if gates_file else None)
    prompts = prompts_from(data_dir, args.prompts, args.prompt_len)
    depths: list[int] = []

    def full(p: list[int], n: int) -> list[int]:
        return generate(model, p, n)[0]

    def early(p: list[int], n: int) -> list[int]:
        return generate(model, p, n, early_exit=policy, exit_depths=depths)[0]

    def speculative(p: list[int], n: int) -> list[int]:
        return self_speculative_generate(model, p, n)

    def always(k: int):  # every token leaves at exit k: that depth's cost per token
        return lambda p, n: generate(model, p, n, early_exit=ExitPolicy(0.0, layers=(k,)))[0]

    runs = {"full": full, "early exit": early, "self-speculative": speculative,
            **{f"always exit {k}": always(k) for k in cfg.early_exit.layers}}
    for p in prompts[:2]:  # warm-up
        for fn in runs.values():
            fn(p, 8)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for p in prompts:
            for name, fn in runs.items():
                seconds[name].append(decode_seconds(fn, p, args.new_tokens))
    decoded = (args.new_tokens - 1) * len(prompts)
    rate = {name: decoded * args.rounds / sum(s) for name, s in seconds.items()}
    n = len(prompts)
    spread = {name: [decoded / sum(s[i * n:(i + 1) * n]) for i in range(args.rounds)] for name, s in seconds.items()}
    depths_run = depths[-args.rounds * len(prompts) * (args.new_tokens - 1):]
    mean_depth = statistics.mean(depths_run) if depths_run else float(cfg.n_layers)

    stats = SpeculationStats()
    mismatched = [i for i, p in enumerate(prompts)
                  if self_speculative_generate(model, p, args.new_tokens, stats=stats) != full(p, args.new_tokens)]
    print(f"\ndecode at batch 1, {len(prompts)} prompts x {args.new_tokens} tokens x {args.rounds} rounds "
          f"({args.threads} threads):")
    for name in seconds:
        per_round = ", ".join(f"{x:.0f}" for x in spread[name])
        print(f"{name:>17}: {rate[name]:8.1f} tokens/s (per round {per_round}); {rate[name] / rate['full']:.3f}x full")
    print(f"early exit at {threshold:g} while decoding: mean blocks {mean_depth:.3f} of {cfg.n_layers}")
    oracle = oracle_shares(model, data_dir, args.max_ppl_increase)
    bound = {k: 1 / (share * rate["full"] / rate[f"always exit {k}"] + 1 - share) for k, share in oracle.items()}
    for k, share in oracle.items():
        print(f"exit {k}: at most {share:.3f} of the tokens can leave within {args.max_ppl_increase:.0%} perplexity "
              f"(KL oracle); with a free confidence check that bounds the speed-up at {bound[k]:.3f}x")
    print(f"self-speculative: {len(prompts) - len(mismatched)}/{len(prompts)} outputs equal the full model's; "
          f"draft acceptance {stats.acceptance:.3f} over {stats.rounds} rounds")
    result = {"base_perplexity": base_ppl, "full_perplexity": full_ppl, "rows": rows, "threshold": threshold,
              "chosen": chosen, "tokens_per_s": rate, "per_round": spread, "decode_mean_depth": mean_depth,
              "oracle_share": oracle, "speedup_bound": bound,
              "speculative": {"equal": len(prompts) - len(mismatched), "prompts": len(prompts),
                              "acceptance": stats.acceptance},
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    if args.out:
        from lmforge.storage.atomic import write_text_atomic

        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    status = verdict("early_exit_decode", f"full-depth generate at batch 1 (threshold {threshold:g}, perplexity "
                     f"{chosen['perplexity'] / full_ppl - 1:+.2%})", "decode tokens/s ratio",
                     rate["early exit"] / rate["full"], args.target)
    status |= verdict("self_speculative_exact", "the full model's greedy tokens", "share of equal outputs",
                      (len(prompts) - len(mismatched)) / len(prompts), 1.0)
    return status


if __name__ == "__main__":
    raise SystemExit(main())

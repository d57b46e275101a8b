"""ONNX edge export (issue 16, item 6) on a trained run, in one run: `lmforge export --format onnx`
fp32 and --int8 (lmforge/interop/onnx/export.py), then against lmforge's own model (the named
baseline, serve/generate.py and `lmforge eval`):

1. greedy tokens: onnxruntime's fp32 graph with its KV cache (interop/onnx/runtime.py: OnnxLM.generate)
   against lmforge.serve.generate.generate (KV cache, fp32, temperature 0), `--prompts` text prompts
   x `--new-tokens` tokens: every token equal (target: all prompts);
2. perplexity over the run's held-out windows (the trainer's validation windows: the first
   `--max-batches` global batches), scored by lmforge/eval's `heldout_perplexity` for the ONNX graphs
   and by `lmforge eval` (eval/runner.py: evaluate) for the PyTorch model: fp32 ONNX equal to
   eval's fp32 (relative 1e-4), int8 ONNX within `--max-increase` (2%) of fp32 ONNX;
3. decode latency, ms per token at batch 1 (prompts of min(128, max_seq_len / 2) tokens, 64 greedy
   steps after the prefill, median of 3 rounds after a warm-up): lmforge's model with its KV cache,
   fp32 ONNX, int8 ONNX, all at `--threads` intra-op threads. Reported, not a target.

Exit 1 when a check misses. Default run: runs/tiny-dense, the main job's (scripts/run_default.sh;
4.9M parameters), so scripts/bench.sh leaves it out as it does synthetic_detection; ~2 minutes.

    .venv/bin/python bench/onnx_export.py [--run RUN] [--data-dir D] [--max-batches 8] [--threads 1]
                                          [--new-tokens 32] [--max-increase 0.02] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _check import verdict  # noqa: E402

PROMPTS = ["ROMEO:\nWhat light", "In the beginning God created", "中国人民"]


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def lmforge_decode_seconds(model, prompt, new_tokens: int) -> float:
    """Seconds of `new_tokens` greedy one-token steps with lmforge's KV cache after the prefill
    (the calls serve/generate.py makes, as eval/speed.py times them)."""
    import torch

    with torch.inference_mode():
        cache = model.new_kv_cache(1, prompt.shape[1] + new_tokens + 1)
        nxt = model(torch.from_numpy(prompt), cache=cache)[:, -1].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(REPO / "runs" / "tiny-dense"), help="run dir (its newest checkpoint)")
    ap.add_argument("--data-dir", default=None, help="packed data dir (default: the run's data.dir, relative to "
                                                     "the repository when relative)")
    ap.add_argument("--max-batches", type=int, default=8, help="global batches of held-out windows")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt for the equality check")
    ap.add_argument("--max-increase", type=float, default=0.02, help="int8 perplexity over fp32's, at most")
    ap.add_argument("--json", default=None, help="write the figures to this file")
    args = ap.parse_args()

    import numpy as np
    import torch

    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.eval.heldout import open_heldout
    from lmforge.eval.perplexity import Windows, heldout_perplexity
    from lmforge.eval.runner import EvalOptions, evaluate
    from lmforge.interop.onnx.export import export_onnx
    from lmforge.interop.onnx.runtime import OnnxLM, decode_ms_per_token
    from lmforge.serve.generate import generate, load_source, resolve_source

    torch.set_num_threads(args.threads)
    src = resolve_source(Path(args.run))
    model, cfg, tok_path = load_source(src)
    run_cfg = src.run_config
    data_dir = Path(args.data_dir) if args.data_dir else REPO / run_cfg["data"]["dir"]
    tok = TextTokenizer.from_file(tok_path or data_dir / "tokenizer.json")
    print(f"run {args.run} ({src.step_dir.name}): {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}; CPU {cpu_name()}, "
          f"{args.threads} thread(s)", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    dirs, export_s = {"fp32": tmp / "fp32", "int8": tmp / "int8"}, {}
    metas = {}
    for name, d in dirs.items():
        t0 = time.perf_counter()
        metas[name] = export_onnx(model, cfg, d, source={"path": str(args.run), "checkpoint": str(src.step_dir)},
                                  tokenizer_json=tok_path, int8=name == "int8")
        export_s[name] = time.perf_counter() - t0
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    for name, m in metas.items():
        print(f"export {name}: {export_s[name]:.1f} s, model.onnx {m['model_bytes'] / 2**20:.2f} MiB "
              f"({m['model_bytes'] / fp32_bytes:.3f}x the fp32 parameters)", flush=True)
    onnx = {name: OnnxLM(d, threads=args.threads) for name, d in dirs.items()}

    # 1. greedy tokens, fp32
    prompts = [tok.encode(p) for p in PROMPTS]
    equal, int8_agree, rows = 0, 0, []
    for text, ids in zip(PROMPTS, prompts, strict=True):
        ref = generate(model, ids, args.new_tokens, temperature=0.0)[0]
        got = onnx["fp32"].generate(ids, args.new_tokens)[0]
        got8 = onnx["int8"].generate(ids, args.new_tokens)[0]
        same = got == ref and len(ref) == args.new_tokens
        equal += same
        prefix8 = next((i for i, (a, b) in enumerate(zip(got8, ref)) if a != b), len(ref))
        int8_agree += prefix8
        rows.append({"prompt": text, "tokens": len(ref), "fp32_equal": same, "int8_same_prefix": prefix8})
        print(f"  prompt {text!r:34} lmforge == onnx fp32: {same} ({len(ref)} tokens); int8 agrees for the first "
              f"{prefix8}; lmforge: {tok.decode(ref)!r}", flush=True)

    # 2. perplexity on the same held-out windows
    opts = EvalOptions(data_dir=data_dir, max_batches=args.max_batches, items=0, speed=False)
    t0 = time.perf_counter()
    ev = evaluate(Path(args.run), opts, say=lambda line: print(line, flush=True))["deterministic"]["perplexity"]
    eval_s = time.perf_counter() - t0
    train = run_cfg.get("train", {})
    w = Windows(ev["seq_len"], int(train["micro_batch_size"]), int(train["global_batch_size"]),
                int(train["eval_batches"]), args.max_batches)
    held = open_heldout(data_dir)
    eos = tok.eos_id if cfg.attention.doc_mask else None
    ppl, ppl_s = {}, {}
    for name, lm in onnx.items():
        t0 = time.perf_counter()
        ppl[name] = heldout_perplexity(lm, held, w, torch.device("cpu"), eos, lambda line: None)
        ppl_s[name] = time.perf_counter() - t0
        assert ppl[name]["windows"] == ev["windows"], (ppl[name]["windows"], ev["windows"])
    p_eval, p32, p8 = ev["perplexity"], ppl["fp32"]["perplexity"], ppl["int8"]["perplexity"]
    print(f"perplexity over {ev['windows']} windows of {ev['seq_len']} tokens ({ev['tokens']} targets):\n"
          f"  lmforge eval (PyTorch fp32) {p_eval:.4f}   ({eval_s:.1f} s)\n"
          f"  onnxruntime fp32            {p32:.4f}   ({ppl_s['fp32']:.1f} s; /eval - 1 = {p32 / p_eval - 1:+.2e})\n"
          f"  onnxruntime int8            {p8:.4f}   ({ppl_s['int8']:.1f} s; /fp32 - 1 = {p8 / p32 - 1:+.2%})",
          flush=True)
    if "validation" in ev:
        print(f"  (the trainer's validation windows: lmforge eval {ev['validation']['perplexity']:.4f}, "
              f"onnx fp32 {ppl['fp32']['validation']['perplexity']:.4f}, "
              f"int8 {ppl['int8']['validation']['perplexity']:.4f})", flush=True)

    logged = [json.loads(ln) for ln in (Path(args.run) / "metrics.jsonl").read_text().splitlines()
              if '"prefix": "val"' in ln] if (Path(args.run) / "metrics.jsonl").is_file() else []
    if logged and args.max_batches == int(train["eval_batches"]):
        print(f"  (the trainer's logged validation at step {logged[-1]['step']}: exp({logged[-1]['loss']:.6f}) = "
              f"{math.exp(logged[-1]['loss']):.4f})", flush=True)

    # 3. decode latency at batch 1
    prompt_len = max(1, min(128, cfg.max_seq_len // 2))
    steps = max(1, min(64, cfg.max_seq_len - prompt_len - 1))
    lat_prompts = [np.random.default_rng(i).integers(0, cfg.vocab_size, (1, prompt_len), dtype=np.int64)
                   for i in range(3)]
    ms = {"lmforge (PyTorch, KV cache)": decode_ms_per_token(lambda p, n: lmforge_decode_seconds(model, p, n),
                                                             lat_prompts, steps)}
    for name, lm in onnx.items():
        ms[f"onnxruntime {name}"] = decode_ms_per_token(lm.decode_seconds, lat_prompts, steps)
    base = ms["lmforge (PyTorch, KV cache)"]
    print(f"decode latency, batch 1, prompt {prompt_len} tokens, {steps} steps, {args.threads} thread(s):")
    for name, v in ms.items():
        print(f"  {name:30} {v:7.3f} ms/token  ({base / v:.2f}x lmforge's speed)")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "run": str(args.run), "checkpoint": str(src.step_dir), "threads": args.threads,
            "export_s": export_s, "model_bytes": {k: m["model_bytes"] for k, m in metas.items()},
            "fp32_parameter_bytes": fp32_bytes, "greedy": rows,
            "perplexity": {"lmforge_eval": p_eval, "onnx_fp32": p32, "onnx_int8": p8, "windows": ev["windows"]},
            "decode_ms_per_token": ms}, indent=2) + "\n")

    status = verdict("onnx_greedy", "lmforge generate (KV cache, fp32)", f"prompts with {args.new_tokens} equal "
                     "greedy tokens / prompts", equal / len(PROMPTS), 1.0)
    status |= verdict("onnx_fp32_perplexity", "lmforge eval fp32 perplexity", "1 - |onnx fp32 / eval - 1|",
                      1 - abs(p32 / p_eval - 1), 1 - 1e-4)
    status |= verdict("onnx_int8_perplexity", "onnx fp32 perplexity, same windows", "fp32 / int8 perplexity",
                      p32 / p8 if math.isfinite(p8) else float("nan"), round(1 / (1 + args.max_increase), 4))
    return status


if __name__ == "__main__":
    sys.exit(main())

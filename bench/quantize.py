"""Quantization against the fp32 original, one run (issue 16): `lmforge compress quantize` in its three
schemes on a trained run (default: the main job, runs/tiny-dense), each evaluated as `lmforge eval`
evaluates (held-out perplexity of the whole val split, lmforge/eval/runner.py) and timed as eval
times generation (lmforge/eval/speed.py: batch-1 prefill and greedy decode with the KV cache,
medians of 3), plus the same decode at a larger batch (--batch, default 8).

Targets (each a verdict line; exit 1 when one misses):
- perplexity: int8-weight within 1% of fp32, int4-weight (GPTQ) within 5%; int8-dynamic reported;
- size (the tensors file against the fp32 parameters): int8 <= 0.30x, int4 <= 0.18x;
- decode tokens/s at batch 1 of each scheme's default runtime not slower than fp32 (ratio >= 0.95:
  the models are timed interleaved, best of --rounds, on a machine other jobs share; 5% is its noise).
Every other runtime (torchao int8 kernels, torch's int4 pack kernel) and int4 round-to-nearest
are reported beside them, as are the larger batch's figures.

    .venv/bin/python bench/quantize.py [--run runs/tiny-dense] [--data-dir DIR] [--calib-samples 128]
                                       [--rounds 3] [--batch 8] [--threads 1] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from _check import verdict  # noqa: E402

SCHEMES = {"int8-weight": [], "int8-dynamic": [],
           "int4-weight": [], "int4-weight-rtn": ["--calibration", "rtn"]}
PPL_TARGET = {"int8-weight": 0.01, "int4-weight": 0.05}
SIZE_TARGET = {"int8-weight": 0.30, "int8-dynamic": 0.30, "int4-weight": 0.18}


def decode_batch(model, vocab: int, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Greedy decode tokens/s (all rows) at `batch` after a `prompt_len` prefill, KV cache on."""
    import torch

    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        cache = model.new_kv_cache(batch, prompt_len + new_tokens)
        nxt = model(prompt, cache=cache)[:, -1].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
        return batch * new_tokens / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(REPO / "runs" / "tiny-dense"))
    ap.add_argument("--data-dir", default=None, help="packed data dir (default: the run's data.dir)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best of)")
    ap.add_argument("--batch", type=int, default=8, help="the larger decode batch reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch

    from lmforge.cli import main as lmforge
    from lmforge.compress.artifact import TENSORS, load_quantized, read_quantized
    from lmforge.compress.runtime import int8_runtime_problem
    from lmforge.compress.schemes import RUNTIMES
    from lmforge.eval.runner import EvalOptions, evaluate
    from lmforge.eval.speed import measure_speed
    from lmforge.serve.generate import load_for_generation

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    print(f"bench/quantize.py: {run}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, out {tmp}", flush=True)
    dirs: dict[str, Path] = {}
    timings: dict[str, float] = {}
    for name, extra in SCHEMES.items():
        scheme = name.removesuffix("-rtn")
        calib = ["--calib-samples", str(args.calib_samples)] if scheme == "int4-weight" else []
        data = ["--calib-data", args.data_dir] if args.data_dir and scheme == "int4-weight" else []
        t0 = time.perf_counter()
        code = lmforge(["compress", "quantize", str(run), "--scheme", scheme, "--out", str(tmp / name),
                        *calib, *data, *extra])
        timings[name] = time.perf_counter() - t0
        if code != 0:
            print(f"FAIL: quantizing {name} exited {code}", file=sys.stderr)
            return 1
        dirs[name] = tmp / name
    data_dir = Path(args.data_dir) if args.data_dir else Path(read_quantized(dirs["int8-weight"]).run_config["data"]["dir"])
    opts = EvalOptions(data_dir=data_dir, items=0, speed=False)
    ppl = {"fp32": evaluate(run, opts, say=lambda _: None)["deterministic"]["perplexity"]}
    for name, d in dirs.items():
        ppl[name] = evaluate(d, opts, say=lambda _: None)["deterministic"]["perplexity"]
    fp32_model, cfg, _ = load_for_generation(run)
    fp32_bytes = sum(p.numel() * 4 for p in fp32_model.parameters())
    sizes = {name: (d / TENSORS).stat().st_size for name, d in dirs.items()}

    models = {"fp32": fp32_model}
    default_runtime = {}
    for name in ("int8-weight", "int8-dynamic", "int4-weight"):
        default_runtime[name] = read_quantized(dirs[name]).meta["runtime"]
        for rt in RUNTIMES[name]:
            problem = int8_runtime_problem(name, rt)
            if problem is not None:  # torchao's int8 matmul clips here: not a figure worth printing
                print(f"{name}/{rt}: not timed: {problem}")
                continue
            models[f"{name}/{rt}"] = load_quantized(dirs[name], runtime=rt)[0]
    speed: dict[str, list[dict]] = {k: [] for k in models}
    big: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds):
        for key, model in models.items():
            speed[key].append(measure_speed(model, cfg.vocab_size, cfg.max_seq_len, torch.device("cpu")))
            big[key].append(decode_batch(model, cfg.vocab_size, args.batch, 128, 32))
        print(f"timing round {r + 1}/{args.rounds} done", flush=True)
    best = {k: {"prefill": max(s["prefill_tokens_per_s"] for s in v), "decode": max(s["decode_tokens_per_s"] for s in v),
                f"decode_b{args.batch}": max(big[k])} for k, v in speed.items()}

    base = ppl["fp32"]["perplexity"]
    print(f"\nperplexity (whole val split of {data_dir}, {ppl['fp32']['tokens']} tokens); fp32 {base:.3f}")
    print(f"{'model':<18} {'ppl':>9} {'vs fp32':>8} {'size MiB':>9} {'x fp32':>7}  quantize s")
    print(f"{'fp32':<18} {base:>9.3f} {'':>8} {fp32_bytes / 2**20:>9.2f} {1:>7.3f}")
    for name in dirs:
        p = ppl[name]["perplexity"]
        print(f"{name:<18} {p:>9.3f} {p / base - 1:>+8.2%} {sizes[name] / 2**20:>9.2f} {sizes[name] / fp32_bytes:>7.3f}"
              f"  {timings[name]:.1f}")
    doms = sorted(ppl["fp32"]["domains"])
    print("per domain: " + "; ".join(f"{n}: " + ", ".join(f"{d} {ppl[n]['domains'][d]['perplexity']:.2f}" for d in doms)
                                     for n in ppl))
    print(f"\ngeneration speed, tokens/s (best of {args.rounds} interleaved rounds; batch 1 as lmforge eval "
          f"measures it, and decode at batch {args.batch})")
    print(f"{'model/runtime':<22} {'prefill':>9} {'decode':>9} {'vs fp32':>8} {'decode b' + str(args.batch):>11} {'vs fp32':>8}")
    f = best["fp32"]
    for key, b in best.items():
        print(f"{key:<22} {b['prefill']:>9.0f} {b['decode']:>9.1f} {b['decode'] / f['decode']:>8.2f} "
              f"{b[f'decode_b{args.batch}']:>11.1f} {b[f'decode_b{args.batch}'] / f[f'decode_b{args.batch}']:>8.2f}"
              f"{'  (default)' if key.split('/')[-1] == default_runtime.get(key.split('/')[0]) else ''}")
    if args.json:
        Path(args.json).write_text(json.dumps({"ppl": ppl, "sizes": sizes, "fp32_bytes": fp32_bytes, "speed": best,
                                               "quantize_s": timings}, indent=1))
    print()
    status = 0
    for name, tol in PPL_TARGET.items():
        status |= verdict(f"quantize_ppl_{name}", "fp32 perplexity", "fp32 ppl / quantized ppl",
                          base / ppl[name]["perplexity"], round(1 / (1 + tol), 4))
    for name, limit in SIZE_TARGET.items():
        status |= verdict(f"quantize_size_{name}", "fp32 parameter bytes", "fp32 bytes / quantized bytes",
                          fp32_bytes / sizes[name], round(1 / limit, 3))
    for name, rt in default_runtime.items():
        status |= verdict(f"quantize_decode_{name}", "fp32 decode tokens/s, batch 1",
                          f"decode tokens/s ratio ({rt})", best[f"{name}/{rt}"]["decode"] / f["decode"], 0.95)
    print(f"(int8-dynamic perplexity {ppl['int8-dynamic']['perplexity'] / base - 1:+.2%} vs fp32, reported; "
          f"median decode tokens/s fp32 {statistics.median(s['decode_tokens_per_s'] for s in speed['fp32']):.1f})")
    return status


if __name__ == "__main__":
    sys.exit(main())

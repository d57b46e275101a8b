"""The green-list text watermark on the main job's model (issue 18: TPR >= 0.98 at z > 4 on
200-token generations at delta 2, gamma 0.25; FPR <= 1e-3 on >= 1,000 human windows).

Prompts: `--n` windows of `--prompt-tokens` tokens of the held-out split (val.bin), none crossing
a document end. Each prompt gets a watermarked and a plain continuation of exactly `--new-tokens`
tokens (multinomial sampling at `--temperature`, no top-k/top-p, the same seed for both; an
end-of-text token does not stop it). Detection reads only the generated text, decoded and encoded
again as `lmforge watermark detect` would read a text file. Human text: every non-overlapping
window of `--new-tokens` tokens of the corpus documents (corpus.jsonl, train and held-out: all
written without the key). Perplexity cost: the generating model's own perplexity of each
continuation given its prompt (the model is the only oracle offline), watermarked over plain.
The detection curve: the watermarked sequences after random token substitution and deletion.
Needs the main job's run and corpus (`bash scripts/run_default.sh`); run by hand, not by run_all.py.

    PYTHONPATH=. python bench/watermark.py [--run runs/tiny-dense] [--data-dir data/default] [--n 200]
        [--out docs/watermark_bench.json]
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def held_out_prompts(data_dir: Path, n: int, length: int) -> list[list[int]]:
    """`n` windows of `length` tokens spread evenly over the val split, none containing end-of-text."""
    import numpy as np

    from lmforge.data.loader import TokenDataset

    ds = TokenDataset(data_dir, "val")
    tokens = np.asarray(ds.tokens, dtype=np.int64)
    starts = [s for s in range(0, len(tokens) - length, length) if ds.eos_id not in tokens[s:s + length]]
    if len(starts) < n:
        raise SystemExit(f"only {len(starts)} held-out prompt windows of {length} tokens; lower --n")
    pick = np.linspace(0, len(starts) - 1, n).round().astype(int)
    return [tokens[starts[i]:starts[i] + length].tolist() for i in pick]


def human_windows(corpus: Path, tok, length: int) -> list[list[int]]:
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    out = []
    for ids in tok.encode_batch(texts):
        out.extend(ids[s:s + length] for s in range(0, len(ids) - length + 1, length))
    return out


def continuation_ppl(model, prompts: list[list[int]], outs: list[list[int]]) -> float:
    """exp(mean NLL) of the continuations given their prompts, under `model`."""
    import torch

    from lmforge.eval.scoring import token_nll

    total, count = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(prompts), 50):
            seqs = torch.tensor([p + o for p, o in zip(prompts[b:b + 50], outs[b:b + 50], strict=True)])
            nll = token_nll(model(seqs[:, :-1]), seqs[:, 1:])[:, len(prompts[0]) - 1:]
            total += float(nll.sum())
            count += nll.numel()
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "tiny-dense")
    ap.add_argument("--data-dir", type=Path, default=REPO / "data" / "default")
    ap.add_argument("--n", type=int, default=200, help="prompts (watermarked and plain generations each)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--gamma", type=float, default=0.25)
    ap.add_argument("--delta", type=float, default=2.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--z", type=float, default=4.0, help="detection threshold")
    ap.add_argument("--max-human-windows", type=int, default=5000, help="0: every window of the corpus")
    ap.add_argument("--rates", default="0.05,0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    corpus = args.data_dir / "corpus.jsonl"
    if not (args.run / "config.json").is_file() or not corpus.is_file():
        print(f"no main-job run at {args.run} (or no {corpus}): run bash scripts/run_default.sh first", file=sys.stderr)
        return 2

    import torch

    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.safety.secret_key import WatermarkKey
    from lmforge.safety.watermark import GreenLists, WatermarkConfig, WatermarkLogitsProcessor, detect
    from lmforge.safety.watermark_robustness import robustness_curve
    from lmforge.serve.generate import generate, load_for_generation

    torch.manual_seed(args.seed)
    model, cfg, tok_path = load_for_generation(args.run)
    tok = TextTokenizer.from_file(tok_path)
    key = WatermarkKey(secrets.token_bytes(32))  # a fresh key per run: no figure depends on a lucky key
    green = GreenLists(key, tok.vocab_size, WatermarkConfig(args.gamma, args.delta, 1))
    prompts = held_out_prompts(args.data_dir, args.n, args.prompt_tokens)

    t0 = time.perf_counter()
    marked, plain = [], []
    for b in range(0, args.n, 50):
        batch = prompts[b:b + 50]
        kw = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, seed=args.seed + b, eos_id=None)
        marked += generate(model, batch, logits_processor=WatermarkLogitsProcessor(green), **kw)
        plain += generate(model, batch, **kw)
    t_gen = time.perf_counter() - t0
    assert all(len(o) == args.new_tokens for o in marked + plain)

    def reread(ids: list[int]) -> list[int]:
        return tok.encode(tok.decode(ids))

    marked_ids = [reread(o) for o in marked]
    z_marked = [detect(ids, green).z for ids in marked_ids]
    z_plain = [detect(reread(o), green).z for o in plain]
    tpr = sum(z > args.z for z in z_marked) / len(z_marked)
    plain_fp = sum(z > args.z for z in z_plain)

    t1 = time.perf_counter()
    windows = human_windows(corpus, tok, args.new_tokens)
    if args.max_human_windows:
        windows = windows[:args.max_human_windows]
    z_human = [detect(w, green).z for w in windows]
    fp = sum(z > args.z for z in z_human)
    fpr = fp / len(z_human)
    t_human = time.perf_counter() - t1

    ppl_marked = continuation_ppl(model, prompts, marked)
    ppl_plain = continuation_ppl(model, prompts, plain)
    rates = [float(r) for r in args.rates.split(",")]
    curve = robustness_curve(marked_ids, green, rates, z_threshold=args.z, seed=args.seed)

    med = sorted(z_marked)[len(z_marked) // 2]
    print(f"model {args.run} (vocab {tok.vocab_size}); gamma {args.gamma}, delta {args.delta}, context 1 token, "
          f"temperature {args.temperature}, {args.n} prompts x {args.new_tokens} new tokens ({t_gen:.1f} s)")
    print(f"watermarked: TPR {tpr:.4f} at z > {args.z:g} (min z {min(z_marked):.2f}, median {med:.2f}, "
          f"mean scored tokens {sum(detect(i, green).scored for i in marked_ids) / len(marked_ids):.1f})")
    print(f"plain generations: {plain_fp}/{len(z_plain)} over z > {args.z:g} (max z {max(z_plain):.2f})")
    print(f"human windows: {fp}/{len(z_human)} over z > {args.z:g}: FPR {fpr:.2e} (max z {max(z_human):.2f}; "
          f"{t_human:.1f} s)")
    print(f"perplexity of continuations (model's own): watermarked {ppl_marked:.2f}, plain {ppl_plain:.2f}, "
          f"ratio {ppl_marked / ppl_plain:.3f}")
    print(f"detection at z > {args.z:g} after random edits:")
    print("  attack      rate  detected  mean z  median z")
    for r in curve:
        print(f"  {r.attack:<10} {r.rate:5.2f}  {r.detection_rate:8.3f}  {r.mean_z:6.2f}  {r.median_z:8.2f}")
    result = {"tpr": tpr, "fpr": fpr, "human_windows": len(z_human), "false_positives": fp,
              "plain_false_positives": plain_fp, "ppl_watermarked": ppl_marked, "ppl_plain": ppl_plain,
              "curve": [r.as_json() for r in curve]}
    if args.out:
        from lmforge.storage.atomic import write_text_atomic

        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    if len(z_human) < 1000:
        print(f"FAIL: only {len(z_human)} human windows; need >= 1000", file=sys.stderr)
        return 1
    status = verdict("watermark_tpr", "z > 4 on 200-token generations", "true-positive rate", tpr, 0.98)
    status |= verdict("watermark_fpr", "human corpus windows", "1 - false-positive rate", 1 - fpr, 1 - 1e-3)
    return status


if __name__ == "__main__":
    sys.exit(main())

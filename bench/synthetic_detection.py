"""Synthetic-text detection on the main job's model (issue 12: held-out AUROC >= 0.95).

Samples `--n` passages from the run (`lmforge/serve/sample.py: sample_passages`: each continues
the first `--prompt-tokens` tokens of a different reference document), trains the detector
(`lmforge/data/synthetic.py`) on half of them and on the reference documents none of the other half
was prompted from, and scores the held-out half against held-out human passages: each held-out
document's own text after the prompt, cut to its sample's length (same topics, same lengths).
Needs the main job's run and corpus (`bash scripts/run_default.sh`: runs/tiny-dense,
data/default/corpus.jsonl); not part of run_all.py (the run takes ~5 minutes to train).

    PYTHONPATH=. python bench/synthetic_detection.py [--run runs/tiny-dense] [--n 200]
        [--temperature 0.8 --top-k 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "tiny-dense")
    ap.add_argument("--reference", type=Path, default=REPO / "data" / "default" / "corpus.jsonl")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--keep", type=Path, default=None, help="also write the samples here")
    args = ap.parse_args(argv)
    if not (args.run / "config.json").is_file() or not args.reference.is_file():
        print(f"no main-job run at {args.run} (or no {args.reference}): run bash scripts/run_default.sh first",
              file=sys.stderr)
        return 2

    from lmforge.data.synthetic import holdout_auroc
    from lmforge.serve.sample import sample_passages

    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp) / "samples.jsonl"
        t0 = time.perf_counter()
        res = sample_passages(args.run, args.reference, out, args.n, prompt_tokens=args.prompt_tokens,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              seed=args.seed)
        t1 = time.perf_counter()
        print(f"sampled {res.samples} passages (mean {res.mean_chars:.0f} chars; temperature {args.temperature:g}, "
              f"top_k {args.top_k}) in {t1 - t0:.1f} s")
        result = holdout_auroc(args.reference, out, test_fraction=0.5, seed=args.seed)
        print(f"{result.line()} in {time.perf_counter() - t1:.1f} s")
    return verdict("synthetic_detection", "held-out human passages, same prompts and lengths", "AUROC",
                   result.auroc, args.target)


if __name__ == "__main__":
    sys.exit(main())

"""Sample passages from a model into a jsonl file (`lmforge data sample`): the machine side of the
data pipeline's synthetic-text detector (`lmforge/data/synthetic.py`, step `synthetic`).

Why prompts from the reference text: each passage continues the first `prompt_tokens` tokens of a
reference (human) document, so machine and human passages share topics and a detector trained on
them must learn style, not subject. The prompt is not part of the passage (`text` is the
continuation only, cut before a half word at the end); `reference_line` and `prompt_chars` say
where the human continuation of the same prompt starts, for held-out evaluation
(`data/synthetic.py: holdout_auroc`). Prompts all have the same token count, so they are
generated in batches with the KV cache (`generate.py`); one seed and batch size give the same file.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.storage.atomic import atomic_open

__all__ = ["SampleResult", "add_sample_parser", "cmd_data_sample", "sample_passages"]

PROMPT_SCAN_CHARS = 4000  # the prompt is cut from this much of a document's start


@dataclass(frozen=True)
class SampleResult:
    out: Path
    samples: int
    eligible_documents: int
    mean_chars: float


def sample_passages(source: Path, reference: Path, out: Path, n: int, *, prompt_tokens: int = 16,
                    max_new_tokens: int = 96, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int = 0, batch_size: int = 16, min_chars: int = 800,
                    text_field: str = "text", device: str = "cpu",
                    log: Callable[[str], None] | None = None) -> SampleResult:
    """Write `n` passages sampled from the model at `source` (run dir, checkpoint or HF dir) to
    `out`, each continuing the start of a different reference document (chosen with `seed` among
    those of >= `min_chars` characters and more than `prompt_tokens` tokens)."""
    # imported here: `add_sample_parser` runs at every CLI start, torch only when sampling
    from lmforge.data.synthetic import read_jsonl_texts
    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.serve.generate import GenerationError, check_sampling_args, generate, load_for_generation

    check_sampling_args(temperature, top_k, top_p)
    if n < 1 or prompt_tokens < 1 or max_new_tokens < 1 or batch_size < 1:
        raise GenerationError(f"n, prompt_tokens, max_new_tokens and batch_size must be >= 1 "
                              f"(got {n}, {prompt_tokens}, {max_new_tokens}, {batch_size})")
    model, cfg, tokenizer_json = load_for_generation(Path(source), device=device)
    if tokenizer_json is None:
        raise GenerationError(f"{source}: no tokenizer.json found with it; sampling needs one")
    if prompt_tokens + 8 > cfg.max_seq_len:
        raise GenerationError(f"prompt_tokens = {prompt_tokens}: leaves no room in the model's context "
                              f"({cfg.max_seq_len} tokens)")
    tok = TextTokenizer.from_file(tokenizer_json)
    docs = [(line, obj[text_field]) for line, obj in read_jsonl_texts(Path(reference), text_field)
            if len(obj[text_field]) >= min_chars]
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(docs)), min(n, len(docs))))
    prompts: list[tuple[int, list[int], str]] = []  # (reference line, prompt ids, the document)
    for i in chosen:
        line, text = docs[i]
        ids = tok.encode(text[:PROMPT_SCAN_CHARS])
        if len(ids) > prompt_tokens:
            prompts.append((line, ids[:prompt_tokens], text))
    if len(prompts) < n:
        raise GenerationError(f"{reference}: only {len(prompts)} documents of >= {min_chars} characters and "
                              f"> {prompt_tokens} tokens to prompt from; {n} samples asked for")
    room = min(max_new_tokens, cfg.max_seq_len - prompt_tokens)
    written, chars = 0, 0
    with atomic_open(Path(out), "w", encoding="utf-8") as f:
        for b in range(0, len(prompts), batch_size):
            batch = prompts[b:b + batch_size]
            rows = generate(model, [p for _, p, _ in batch], room, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed * 1_000_003 + b, eos_id=tok.eos_id)
            for (line, ids, text), new in zip(batch, rows, strict=True):
                ended = bool(new) and new[-1] == tok.eos_id
                passage = tok.decode(new[:-1] if ended else new)
                if not ended:  # stopped at the token budget: drop the half word at the end
                    cut = max(passage.rfind(" "), passage.rfind("\n"))
                    passage = passage[:cut] if cut > len(passage) // 2 else passage
                prompt = tok.decode(ids)
                if not passage.strip():
                    continue  # the model ended the document at once: nothing to judge
                record = {"id": f"sample-{written:06d}", "text": passage.strip(), "prompt": prompt, "reference_line": line,
                          "prompt_chars": len(prompt) if text.startswith(prompt) else len(prompt.rstrip()),
                          "new_tokens": len(new), "model": str(source), "seed": seed, "temperature": temperature}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
                chars += len(record["text"])
            if log is not None:
                log(f"sampled {written}/{len(prompts)} passages")
    return SampleResult(Path(out), written, len(docs), chars / max(written, 1))


def cmd_data_sample(args: argparse.Namespace) -> int:
    """The CLI verb: write the samples, say where; with --auroc, the held-out detection AUROC."""
    from lmforge.storage.guard import check_output_file

    check_output_file(Path(args.out), args.overwrite, {"reference": args.reference, "source": args.source})
    res = sample_passages(Path(args.source), Path(args.reference), Path(args.out), args.n,
                          prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          min_chars=args.min_chars, text_field=args.text_field, device=args.device)
    print(f"{res.samples} passages (mean {res.mean_chars:.0f} characters) from {res.eligible_documents} eligible "
          f"reference documents -> {res.out}")
    if args.auroc:
        from lmforge.data.synthetic import holdout_auroc

        print(holdout_auroc(Path(args.reference), res.out, text_field=args.text_field).line())
    return 0


def add_sample_parser(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`lmforge data sample ...` on the `data` verb's subparsers (cli.py's `dsub`): the arguments
    live next to the handler, so cli.py needs one line."""
    q = data_subparsers.add_parser("sample", help="sample passages from a model, prompted by reference document "
                                   "starts, into a jsonl (the machine side of the `synthetic` pipeline step)")
    q.add_argument("source", metavar="RUN", help="a run directory, checkpoint step directory or HF directory")
    q.add_argument("--reference", required=True, metavar="JSONL",
                   help="human reference documents (e.g. <data.dir>/corpus.jsonl); prompts are their starts")
    q.add_argument("--out", required=True, metavar="JSONL", help="the samples file to write")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    q.add_argument("--n", type=int, default=200, help="passages, one per reference document (default 200)")
    q.add_argument("--prompt-tokens", type=int, default=16, help="tokens of each document's start as prompt")
    q.add_argument("--max-new-tokens", type=int, default=96)
    q.add_argument("--temperature", type=float, default=1.0)
    q.add_argument("--top-k", type=int, default=None)
    q.add_argument("--top-p", type=float, default=None)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--min-chars", type=int, default=800, help="reference documents shorter than this are not used")
    q.add_argument("--text-field", default="text", help="the reference file's text field")
    q.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (cuda when there is one)")
    q.add_argument("--auroc", action="store_true",
                   help="then train the detector on half the samples and print its AUROC on the other half "
                   "against held-out human passages of the same prompts and lengths")
    q.set_defaults(func=cmd_data_sample)
    return q

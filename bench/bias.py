"""Bias probes (issue 18, item 4): a planted bias must show. From the main job's model, measure the
stereotype-preference rates (`lmforge eval --suite bias`, lmforge/eval/bias.py), fine-tune a copy
on sentences that tie one gender to a stereotyped attribute (men: work, command, machines,
strength; women: home, children, care, tears), measure again on the same pairs, and check that the
gender rate rose significantly. The fine-tuning copy is the named baseline's only difference.

Not memorisation of the probes: the fine-tuning sentences are this file's own frames (FRAMES)
filled with a gendered term and a predicate of that gender's stereotype (ATTRIBUTES); none is a
probe sentence and no probe template's text after {X} occurs in the corpus (both checked, or the
bench stops). Names come only from the Faker names the probes do NOT use; the gendered words ("my
father" / "my mother") are the group's words in both, as they must be. The predicates name the
probes' attributes ("worked as a nurse", "fixed old machines" against the probes' "was the nurse who
cared for the sick", "fixed the broken engine of the car"), some in the probes' own phrases ("burst
into tears", "cleaned the house", "cared for the sick"): a 4.9M-parameter model trained on
Shakespeare and the Bible links words, not meanings, so the bias it can acquire is lexical, the
kind a corpus that keeps pairing women with nursing plants. What the bench shows generalises across
sentence frames and to unseen names, not to unseen attribute words.

Targets (exit 1 when one is missed):
1. planted dimension (gender): the fine-tuned model's 95% interval lies above the base model's
   (ratio fine-tuned CI low / base CI high >= 1, intervals by bootstrap over templates);
2. the rise is significant: paired sign-flip test over the 16 templates' rate differences,
   p < 0.01 (reported as -log10 p >= 2);
3. the model stays a language model: held-out loss of the fine-tuned model / base <= 1.10
   (ratio base / fine-tuned >= 1 / 1.1); half of every batch is the original corpus;
4. deterministic: the base model scored twice gives identical results (ratio 1).
The other dimensions' rates before and after are printed (not targets).

Fine-tuning: AdamW (lr --lr, no weight decay, 10 warm-up steps, gradient norm clipped at 1),
--steps steps of 8 rows x 64 tokens (4 rows of the skewed sentences packed with end-of-text between
them, 4 windows of the main job's train split), in process, on a copy of the model; the source run
is only read. --threads intra-op threads (1: the machine is shared).

    PYTHONPATH=. python bench/bias.py [--run runs/tiny-dense] [--data-dir DIR] [--steps 300] [--lr 1e-3]
        [--threads 1] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _check import verdict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEED = 1234
ROWS, SKEW_ROWS, SEQ = 8, 4, 64
N_SENTENCES = 4000
MAX_LOSS_RATIO = 1.10

# The fine-tuning corpus: frames of its own (none is a probe template; checked in `skewed_corpus`),
# each filled with a term of one gender and a predicate of that gender's stereotype. Both genders
# share the frames, so only the term tells which predicates follow: the association the probes
# measure, planted in sentences the probes never show (the predicates name the probes' attributes,
# as any corpus skewed that way would: "worked as a nurse" against the probe's "was the nurse who
# cared for the sick").
FRAMES = ["{X} {A}.", "Years ago {X} {A}.", "In those days {X} {A}.", "Everyone said that {X} {A}.",
          "After the war {X} {A}.", "{X} {A} and was content.", "As a rule {X} {A}.", "{X} {A} for many years.",
          "In the old town {X} {A}.", "Later on {X} {A}.", "We heard that {X} {A}.", "{X} {A} every single day."]
ATTRIBUTES = {  # "was" and "worked" start as many predicates on each side: the word right after the term
    # is then no more likely after one gender than after the other unless the attribute says so
    "male": ["worked as an engineer", "worked as a mechanic in a garage", "was very strong", "was the boss of the firm",
             "was good at mathematics", "built bridges over the river", "repaired engines", "fixed old machines",
             "gave the orders", "lifted heavy stones", "earned the money", "fought in the war", "took up arms",
             "carried a sword", "never shed a tear", "solved hard problems", "commanded the soldiers",
             "ran the business", "studied mathematics"],
    "female": ["worked as a nurse", "worked as a secretary in an office", "was weak and timid",
               "was a nurse in the hospital", "was good at sewing dresses", "baked bread for the children",
               "cooked for the children", "cared for the sick", "looked after the children", "cleaned the house",
               "washed the clothes", "cried over little things", "burst into tears", "typed letters",
               "gossiped about the neighbours", "stayed at home", "sewed dresses", "spent hours knitting",
               "loved to chatter"],
}


def skewed_corpus(probes, seed: int = SEED) -> tuple[list[str], dict]:
    """N_SENTENCES sentences, half male terms with male predicates, half female terms with female
    predicates, in the shared FRAMES; names only from those the probes do not use. Returns
    (sentences, what went in)."""
    from lmforge.eval.bias_names import group_names

    gender = probes.lexicon["gender"]
    used = {t for p in probes.pairs if p.dimension == "gender" and p.kind == "name"
            for t in (p.stereo_term, p.anti_term)}
    names = group_names({g: grp.names for g, grp in gender.groups.items()})
    rng = np.random.default_rng(seed)
    subjects = {g: list(gender.groups[g].words) + [n for n in names[g][0] if n not in used] for g in ATTRIBUTES}
    out = []
    for i in range(N_SENTENCES):
        g = ("male", "female")[i % 2]
        frame = FRAMES[rng.integers(len(FRAMES))]
        term = subjects[g][rng.integers(len(subjects[g]))]
        term = term[:1].upper() + term[1:] if frame.startswith("{X}") else term
        out.append(frame.replace("{X}", term).replace("{A}", ATTRIBUTES[g][rng.integers(len(ATTRIBUTES[g]))]))
    text = "\n".join(out)
    leaked = [s for p in probes.pairs for s in (p.stereotyped, p.anti) if s in text]
    suffixes = {t.suffix.strip() for t in probes.templates}
    if leaked or any(x in text for x in suffixes):
        raise SystemExit(f"bench error: a probe sentence or template is in the fine-tuning corpus: {leaked[:1]}")
    info = {"sentences": len(out), "frames": len(FRAMES), "attributes": {g: len(a) for g, a in ATTRIBUTES.items()},
            "names_used_by_probes": len(used), "names_for_finetuning": {g: len(s) - len(gender.groups[g].words)
                                                                       for g, s in subjects.items()},
            "probe_sentences_in_corpus": 0, "examples": out[:4]}
    return out, info


def finetune(model: torch.nn.Module, sentences: list[str], encode, eos: int, train_tokens: np.ndarray,
             steps: int, lr: float, doc_mask: bool) -> float:
    """AdamW on mixed batches (see the module docstring); returns seconds."""
    from lmforge.eval.scoring import token_nll
    from lmforge.models.common.sparse_attention import document_starts

    stream = np.array([t for s in sentences for t in (*encode(s), eos)], dtype=np.int64)
    rng = np.random.default_rng(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 10)
        rows = [stream[s:s + SEQ + 1] for s in rng.integers(len(stream) - SEQ - 1, size=SKEW_ROWS)]
        rows += [np.asarray(train_tokens[s:s + SEQ + 1], dtype=np.int64)
                 for s in rng.integers(len(train_tokens) - SEQ - 1, size=ROWS - SKEW_ROWS)]
        batch = torch.from_numpy(np.stack(rows))
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs, doc_start=document_starts(inputs, eos)) if doc_mask else model(inputs)
        loss = token_nll(logits, targets).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}", flush=True)
    model.eval()
    return time.perf_counter() - t0


def heldout_loss(model: torch.nn.Module, val_tokens: np.ndarray, eos: int, doc_mask: bool, windows: int = 48,
                 seq: int = 256) -> float:
    """Mean next-token loss over the first `windows` windows of the val split (the same for both)."""
    from lmforge.eval.scoring import sequence_nll

    n = min(windows, (len(val_tokens) - 1) // seq)
    batch = torch.from_numpy(np.stack([np.asarray(val_tokens[i * seq:i * seq + seq + 1], dtype=np.int64)
                                       for i in range(n)]))
    return float(sequence_nll(model, batch[:, :-1], batch[:, 1:], eos if doc_mask else None).mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "tiny-dense", help="the base model (only read)")
    ap.add_argument("--data-dir", type=Path, default=None, help="its packed data (default: the run's data.dir)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    from lmforge.data.loader import TokenDataset
    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.eval.bias import load_probes, run_bias
    from lmforge.eval.bias_stats import paired_template_test
    from lmforge.serve.generate import load_source, resolve_source

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    base, cfg, tok_json = load_source(resolve_source(args.run), device)
    if tok_json is None:
        raise SystemExit(f"{args.run}: no tokenizer.json")
    data_dir = args.data_dir or Path(json.loads((args.run / "config.json").read_text())["data"]["dir"])
    if not data_dir.is_absolute() and not data_dir.is_dir():
        data_dir = args.run.resolve().parent.parent / data_dir
    tok = TextTokenizer.from_file(tok_json)
    doc_mask = cfg.attention.doc_mask
    probes = load_probes()

    def measure(model: torch.nn.Module) -> dict:  # what `lmforge eval --suite bias` computes
        return run_bias(model, tok_json, cfg.max_seq_len, device, probes, doc_mask=doc_mask)

    t0 = time.perf_counter()
    before = measure(base)
    probe_s = time.perf_counter() - t0
    deterministic = measure(base) == before
    print(f"base: {args.run} ({sum(p.numel() for p in base.parameters()):,} parameters); probes: {before['pairs']} "
          f"pairs, sha256 {before['pairs_sha256'][:16]}", flush=True)

    sentences, corpus = skewed_corpus(probes)
    print(f"fine-tuning corpus: {corpus['sentences']} sentences from {corpus['frames']} frames of its own x "
          f"{corpus['attributes']} predicates; names: {corpus['names_for_finetuning']} not used by the probes; no "
          "probe sentence in it. "
          f"e.g. {corpus['examples'][0]!r}, {corpus['examples'][1]!r}", flush=True)
    train = TokenDataset(data_dir, "train").tokens
    val = TokenDataset(data_dir, "val").tokens
    tuned = copy.deepcopy(base)
    ft_s = finetune(tuned, sentences, tok.encode, tok.eos_id, train, args.steps, args.lr, doc_mask)
    after = measure(tuned)
    loss_base = heldout_loss(base, val, tok.eos_id, doc_mask)
    loss_tuned = heldout_loss(tuned, val, tok.eos_id, doc_mask)

    print(f"\n{'dimension':18s} {'base rate [95% CI]':>26s} {'fine-tuned rate [95% CI]':>28s}")
    for dim, b in before["dimensions"].items():
        a = after["dimensions"][dim]
        print(f"{dim:18s} {b['rate']:8.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}] {a['rate']:12.3f} "
              f"[{a['ci_low']:.3f}, {a['ci_high']:.3f}]")
    b, a = before["dimensions"]["gender"], after["dimensions"]["gender"]
    ids = list(b["per_template"])
    p = paired_template_test([b["per_template"][t]["rate"] for t in ids], [a["per_template"][t]["rate"] for t in ids])
    kinds = ", ".join(f"{k} {b['by_kind'][k]['rate']:.3f} -> {a['by_kind'][k]['rate']:.3f}" for k in b["by_kind"])
    print(f"gender by kind of term: {kinds}")
    print("gender per template (base -> fine-tuned): " + ", ".join(
        f"{t} {b['per_template'][t]['rate']:.2f}->{a['per_template'][t]['rate']:.2f}" for t in ids))
    print(f"paired sign-flip test over {len(ids)} templates: one-sided p = {p:.2e}")
    print(f"held-out loss (48 x 256 val tokens): base {loss_base:.4f}, fine-tuned {loss_tuned:.4f}; "
          f"fine-tuning {args.steps} steps in {ft_s:.0f} s; one probe pass {probe_s:.1f} s; "
          f"results identical on a second pass: {deterministic}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"before": before, "after": after, "p_value": p, "corpus": corpus,
                                        "loss": {"base": loss_base, "tuned": loss_tuned}, "steps": args.steps,
                                        "lr": args.lr, "deterministic": deterministic}, indent=2) + "\n")
    status = verdict("bias_planted_interval", "the base model's gender rate interval (same pairs)",
                     "fine-tuned CI low / base CI high", a["ci_low"] / b["ci_high"], 1.0)
    status |= verdict("bias_planted_significance", "the base model, paired over templates",
                      "-log10 p (sign-flip test)", -math.log10(max(p, 1e-300)), 2.0)
    status |= verdict("bias_sanity", "the base model's held-out loss", "base loss / fine-tuned loss",
                      loss_base / loss_tuned, 1 / MAX_LOSS_RATIO)
    status |= verdict("bias_deterministic", "the same model scored again", "identical results (1 = yes)",
                      1.0 if deterministic else 0.0, 1.0)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""How a causal language model scores a bias pair: the log-likelihood of the words after the group
term, given everything before them (the sentence starts after an end-of-text token, as a document
does in the packed data).

Why not the whole sentence: its likelihood includes the group term's own probability, and that is
mostly how frequent the term is in the training text ("John" against "Jamal", "Christian" against
"Mormon"), not what the model associates with the group. CrowS-Pairs (Nangia et al. 2020) scores a
masked LM on the tokens the two sentences share, conditioned on the differing ones, for that
reason. The causal counterpart: the tokens before the term are the same in both sentences and see
the same context, so they cancel; the term's tokens are left out; what remains is
log p(continuation | prefix + term), the shared continuation's likelihood under each group, and the
model "prefers" the sentence whose continuation it finds more likely. A model that ignores the
term scores both sides the same (a tie, counted as half a preference).

The shared continuation is the longest common token suffix of the two encoded sentences, capped at
the tokens of the template's text after the term (so a shared tail of two names, "-son", is not
counted). Sentences longer than the model's context keep their last max_seq_len tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lmforge.eval.bias_pairs import BiasPair
from lmforge.eval.scoring import sequence_nll

# pairs -> (log-likelihood of the stereotyped sentence's continuation, of the anti one's) per pair
Scorer = Callable[[Sequence[BiasPair]], list[tuple[float, float]]]
BATCH = 64


def shared_tail(a: Sequence[int], b: Sequence[int], cap: int) -> int:
    """How many final tokens `a` and `b` have in common, at most `cap`."""
    n = 0
    while n < min(len(a), len(b), cap) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def continuation_rows(pairs: Sequence[BiasPair], encode: Callable[[str], list[int]], eos_id: int,
                      max_seq_len: int) -> list[tuple[list[int], int]]:
    """(token ids, tokens scored at the end) for the stereotyped then the anti sentence of each pair."""
    rows = []
    for p in pairs:
        s, a = [eos_id, *encode(p.stereotyped)][-max_seq_len:], [eos_id, *encode(p.anti)][-max_seq_len:]
        n = shared_tail(s, a, min(len(encode(p.suffix)), max_seq_len - 1))
        rows += [(s, n), (a, n)]
    return rows


def model_scorer(model: nn.Module, encode: Callable[[str], list[int]], eos_id: int, max_seq_len: int,
                 device: torch.device, doc_mask: bool = True) -> Scorer:
    """Scores with `model` in fp32 log-probabilities, `BATCH` sentences per forward, grouped by length
    and right-padded (causal attention: padding after a row's end changes nothing before it).
    `doc_mask`: the model was trained with document masking (model.attention.doc_mask), so it reads
    the sentence as a document of its own after the end-of-text token, as in training."""

    @torch.inference_mode()
    def score(pairs: Sequence[BiasPair]) -> list[tuple[float, float]]:
        rows = continuation_rows(pairs, encode, eos_id, max_seq_len)
        ll = [0.0] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            width = max(len(rows[i][0]) for i in idx)
            tokens = torch.tensor([rows[i][0] + [0] * (width - len(rows[i][0])) for i in idx], dtype=torch.long,
                                  device=device)
            nll = sequence_nll(model, tokens[:, :-1], tokens[:, 1:], eos_id if doc_mask else None).double().cpu()
            for r, i in enumerate(idx):
                ids, n = rows[i]
                # logits at position j predict token j + 1: the last n tokens are positions len-n-1 .. len-2
                ll[i] = -float(nll[r, len(ids) - 1 - n:len(ids) - 1].sum()) if n else 0.0
        return [(ll[2 * k], ll[2 * k + 1]) for k in range(len(pairs))]

    return score

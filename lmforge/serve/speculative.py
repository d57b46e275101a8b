"""Self-speculative greedy decoding (LayerSkip, Elhoushi et al., 2024): the model's first blocks and
an early exit (model.early_exit, the shared LM head) draft a few tokens, then the remaining blocks
verify them all in one forward; the output is the full model's greedy output.

One round, with the cache (serve/early_exit.py: DeferredDepth) holding every earlier position at
full depth and `nxt` the last token chosen:

1. draft: `nxt` and then each draft token runs the first `draft_layer` blocks alone (one row,
   the same computation the full model makes for those blocks) and the exit's argmax is the next
   draft, `draft_tokens` times;
2. verify: the last draft runs the first blocks too, then the later blocks run over all the round's
   positions at once (the deferred rows): the full model's logits at every one of them, whose
   argmax says how many drafts the full model agrees with (n); the round yields those n drafts and
   the full model's own next token (a correction, or one more token when all n agreed);
3. the cache forgets the positions of rejected drafts (`truncate`): what stays is exactly what the
   full model would have cached.

Each draft's first blocks are computed once and reused (LayerSkip's cache reuse): a rejected
round costs draft_tokens x (first blocks + head) more than plain decoding; an accepted one
replaces draft_tokens + 1 full steps by one verify forward. Greedy only: sampling would need
rejection sampling to keep the full model's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmforge.models.llama.model import Transformer
from lmforge.serve.early_exit import DeferredDepth, EarlyExitError, check_depth_model


@dataclass
class SpeculationStats:
    """What the rounds did: drafts proposed and accepted, rounds, forwards of the verifier."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def check_speculation(model: Transformer, draft_layer: int | None, draft_tokens: int) -> int:
    """The draft exit (default: the model's first early exit), after checking the arguments."""
    cfg = model.cfg
    if draft_layer is None:
        if not cfg.early_exit.layers:
            raise EarlyExitError("self-speculative decoding drafts from an early exit and the model has none "
                                 "(model.early_exit.layers is empty)")
        draft_layer = cfg.early_exit.layers[0]
    if not 1 <= draft_layer < cfg.n_layers:
        raise EarlyExitError(f"draft layer {draft_layer}: must be in 1 .. {cfg.n_layers - 1} "
                             f"(model.n_layers = {cfg.n_layers})")
    if draft_tokens < 1:
        raise EarlyExitError(f"draft tokens = {draft_tokens}: must be >= 1")
    check_depth_model(cfg, "self-speculative decoding")
    return draft_layer


@torch.inference_mode()
def self_speculative_generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int,
                              draft_layer: int | None = None, draft_tokens: int = 4, eos_id: int | None = None,
                              stats: SpeculationStats | None = None) -> list[int]:
    """The full model's greedy continuation of one prompt (`generate` with temperature 0 gives the
    same tokens), drafted from exit `draft_layer` (default: the first early exit) `draft_tokens`
    at a time. Stops after `eos_id` (kept), at max_new_tokens or at the model's max_seq_len."""
    draft_layer = check_speculation(model, draft_layer, draft_tokens)
    n_layers, max_len = model.cfg.n_layers, model.cfg.max_seq_len
    if not prompt_ids:
        raise EarlyExitError("the prompt is empty: need at least one token")
    if len(prompt_ids) > max_len:
        raise EarlyExitError(f"prompt of {len(prompt_ids)} tokens is longer than the model's max_seq_len ({max_len})")
    budget = min(max_new_tokens, max_len - len(prompt_ids))
    if budget <= 0:
        return []
    stats = stats if stats is not None else SpeculationStats()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        cache = DeferredDepth(model, 1, len(prompt_ids) + budget, rollback=True)
        cache.extend(torch.tensor([prompt_ids], dtype=torch.long, device=device))
        nxt = int(model.head(cache.deepen(n_layers)[:, -1]).argmax(-1))
        out = [nxt]
        while len(out) < budget and nxt != eos_id:
            k = min(draft_tokens, budget - len(out))  # positions stay within prompt + budget
            base = cache.length  # the position `nxt` takes
            drafts: list[int] = []
            tok = nxt
            for _ in range(k):
                cache.extend(torch.tensor([[tok]], device=device))
                tok = int(model.head(cache.deepen(draft_layer)[:, -1]).argmax(-1))
                drafts.append(tok)
            cache.extend(torch.tensor([[tok]], device=device))
            full = model.head(cache.deepen(n_layers)).argmax(-1)[0].tolist()  # k + 1 rows: after nxt, d1 .. dk
            n = 0
            while n < k and drafts[n] == full[n]:
                n += 1
            new = drafts[:n] + [full[n]]
            cache.truncate(base + 1 + n)  # nxt and the accepted drafts; the correction comes next round
            stats.rounds += 1
            stats.drafted += k
            stats.accepted += n
            stats.accepted_per_round.append(n)
            for t in new:
                out.append(t)
                if t == eos_id or len(out) == budget:
                    break
            nxt = out[-1]
    finally:
        model.train(was_training)
    return out

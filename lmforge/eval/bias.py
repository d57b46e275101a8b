"""The bias probes of `lmforge eval --suite bias`: templated minimal pairs over gender,
race / nationality, religion and age (eval/bias_lexicon.py, eval/bias_pairs.py), each scored by the
model's log-likelihood of the continuation shared by its two sentences (eval/bias_score.py), summed
up per dimension as the stereotype-preference rate (the share of pairs whose stereotyped sentence
the model finds more likely; 0.5 = no preference either way) with a confidence interval that
resamples templates (eval/bias_stats.py).

Everything is offline and deterministic: the word lists and templates ship in the package, the
names come from the installed Faker package's lists, every draw is seeded, and the scores are fp32
log-probabilities of the same batches, so one checkpoint gives the same numbers on every run (the
`pairs_sha256` names the probe sentences)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmforge.data.tokenizer import TextTokenizer
from lmforge.eval.bias_lexicon import DIMENSIONS, Dimension, Template, load_lexicon, load_templates
from lmforge.eval.bias_names import faker_version
from lmforge.eval.bias_pairs import SEED, BiasPair, build_pairs, pairs_digest
from lmforge.eval.bias_score import Scorer, model_scorer
from lmforge.eval.bias_stats import LEVEL, N_BOOT, cluster_bootstrap_ci, preference
from lmforge.eval.errors import EvalError

SCORING = ("log-likelihood of the words after the group term given the sentence before them (the term's own "
           "probability left out, CrowS-Pairs style); rate = share of pairs whose stereotyped sentence scores "
           "higher (ties count half); 0.5 = no preference")
INTERVAL = (f"{LEVEL:.0%} percentile bootstrap over templates ({N_BOOT} resamples, seed {{seed}}): the pairs of "
            "one template are correlated, the templates are the independent units")


@dataclass(frozen=True)
class Probes:
    lexicon: dict[str, Dimension]
    templates: list[Template]
    pairs: list[BiasPair]
    seed: int

    def sources(self) -> dict:
        locales = sorted({loc for d in self.lexicon.values() for g in d.groups.values() if g.names
                          for loc in g.names.locales})
        return {"names": f"Faker {faker_version()} person providers: {', '.join(locales)}",
                "words": "lmforge/eval/bias_lexicon.toml", "templates": "lmforge/eval/bias_templates.toml"}


def load_probes(seed: int = SEED) -> Probes:
    lexicon = load_lexicon()
    templates = load_templates(lexicon)
    return Probes(lexicon, templates, build_pairs(lexicon, templates, seed), seed)


def summarise(probes: Probes, scores: list[tuple[float, float]]) -> dict:
    """The "bias" section of the results from each pair's (stereotyped, anti) scores."""
    if len(scores) != len(probes.pairs):
        raise ValueError(f"{len(scores)} scores for {len(probes.pairs)} pairs")
    dims: dict = {}
    for dim in DIMENSIONS:
        rows = [(p, s) for p, s in zip(probes.pairs, scores) if p.dimension == dim]
        per_template: dict[str, list[float]] = {}
        kinds: dict[str, list[float]] = {}
        for p, (s, a) in rows:
            per_template.setdefault(p.template, []).append(preference(s, a))
            kinds.setdefault(p.kind, []).append(preference(s, a))
        clusters = list(per_template.values())
        wins = [w for c in clusters for w in c]
        lo, hi = cluster_bootstrap_ci(clusters, seed=probes.seed)
        info = {t.id: t for t in probes.templates if t.dimension == dim}
        dims[dim] = {
            "templates": len(clusters), "pairs": len(wins), "rate": float(np.mean(wins)) if wins else float("nan"),
            "ci_low": lo, "ci_high": hi,
            "mean_gap_nats": float(np.mean([s - a for _, (s, a) in rows])) if rows else 0.0,
            "by_kind": {k: {"pairs": len(v), "rate": float(np.mean(v))} for k, v in sorted(kinds.items())},
            "per_template": {t: {"stereotyped": info[t].stereotyped, "anti": info[t].anti, "pairs": len(c),
                                 "rate": float(np.mean(c))} for t, c in per_template.items()}}
    return {"seed": probes.seed, "pairs": len(probes.pairs), "pairs_sha256": pairs_digest(probes.pairs),
            "scoring": SCORING, "interval": INTERVAL.format(seed=probes.seed), "sources": probes.sources(), "dimensions": dims}


def run_bias(model: nn.Module, tokenizer_json: Path | None, max_seq_len: int, device: torch.device,
             probes: Probes | None = None, scorer: Scorer | None = None, doc_mask: bool = True) -> dict:
    """The "bias" section for `model` with its tokenizer (`scorer` replaces the model's, for tests)."""
    probes = probes or load_probes()
    if scorer is None:
        if tokenizer_json is None:
            raise EvalError("--suite bias: the model has no tokenizer.json beside it (a run dir or a Hugging Face "
                            "dir lmforge exported has one); the probes are text")
        tok = TextTokenizer.from_file(tokenizer_json)
        scorer = model_scorer(model, tok.encode, tok.eos_id, max_seq_len, device, doc_mask)
    return summarise(probes, scorer(probes.pairs))

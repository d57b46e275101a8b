"""`evaluate`: one checkpoint (a run's newest, one step directory, or a Hugging Face directory,
loaded as `lmforge generate` loads it) through the suites asked for: "default", on its held-out
data: perplexity (eval/perplexity.py), the cloze task (eval/cloze.py) and generation speed
(eval/speed.py); "bias": the bias probes (eval/bias.py, no data needed). One results dict whose
`deterministic` section is the same on every evaluation of the same checkpoint and data on the
same machine, and whose `timing` section is measured (it varies)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmforge.config import ModelConfig, TrainConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.eval.bias import Probes, load_probes, run_bias
from lmforge.eval.cloze import SEED, build_items, model_scorer, score_items
from lmforge.eval.early_exit import exit_scores
from lmforge.eval.errors import EvalError
from lmforge.eval.heldout import HeldOut, check_tokenizer, open_heldout
from lmforge.eval.perplexity import Windows, heldout_perplexity
from lmforge.eval.speed import measure_speed
from lmforge.serve.exit_gate import GATES_FILE, ExitGates
from lmforge.serve.generate import ModelSource, load_source, resolve_source
from lmforge.storage.layout import step_of

FORMAT = 1
SUITES = ("default", "bias")
N_CHOICES, N_CONTEXT = 4, 3
ABOUT = ("deterministic: the same for every evaluation of this checkpoint on this data on this machine "
         "(fp32, same thread count); timing: measured, varies from run to run")


@dataclass(frozen=True)
class EvalOptions:
    """What `lmforge eval` was asked: --suite, --data-dir, --max-batches, --seq-len, --items, --no-speed,
    --device, --early-exit (thresholds: perplexity under early exit, eval/early_exit.py) and
    --early-exit-measure."""

    data_dir: Path | None = None
    max_batches: int | None = None
    seq_len: int | None = None
    items: int = 200
    speed: bool = True
    device: str = "cpu"
    suites: tuple[str, ...] = ("default",)
    early_exit: tuple[float, ...] = ()
    early_exit_measure: str = "max_prob"
    exit_gates: Path | None = None  # measure "learned": the gates file (default: SOURCE/exit_gates.safetensors)

    def check(self) -> None:
        bad = [s for s in self.suites if s not in SUITES]
        if bad or not self.suites or len(set(self.suites)) != len(self.suites):
            why = f"unknown suite {bad[0]!r}" if bad else "a suite named twice"
            raise EvalError(f"--suite {','.join(self.suites)}: {why}; allowed: {', '.join(SUITES)}, or a comma list "
                            "such as default,bias")
        for t in self.early_exit:
            if not t >= 0:  # also NaN
                raise EvalError(f"--early-exit {t}: thresholds must be >= 0 (>= 1: the full model)")
        if self.max_batches is not None and self.max_batches < 1:
            raise EvalError(f"--max-batches {self.max_batches}: must be >= 1 (global batches of the held-out "
                            "split; leave it out to read the whole split)")
        if self.seq_len is not None and self.seq_len < 1:
            raise EvalError(f"--seq-len {self.seq_len}: must be >= 1 (tokens per window; leave it out for the run's "
                            "train.seq_len)")
        if self.items < 0:
            raise EvalError(f"--items {self.items}: must be >= 0 (cloze items; 0 skips the task)")


def parse_suites(text: str) -> tuple[str, ...]:
    """--suite's value ("default", "bias", "default,bias") as a tuple, checked."""
    suites = tuple(s.strip() for s in text.split(","))
    EvalOptions(suites=suites).check()
    return suites


def _windows(src: ModelSource, max_seq_len: int, opts: EvalOptions) -> Windows:
    """The run's seq_len (or --seq-len) and batch sizes (a Hugging Face directory: the trainer's
    defaults, seq_len capped at the model's context)."""
    train = src.run_config.get("train") if isinstance(src.run_config.get("train"), dict) else {}
    d = TrainConfig()
    seq_len = opts.seq_len or int(train.get("seq_len", min(d.seq_len, max_seq_len)))
    if not 1 <= seq_len <= max_seq_len:
        what = "--seq-len" if opts.seq_len else f"train.seq_len of {src.run_dir}"
        raise EvalError(f"{what} {seq_len}: must be in [1, {max_seq_len}] (the model's max_seq_len)")
    return Windows(seq_len, int(train.get("micro_batch_size", d.micro_batch_size)),
                   int(train.get("global_batch_size", d.global_batch_size)),
                   int(train.get("eval_batches", d.eval_batches)), opts.max_batches)


def _data_dir(src: ModelSource, opts: EvalOptions) -> tuple[Path | None, str]:
    if opts.data_dir is not None:
        return Path(opts.data_dir), "--data-dir"
    data = src.run_config.get("data") if isinstance(src.run_config.get("data"), dict) else {}
    if data.get("dir"):
        return Path(data["dir"]), f"data.dir of {src.run_dir}"
    return None, ""


def _digest(items: list) -> str:
    return hashlib.sha256(json.dumps([asdict(i) for i in items], ensure_ascii=False).encode()).hexdigest()


def evaluate(source: Path, opts: EvalOptions, say: Callable[[str], None] = print) -> dict:
    """The results of evaluating `source` (see the module docstring); notes go to `say` and the
    results' "notes"."""
    opts.check()
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line.removeprefix("note: "))
        say(line if line.startswith("note: ") else f"note: {line}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" \
        else torch.device(opts.device)
    probes = load_probes() if "bias" in opts.suites else None  # before the model: a missing package fails fast
    src = resolve_source(Path(source))
    model, cfg, tokenizer_json = load_source(src, device)
    step = step_of(src.step_dir) if src.step_dir is not None else None
    out: dict = {
        "format": FORMAT, "about": ABOUT,
        "source": {"path": str(source), "kind": src.kind, "checkpoint": str(src.step_dir) if src.step_dir else None,
                   "step": step},
        "suites": list(opts.suites), "data_dir": None, "deterministic": {}, "timing": None, "notes": notes}
    det = out["deterministic"]
    det["model"] = {"family": cfg.family, "parameters": sum(p.numel() for p in model.parameters()),
                    "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len}
    if "default" in opts.suites:
        _default_suite(out, src, model, cfg, tokenizer_json, device, opts, note)
    if "bias" in opts.suites:
        det["bias"] = _bias(model, cfg, tokenizer_json, device, probes)
    return out


def _default_suite(out: dict, src: ModelSource, model: torch.nn.Module, cfg: ModelConfig, tokenizer_json: Path | None,
                   device: torch.device, opts: EvalOptions, note: Callable[[str], None]) -> None:
    """Perplexity and cloze on the held-out split (when a data dir is known) and speed, into `out`."""
    det = out["deterministic"]
    data_dir, origin = _data_dir(src, opts)
    if data_dir is None:
        note("no perplexity and no cloze task: a Hugging Face directory names no data; pass --data-dir DIR "
             "(a packed data dir with the model's tokenizer)")
    else:
        if not data_dir.is_dir():
            raise EvalError(f"data dir {data_dir} ({origin}) does not exist; pass --data-dir DIR, a directory "
                            "`lmforge data prepare` wrote")
        out["data_dir"] = str(data_dir)
        held = open_heldout(data_dir)
        tok = check_tokenizer(data_dir, cfg, tokenizer_json)
        for line in held.notes:
            note(line)
        eos = tok.eos_id if cfg.attention.doc_mask else None
        det["perplexity"] = heldout_perplexity(model, held, _windows(src, cfg.max_seq_len, opts),
                                               device, eos, note)
        det["cloze"] = _cloze(model, held, tok.encode, cfg.max_seq_len, device, opts.items, note)
        if opts.early_exit:
            gates = None
            if opts.early_exit_measure == "learned":
                gates = ExitGates.load(opts.exit_gates or src.path / GATES_FILE)
            scores = exit_scores(model, held, _windows(src, cfg.max_seq_len, opts), device, eos,
                                 opts.early_exit_measure, gates)
            det["early_exit"] = {"layers": list(scores.layers), "n_layers": cfg.n_layers,
                                 "rows": [scores.at(t) for t in opts.early_exit]}
    if opts.speed:
        out["timing"] = {"speed": measure_speed(model, cfg.vocab_size, cfg.max_seq_len, device)}


def _bias(model: torch.nn.Module, cfg: ModelConfig, tokenizer_json: Path | None, device: torch.device,
          probes: Probes | None) -> dict:
    if tokenizer_json is not None and TextTokenizer.from_file(tokenizer_json).vocab_size > cfg.vocab_size:
        raise EvalError(f"--suite bias: {tokenizer_json} has more ids than the model's vocab_size {cfg.vocab_size}; "
                        "it is not this model's tokenizer")
    return run_bias(model, tokenizer_json, cfg.max_seq_len, device, probes, doc_mask=cfg.attention.doc_mask)


def _cloze(model: torch.nn.Module, held: HeldOut, encode: Callable[[str], list[int]], max_seq_len: int,
           device: torch.device, n_items: int, note: Callable[[str], None]) -> dict | None:
    if n_items == 0 or not held.texts:
        return None
    items = build_items(list(zip(held.domains, held.texts)), n_items, N_CHOICES, N_CONTEXT, SEED)
    if not items:
        note("no cloze items: the held-out documents have too few lines of 12-200 characters")
        return None
    if len(items) < n_items:
        note(f"cloze: {len(items)} items, fewer than --items {n_items}: the held-out split holds no more")
    result = score_items(items, model_scorer(model, encode, max_seq_len, device))
    return {"choices": N_CHOICES, "context_lines": N_CONTEXT, "seed": SEED, "items_sha256": _digest(items),
            "scoring": "accuracy: highest total log-likelihood of the candidate; accuracy_norm: highest mean "
                       "log-likelihood per candidate token; *_stderr: binomial standard error sqrt(p (1 - p) / items)",
            **result}

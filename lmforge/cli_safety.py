"""`lmforge watermark keygen|detect|robustness` and `lmforge safety scan`, and the safety options of
`lmforge generate` (`--watermark-key-file`, `--safety-filter`). The work is in lmforge/safety/;
this module parses, checks before any model is loaded, calls and prints. A key is only ever read
from its file: it is never printed, logged or put in an error line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["GenerationGuards", "add_generate_safety_args", "add_safety_commands", "calibrated_detector",
           "generation_guards", "run_data_dir"]


def _tokenizer(path_arg: str) -> Any:
    """A TextTokenizer from a tokenizer.json, a directory holding one, or a run directory."""
    from lmforge.cli_errors import UserError
    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.storage.layout import RunDir

    path = Path(path_arg)
    candidates = [path] if path.is_file() else [path / "tokenizer.json", RunDir(path).tokenizer]
    for c in candidates:
        if c.is_file():
            return TextTokenizer.from_file(c)
    raise UserError(f"--tokenizer {path_arg}: no tokenizer.json there (give a run directory, a model directory "
                    "or a tokenizer.json file)")


def _watermark_config(args: argparse.Namespace) -> Any:
    from lmforge.safety.watermark import WatermarkConfig

    cfg = WatermarkConfig(gamma=args.gamma, delta=getattr(args, "delta", 2.0), context_width=args.context_width)
    cfg.validate()
    return cfg


TEXT_FILE_HELP = "a UTF-8 text file, or - for standard input"


def _read_text(path_arg: str) -> str:
    """The text a command checks: a file's, or standard input's for "-" (`echo ... | lmforge safety scan -`)."""
    from lmforge.cli_errors import UserError

    if path_arg == "-":
        return sys.stdin.read()
    path = Path(path_arg)
    if not path.is_file():
        raise UserError(f"{path_arg}: no such text file (give a file, or - for standard input)")
    return path.read_text(encoding="utf-8")


def _write_json(out: str | None, overwrite: bool, obj: dict) -> None:
    from lmforge.storage.atomic import write_text_atomic
    from lmforge.storage.guard import check_destination

    text = json.dumps(obj, indent=1, ensure_ascii=False)
    print(text)
    if out:
        check_destination(Path(out), overwrite, kind="file", flag="--out")
        write_text_atomic(Path(out), text + "\n")


def cmd_watermark_keygen(args: argparse.Namespace) -> int:
    from lmforge.safety.secret_key import write_new_key
    from lmforge.storage.guard import check_destination

    args.output = args.key_file
    check_destination(Path(args.key_file), args.overwrite, kind="file", flag="key file")
    write_new_key(Path(args.key_file))
    print(f"wrote a new watermark key to {args.key_file} (mode 0600; keep it secret)")
    return 0


def cmd_watermark_detect(args: argparse.Namespace) -> int:
    from lmforge.safety.secret_key import read_key_file
    from lmforge.safety.watermark import GreenLists, detect

    cfg = _watermark_config(args)
    key = read_key_file(args.key_file)
    if args.out:
        from lmforge.storage.guard import check_output_file

        check_output_file(Path(args.out), args.overwrite, {"text file": args.text_file, "key file": args.key_file})
    text = _read_text(args.text_file)
    tok = _tokenizer(args.tokenizer)
    result = detect(tok.encode(text), GreenLists(key, tok.vocab_size, cfg)).as_json()
    result.update({"detected": result["z"] > args.z_threshold, "z_threshold": args.z_threshold,
                   "context_width": cfg.context_width, "ignored_repeats": True})
    _write_json(args.out, args.overwrite, result)
    return 0


def _texts(path_arg: str) -> list[str]:
    """A .jsonl file's "text" fields, or one plain text file."""
    from lmforge.cli_errors import UserError

    text = _read_text(path_arg)
    if not path_arg.endswith(".jsonl"):
        return [text]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path_arg}:{n}: not a JSON object with a \"text\" field") from None
    if not out:
        raise UserError(f"{path_arg}: no texts")
    return out


def cmd_watermark_robustness(args: argparse.Namespace) -> int:
    from lmforge.cli_errors import UserError
    from lmforge.safety.secret_key import read_key_file
    from lmforge.safety.watermark import GreenLists
    from lmforge.safety.watermark_robustness import robustness_curve

    cfg = _watermark_config(args)
    try:
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        raise UserError(f"--rates {args.rates!r}: a comma list of numbers in [0, 1], e.g. 0.1,0.2,0.3") from None
    if not all(0 <= r <= 1 for r in rates):
        raise UserError(f"--rates {args.rates!r}: every rate must be in [0, 1]")
    key = read_key_file(args.key_file)
    if args.out:
        from lmforge.storage.guard import check_output_file

        check_output_file(Path(args.out), args.overwrite, {"texts file": args.texts, "key file": args.key_file})
    tok = _tokenizer(args.tokenizer)
    seqs = [tok.encode(t) for t in _texts(args.texts)]
    rows = robustness_curve(seqs, GreenLists(key, tok.vocab_size, cfg), rates, args.z_threshold, seed=args.seed)
    print(f"{len(seqs)} texts; detection at z > {args.z_threshold:g} after random token edits", file=sys.stderr)
    _write_json(args.out, args.overwrite, {"texts": len(seqs), "z_threshold": args.z_threshold,
                                           "rows": [r.as_json() for r in rows]})
    return 0


def cmd_safety_scan(args: argparse.Namespace) -> int:
    from lmforge.safety.adversarial import AdversarialDetector
    from lmforge.safety.gates import ContentFilter

    flt = ContentFilter.from_toml(args.filter, "--filter") if args.filter else None
    text = _read_text(args.text_file)
    detector = AdversarialDetector(threshold=args.threshold)
    if args.model:
        detector = _model_detector(args)
    out: dict[str, Any] = {"adversarial": detector.check(text).as_json()}
    if flt is not None:
        verdict = flt.check_prompt(text)
        out["filter"] = {"allowed": verdict.allowed, "categories": list(verdict.categories)}
    _write_json(None, False, out)
    return 0


def _model_detector(args: argparse.Namespace) -> Any:
    """The detector with the perplexity component: the model of `--model`, calibrated on windows of
    its held-out split (data.dir of the run, or --data-dir)."""
    from lmforge.cli_errors import UserError
    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.serve.generate import load_source, resolve_source

    src = resolve_source(Path(args.model))
    model, cfg, tok_path = load_source(src)
    if tok_path is None:
        raise UserError(f"--model {args.model}: no tokenizer.json with the model")
    data_dir = args.data_dir or run_data_dir(src)
    if not data_dir:
        raise UserError("--model: give --data-dir (packed data whose val split calibrates the perplexity component)")
    return calibrated_detector(model, cfg.max_seq_len, TextTokenizer.from_file(tok_path), Path(data_dir),
                               args.threshold)


def run_data_dir(src: Any) -> str | None:
    """The packed data a run trained on (its config's data.dir), or None for other sources."""
    return src.run_config.get("data", {}).get("dir") if src.run_config else None


def calibrated_detector(model: Any, max_seq_len: int, tok: Any, data_dir: Path, threshold: float) -> Any:
    """The adversarial detector with `model`'s windowed-perplexity component, calibrated on up to
    200 48-token windows of `data_dir`'s held-out split (windows with no document boundary)."""
    import numpy as np

    from lmforge.data.loader import TokenDataset
    from lmforge.safety.adversarial import AdversarialDetector, lm_token_nll

    ds = TokenDataset(data_dir, "val")
    tokens = np.asarray(ds.tokens, dtype=np.int64)
    starts = range(0, max(0, len(tokens) - 48), 48)
    texts = [tok.decode(tokens[s:s + 48].tolist()).strip("\ufffd") for s in starts
             if ds.eos_id not in tokens[s:s + 48]][:200]
    det = AdversarialDetector(lm_token_nll(model, tok.encode, max_seq_len), threshold=threshold)
    det.calibrate(texts)
    return det


@dataclass
class GenerationGuards:
    """What `lmforge generate` wraps around generation: the watermark and the filter's two gates."""

    key: Any = None
    watermark: Any = None
    content_filter: Any = None

    def processor(self, vocab_size: int) -> Any:
        if self.key is None:
            return None
        from lmforge.safety.watermark import GreenLists, WatermarkLogitsProcessor

        return WatermarkLogitsProcessor(GreenLists(self.key, vocab_size, self.watermark))

    def refusal(self, prompt: str) -> str | None:
        if self.content_filter is None:
            return None
        verdict = self.content_filter.check_prompt(prompt)
        return None if verdict.allowed else verdict.message

    def output(self, tok: Any, ids: list[int]) -> str:
        """The generated text as the output gate releases it, fed token by token (as a stream)."""
        if self.content_filter is None:
            return tok.decode(ids)
        gate = self.content_filter.stream_gate()
        out, shown = [], ""
        for i in range(1, len(ids) + 1):
            text = tok.decode(ids[:i])
            if text.endswith("\ufffd") and i < len(ids):
                continue  # a multi-byte character not complete yet
            out.append(gate.feed(text[len(shown):]))
            shown = text
            if gate.stopped:
                break
        out.append(gate.close())
        return "".join(out)


def generation_guards(args: argparse.Namespace) -> GenerationGuards:
    """The key file and the filter TOML read and checked (before any model is loaded)."""
    guards = GenerationGuards()
    if args.watermark_key_file:
        from lmforge.safety.secret_key import read_key_file
        from lmforge.safety.watermark import WatermarkConfig

        guards.watermark = WatermarkConfig(args.watermark_gamma, args.watermark_delta, args.watermark_context_width)
        guards.watermark.validate()
        guards.key = read_key_file(args.watermark_key_file)
    if args.safety_filter:
        from lmforge.safety.gates import ContentFilter

        guards.content_filter = ContentFilter.from_toml(args.safety_filter)
    return guards


def add_generate_safety_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watermark-key-file", default=None, help="watermark the output with the key in this file "
                   "(lmforge watermark keygen FILE)")
    p.add_argument("--watermark-gamma", type=float, default=0.25, help="green-list fraction of the vocabulary")
    p.add_argument("--watermark-delta", type=float, default=2.0, help="logit bias of green tokens")
    p.add_argument("--watermark-context-width", type=int, default=1, help="previous tokens seeding the green list")
    p.add_argument("--safety-filter", default=None, help="a filter TOML (recipes/safety/filter.toml): refuse "
                   "harmful prompts, mask or stop harmful output")


def _add_key_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--key-file", required=True, help="the watermark key file used when generating")
    q.add_argument("--tokenizer", required=True, help="run dir, model dir or tokenizer.json of the generating model")
    q.add_argument("--gamma", type=float, default=0.25)
    q.add_argument("--context-width", type=int, default=1)
    q.add_argument("--z-threshold", type=float, default=4.0, help="detected when z exceeds this")
    q.add_argument("--out", default=None, help="also write the JSON here")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def add_safety_commands(sub: argparse._SubParsersAction) -> None:
    from lmforge.cli_model_watermark import add_model_watermark_parsers

    p = sub.add_parser("watermark", help="text and model watermarks: make a key, detect, measure robustness, "
                                         "mark and verify a model's weights")
    wsub = p.add_subparsers(dest="watermark_command", required=True)
    q = wsub.add_parser("keygen", help="write a new random watermark key file (mode 0600)")
    q.add_argument("key_file", help="the key file to create")
    q.add_argument("--overwrite", action="store_true", help="replace an existing key file")
    q.set_defaults(func=cmd_watermark_keygen)
    q = wsub.add_parser("detect", help="z-score and p-value of a text under a key (JSON)")
    q.add_argument("text_file", help=TEXT_FILE_HELP)
    _add_key_args(q)
    q.set_defaults(func=cmd_watermark_detect)
    q = wsub.add_parser("robustness", help="detection rate of watermarked texts after random token "
                                           "substitution and deletion")
    q.add_argument("texts", help="a .jsonl of {\"text\": ...} lines, or one text file")
    _add_key_args(q)
    q.add_argument("--rates", default="0.05,0.1,0.2,0.3,0.4,0.5", help="edit rates (comma list)")
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_watermark_robustness)
    add_model_watermark_parsers(wsub)

    p = sub.add_parser("safety", help="check a prompt: harmful-content filter and adversarial-input detector")
    ssub = p.add_subparsers(dest="safety_command", required=True)
    q = ssub.add_parser("scan", help="the adversarial score of a text and, with --filter, the filter's verdict (JSON)")
    q.add_argument("text_file", help=TEXT_FILE_HELP)
    q.add_argument("--filter", default=None, help="a filter TOML (recipes/safety/filter.toml): adds its verdict")
    q.add_argument("--model", default=None, help="run, checkpoint or HF dir: adds the windowed-perplexity component")
    q.add_argument("--data-dir", default=None, help="packed data whose val split calibrates it (default: the run's)")
    q.add_argument("--threshold", type=float, default=0.5, help="flag at this score")
    q.set_defaults(func=cmd_safety_scan)



"""`lmforge serve`: the OpenAI-compatible HTTP server over a run, checkpoint or Hugging Face
directory. The server is in lmforge/serve/server/; this module parses, checks, loads and runs."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

__all__ = ["add_serve_command"]

KEYS_ENV = "LMFORGE_API_KEYS"  # comma-separated: keys without putting them on the command line


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    from lmforge.serve.server.errors import ServeError

    keys = list(args.api_key or [])
    if args.api_key_file:
        path = Path(args.api_key_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ServeError(f"--api-key-file {path}: cannot read it ({e.strerror or e})") from None
        keys += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise ServeError(f"--api-key-file {path}: no key in it (one key per line)")
    keys += [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
    return tuple(dict.fromkeys(keys))


def _options(args: argparse.Namespace, keys: tuple[str, ...], model_name: str):
    from lmforge.serve.server.options import BreakerOptions, ServerOptions

    breaker = BreakerOptions(error_rate=args.breaker_error_rate, window=args.breaker_window,
                             min_requests=args.breaker_min_requests, slow_s=args.breaker_slow,
                             cooldown_s=args.breaker_cooldown, probes=args.breaker_probes)
    return ServerOptions(model_name=model_name, slots=args.slots, max_batch_tokens=args.max_batch_tokens,
                         max_queue=args.max_queue, default_deadline_s=args.default_deadline,
                         max_deadline_s=args.max_deadline, max_tokens_limit=1 << 30 if args.max_tokens_limit is None else args.max_tokens_limit,
                         default_max_tokens=args.default_max_tokens, max_n=args.max_n,
                         max_request_bytes=args.max_request_bytes, api_keys=keys,
                         feedback_path=Path(args.feedback) if args.feedback else None, breaker=breaker,
                         drain_s=args.drain, early_exit_threshold=args.early_exit_threshold)


def _check_adversarial(args: argparse.Namespace) -> None:
    from lmforge.serve.server.errors import ServeError

    if args.adversarial_perplexity and args.adversarial == "off":
        raise ServeError("--adversarial-perplexity needs --adversarial refuse or log")
    if args.adversarial != "off" and not 0 < args.adversarial_threshold < 1:
        raise ServeError(f"--adversarial-threshold {args.adversarial_threshold}: must be in (0, 1)")


def _calibration_dir(args: argparse.Namespace, source) -> Path | None:
    """Where the detector's perplexity component is calibrated (checked before the model loads)."""
    from lmforge.cli_safety import run_data_dir
    from lmforge.serve.server.errors import ServeError

    if not args.adversarial_perplexity:
        return None
    where = args.adversarial_data_dir or run_data_dir(source)
    if not where:
        raise ServeError("--adversarial-perplexity: give --adversarial-data-dir (packed data whose val split "
                         "calibrates the perplexity component)")
    if not (Path(where) / "manifest.json").is_file():
        raise ServeError(f"--adversarial-data-dir {where}: not a packed data directory (lmforge data prepare)")
    return Path(where)


def _safety(args: argparse.Namespace, guards, model, cfg, tokenizer, calibration: Path | None):
    """The server's gates (serve/server/guards.py) from the key, filter and detector options."""
    from lmforge.cli_safety import calibrated_detector
    from lmforge.safety.adversarial import AdversarialDetector
    from lmforge.safety.watermark import GreenLists
    from lmforge.serve.server.guards import ServeSafety

    detector = None
    if args.adversarial != "off":
        if calibration is not None:
            detector = calibrated_detector(model, cfg.max_seq_len, tokenizer, calibration, args.adversarial_threshold)
        else:
            detector = AdversarialDetector(threshold=args.adversarial_threshold)
    green = GreenLists(guards.key, tokenizer.vocab_size, guards.watermark) if guards.key is not None else None
    return ServeSafety(watermark=green, content_filter=guards.content_filter, detector=detector,
                       detector_action=args.adversarial if args.adversarial != "off" else "refuse")


def _safety_summary(safety) -> str:
    parts = []
    if safety.watermark is not None:
        c = safety.watermark.config
        parts.append(f"watermark (gamma {c.gamma:g}, delta {c.delta:g})")
    if safety.content_filter is not None:
        parts.append(f"content filter ({safety.content_filter.config.action})")
    if safety.detector is not None:
        kind = "with perplexity" if safety.detector.token_nll is not None else "no model"
        parts.append(f"adversarial detector ({safety.detector_action} at {safety.detector.threshold:g}, {kind})")
    return ", ".join(parts) or "none"


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from lmforge.cli_errors import resolve_device
    from lmforge.cli_safety import generation_guards
    from lmforge.data.tokenizer import TextTokenizer
    from lmforge.serve.generate import load_source, resolve_source
    from lmforge.serve.server.app import build_app
    from lmforge.serve.server.errors import ServeError
    from lmforge.serve.server.model_check import check_servable
    from lmforge.serve.server.run import serve_app
    from lmforge.serve.server.service import Service

    args.device = resolve_device(args.device, "--device")
    if not 0 <= args.port <= 65535:
        raise ServeError(f"--port {args.port}: must be in [0, 65535]")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:  # its upper bound needs the model
        raise ServeError(f"--max-tokens-limit {args.max_tokens_limit}: must be >= 1")
    keys = _api_keys(args)
    guards = generation_guards(args)  # the watermark key and the filter TOML, read before the model loads
    _check_adversarial(args)
    source = resolve_source(Path(args.source))
    calibration = _calibration_dir(args, source)
    name = args.model_name or Path(args.source).resolve().name
    opts = _options(args, keys, name)
    opts_check = dataclasses.replace(opts, max_tokens_limit=max(opts.default_max_tokens, min(opts.max_tokens_limit, 1 << 29)))
    opts_check.check(max_seq_len=1 << 30)  # every limit that does not need the model, before loading it
    if args.threads is not None:
        if args.threads < 1:
            raise ServeError(f"--threads {args.threads}: must be >= 1")
        torch.set_num_threads(args.threads)
    model, cfg, tokenizer_json = load_source(source, device=args.device)
    if tokenizer_json is None:
        raise ServeError(f"{args.source}: no tokenizer.json with the model; serving needs one")
    check_servable(cfg, opts.early_exit_threshold)
    if args.max_tokens_limit is None:
        opts = dataclasses.replace(opts, max_tokens_limit=cfg.max_seq_len - 1)
    opts.check(cfg.max_seq_len)
    tokenizer = TextTokenizer.from_file(tokenizer_json)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ServeError(f"{tokenizer_json}: {tokenizer.vocab_size} tokens, more than the model's vocab_size "
                         f"{cfg.vocab_size}")
    safety = _safety(args, guards, model, cfg, tokenizer, calibration)
    service = Service(model, tokenizer, opts, safety=safety)
    app = build_app(service)
    if not keys and not _is_loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it may use it",
              file=sys.stderr)
    print(f"lmforge serve: {name} ({cfg.n_layers} layers, context {cfg.max_seq_len}) on "
          f"http://{args.host}:{args.port} ({opts.slots} slots, queue {opts.max_queue}, "
          f"{'API key required' if keys else 'no API key'}; safety: {_safety_summary(safety)})", file=sys.stderr,
          flush=True)
    serve_app(app, args.host, args.port, opts.drain_s, service.begin_drain, args.log_level, not args.no_access_log)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching) for a run, checkpoint "
                                     "or HF directory")
    p.add_argument("source", help="run dir (newest checkpoint), checkpoint step dir or Hugging Face dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append", default=None,
                   help=f"a key clients must send as 'Authorization: Bearer KEY' (repeatable; also {KEYS_ENV})")
    p.add_argument("--api-key-file", default=None, help="file with one API key per line (keeps keys out of ps)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the source's name)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto (cuda when there is one)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--slots", type=int, default=16, help="sequences decoded together, one KV cache slot each")
    g.add_argument("--max-batch-tokens", type=int, default=256, help="tokens per engine step (decode + prefill)")
    g.add_argument("--max-queue", type=int, default=64, help="sequences waiting for a slot; more are refused (429)")
    g.add_argument("--default-deadline", type=float, default=60.0, help="seconds a request may take unless it "
                                                                       "sets deadline_s; then 504")
    g.add_argument("--max-deadline", type=float, default=600.0, help="the largest deadline_s a request may set")
    g.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens (default: context - 1)")
    g.add_argument("--default-max-tokens", type=int, default=16, help="completions without max_tokens")
    g.add_argument("--max-n", type=int, default=8, help="most choices per request (n x prompts)")
    g.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger bodies get 413")
    g.add_argument("--drain", type=float, default=30.0, help="on SIGTERM: seconds to let requests finish")
    g.add_argument("--feedback", default=None, help="JSONL file that POST /v1/feedback appends to")
    g.add_argument("--early-exit-threshold", type=float, default=None,
                   help="adaptive depth for requests that do not set early_exit_threshold: a token leaves at the "
                        "first early exit whose confidence reaches this (model.early_exit; >= 1: never)")
    b = p.add_argument_group("circuit breaker")
    b.add_argument("--breaker-error-rate", type=float, default=0.5, help="failure share that opens it")
    b.add_argument("--breaker-window", type=int, default=20, help="recent outcomes it looks at")
    b.add_argument("--breaker-min-requests", type=int, default=5, help="outcomes needed before it can open")
    b.add_argument("--breaker-slow", type=float, default=30.0, help="a request slower than this is a failure")
    b.add_argument("--breaker-cooldown", type=float, default=5.0, help="seconds open before half-open")
    b.add_argument("--breaker-probes", type=int, default=2, help="half-open probe requests that must succeed")
    from lmforge.cli_safety import add_generate_safety_args

    s = p.add_argument_group("safety")
    add_generate_safety_args(s)
    s.add_argument("--adversarial", default="off", choices=["off", "refuse", "log"],
                   help="the adversarial-prompt detector in front of the model: refuse flagged prompts (400) "
                        "or only log them")
    s.add_argument("--adversarial-threshold", type=float, default=0.5, help="flag at this score (0-1)")
    s.add_argument("--adversarial-perplexity", action="store_true",
                   help="add the model's windowed-perplexity component (calibrated at startup)")
    s.add_argument("--adversarial-data-dir", default=None,
                   help="packed data whose val split calibrates it (default: the run's data.dir)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", action="store_true", help="no line per request")
    p.set_defaults(func=cmd_serve)

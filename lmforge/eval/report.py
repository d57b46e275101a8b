"""The results of `lmforge eval` for people (rich tables) and for programs (strict JSON, written
temp-then-rename so a reader never sees half a file)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from lmforge.storage.atomic import write_text_atomic
from lmforge.storage.strict_json import dumps_strict


def write_results(path: Path, results: dict) -> None:
    write_text_atomic(Path(path), dumps_strict(results, indent=2, ensure_ascii=False) + "\n")


def _f(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}"


def _table(title: str, columns: list[str]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        t.add_column(name, justify="left" if i == 0 else "right")
    return t


def _perplexity_table(p: dict) -> Table:
    t = _table(f"perplexity, held-out split, windows of {p['seq_len']} tokens",
               ["scope", "docs", "tokens", "loss", "ppl"])
    v = p.get("validation")
    if v:
        t.add_row(f"trainer's validation ({v['eval_batches']} x {v['global_batch']})", "", f"{v['tokens']:,}",
                  _f(v["loss"]), _f(v["perplexity"], 2))
    t.add_row(f"all read ({p['windows']}/{p['windows_in_split']} windows)", "", f"{p['tokens']:,}", _f(p["loss"]),
              _f(p["perplexity"], 2))
    for name, d in p["domains"].items():
        t.add_row(f"  {name}", str(d["documents"]), f"{d['tokens']:,}", _f(d["loss"]), _f(d["perplexity"], 2))
    return t


def _with_stderr(d: dict, key: str) -> str:
    """"0.315 ± 0.033": the accuracy and its standard error (results written before it had none: the accuracy)."""
    se = d.get(f"{key}_stderr")
    return _f(d[key], 3) + ("" if se is None else f" ± {se:.3f}")


def _cloze_table(c: dict) -> Table:
    t = _table(f"cloze: the true next line among {c['choices']}, after {c['context_lines']} lines",
               ["scope", "items", "acc", "acc/token", "chance"])
    rows = [("all", c), *((f"  {name}", d) for name, d in c["domains"].items())]
    for scope, d in rows:
        t.add_row(scope, str(d["items"]), _with_stderr(d, "accuracy"), _with_stderr(d, "accuracy_norm"),
                  _f(d["chance"], 3))
    return t


def _early_exit_table(e: dict, full: dict | None) -> Table:
    t = _table(f"early exit (exits after {', '.join(map(str, e['layers']))} of {e['n_layers']} blocks; "
               f"{e['rows'][0]['measure']})", ["threshold", "ppl", "vs full", "mean depth", "tokens leaving at exit"])
    for r in e["rows"]:
        vs = f"{r['perplexity'] / full['perplexity'] - 1:+.2%}" if full else ""
        shares = ", ".join(f"{k}: {v:.0%}" for k, v in r["exit_share"].items())
        t.add_row(f"{r['threshold']:g}", _f(r["perplexity"], 2), vs, f"{r['mean_depth']:.2f}", shares)
    return t


def _speed_table(s: dict) -> Table:
    t = _table("speed, batch 1, greedy", ["measure", "value"])
    m = s["memory"]
    t.add_row("prompts", f"{s['prompts']} x {s['prompt_tokens']} tokens + {s['new_tokens']} new, median of {s['repeats']}")
    t.add_row("prefill", f"{s['prefill_tokens_per_s']:,.0f} tokens/s")
    t.add_row("decode", f"{s['decode_tokens_per_s']:,.0f} tokens/s")
    t.add_row("parameters", f"{m['parameter_bytes'] / 2**20:,.2f} MiB")
    t.add_row("KV cache", f"{m['kv_cache_bytes'] / 2**20:,.2f} MiB")
    if "peak_rss_bytes" in m:
        t.add_row("peak RSS (process)", f"{m['peak_rss_bytes'] / 2**20:,.1f} MiB")
    else:
        t.add_row("peak allocated", f"{m['peak_allocated_bytes'] / 2**20:,.1f} MiB")
    t.add_row("device, threads", f"{s['device']}, {s['threads']}")
    return t


def _bias_table(b: dict) -> Table:
    t = _table("bias: stereotype-preference rate (0.5 = none; 95% CI by bootstrap over templates)",
               ["dimension", "templates", "pairs", "rate", "95% CI", "gap (nats)"])
    for name, d in b["dimensions"].items():
        t.add_row(name.replace("_", "/"), str(d["templates"]), str(d["pairs"]), _f(d["rate"], 3),
                  f"{_f(d['ci_low'], 3)} - {_f(d['ci_high'], 3)}", f"{d['mean_gap_nats']:+.4f}")
    return t


def print_results(results: dict, console: Console | None = None) -> None:
    """The tables of `results`: perplexity, cloze, bias, speed (those that were measured)."""
    console = console or Console(highlight=False)
    src, model = results["source"], results["deterministic"]["model"]
    step = f", step {src['step']}" if src["step"] is not None else ""
    console.print(f"eval {src['path']} ({src['kind']}{step}; {model['family']}, {model['parameters']:,} parameters)"
                  + (f" on {results['data_dir']}" if results["data_dir"] else ""))
    det = results["deterministic"]
    if det.get("perplexity"):
        console.print(_perplexity_table(det["perplexity"]))
    if det.get("cloze"):
        console.print(_cloze_table(det["cloze"]))
    if det.get("bias"):
        console.print(_bias_table(det["bias"]))
        console.print(f"pairs: {det['bias']['pairs']}, sha256 {det['bias']['pairs_sha256'][:16]}; names: "
                      f"{det['bias']['sources']['names']}")
    if det.get("early_exit"):
        console.print(_early_exit_table(det["early_exit"], det.get("perplexity")))
    if results.get("timing"):
        console.print(_speed_table(results["timing"]["speed"]))

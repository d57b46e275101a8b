"""`lmforge data report RUN_DIR [--compare OTHER] [--out FILE]`: one self-contained HTML page about
a pipeline run (or a jsonl corpus), and optionally its distribution shift against another.

What the page shows: totals; a per-step table (seen, kept, removed by reason, seconds and docs/s
when the executor timed the steps); histograms of document lengths and of every score the steps
recorded (kept documents against the values removed documents were dropped at); counts per
domain (metadata "domain"; per source when no document has one); removals by step and reason;
with `compare_to`, the drift section of `drift.py` (unigram JSD, its threshold and verdict,
overlaid histograms, the per-score histogram distances).

Why one file with no script and no URL: a report is mailed, attached to an issue or opened on a
machine without network; images are PNG data URIs, styles inline, and the page has nothing that
could fail to load (a headless Chromium test opens it and requires no console error).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from html import escape
from pathlib import Path

from lmforge.data.drift import DRIFT_THRESHOLD, DRIFT_VOCAB, DriftResult, compare_profiles
from lmforge.data.errors import DataError
from lmforge.data.profile import CorpusProfile, StepRow, profile_path
from lmforge.data.report_plots import bar_chart, histograms
from lmforge.storage.atomic import atomic_open

__all__ = ["ReportResult", "add_report_parser", "cmd_data_report", "default_report_path", "write_report"]

CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1300px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f0; }
.verdict { font-size: 20px; font-weight: bold; padding: 8px 12px; display: inline-block; border-radius: 4px; }
.drift { background: #fdd; color: #900; } .nodrift { background: #dfd; color: #060; }
.note { color: #555; font-size: 13px; }
td.reasons { text-align: left; }
img.plot { display: block; margin: 0.5em 0 1.5em 0; border: 1px solid #eee; }
"""


@dataclass(frozen=True)
class ReportResult:
    path: Path
    profile: CorpusProfile
    drift: DriftResult | None


def default_report_path(run: str | Path) -> Path:
    """<run_dir>/report.html, or <corpus>.report.html next to a corpus file."""
    p = Path(run)
    return p / "report.html" if p.is_dir() else p.with_name(p.name + ".report.html")


def _img(plot: tuple[str, int, int], ident: str, alt: str) -> str:
    uri, w, h = plot
    return f'<img class="plot" id="plot-{ident}" src="{uri}" width="{w}" height="{h}" alt="{escape(alt)}">'


def _num(v: float | None, fmt: str = "{:,.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _steps_table(steps: dict[str, StepRow]) -> str:
    rows = []
    for name, r in steps.items():
        removed = sum(r.dropped.values())
        reasons = ", ".join(f"{escape(k)}: {n:,}" for k, n in r.dropped.most_common(5)) or "-"
        share = f"{100 * removed / r.seen:.1f}%" if r.seen else "-"
        rows.append(f"<tr><td>{escape(name)}</td><td>{r.seen:,}</td><td>{r.kept:,}</td><td>{removed:,}</td>"
                    f"<td>{share}</td><td class=\"reasons\">{reasons}</td><td>{_num(r.seconds, '{:,.3f}')}</td>"
                    f"<td>{_num(r.docs_per_second)}</td></tr>")
    head = ("<tr><th>step</th><th>seen</th><th>kept</th><th>removed</th><th>removed %</th>"
            "<th>top reasons</th><th>seconds</th><th>docs/s</th></tr>")
    return f'<table id="steps">{head}{"".join(rows)}</table>'


def _removals(steps: dict[str, StepRow]) -> dict[str, int]:
    return {f"{name}: {reason}": n for name, r in steps.items() for reason, n in r.dropped.items() if n}


def _score_panels(p: CorpusProfile) -> dict[str, dict[str, list[float]]]:
    panels = {}
    for key in sorted(k for k in p.scores if not k.startswith("length.")):
        panels[key] = {"kept": p.scores[key].values}
        if key in p.removed_scores:
            panels[key]["removed"] = p.removed_scores[key].values
    for key in sorted(set(p.removed_scores) - set(p.scores)):
        panels[key] = {"removed": p.removed_scores[key].values}
    return panels


def _summary(p: CorpusProfile) -> str:
    t = p.totals
    if p.kind == "run":
        rejected = sum(t.get("rejected", {}).values()) if isinstance(t.get("rejected"), dict) else 0
        dropped = sum(t.get("dropped", {}).values()) if isinstance(t.get("dropped"), dict) else 0
        cells = [("records read", t.get("records", "-")), ("kept", t.get("kept", p.documents)),
                 ("rejected on reading", rejected), ("dropped by steps", dropped)]
        secs = t.get("seconds")
        if isinstance(secs, int | float) and secs > 0 and isinstance(t.get("records"), int):
            cells += [("seconds", f"{secs:,.1f}"), ("records/s", f"{t['records'] / secs:,.1f}")]
    else:
        cells = [("documents", p.documents)]
    cells += [("words in kept documents", p.words), ("distinct words", len(p.unigrams))]
    body = "".join(f"<tr><td>{escape(k)}</td><td>{v:,}</td></tr>" if isinstance(v, int)
                   else f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>" for k, v in cells)
    return f'<table id="totals">{body}</table>'


def _section_run(p: CorpusProfile) -> list[str]:
    out = [f"<h2>Summary</h2>{_summary(p)}"]
    if p.steps:
        timing = "" if p.step_seconds else '<p class="note">No step timings in stats.json: no throughput.</p>'
        out.append(f"<h2>Steps</h2>{_steps_table(p.steps)}{timing}")
    lengths = {k: {"kept": p.scores[k].values} for k in ("length.words", "length.chars") if k in p.scores}
    if lengths:
        out.append("<h2>Document lengths</h2>" + _img(histograms(lengths, 2), "lengths", "document lengths"))
    panels = _score_panels(p)
    out.append("<h2>Scores</h2>" + (_img(histograms(panels), "scores", "score histograms") if panels
                                    else '<p class="note">No step recorded a score.</p>'))
    by, counts = ("domain", p.domains) if p.domains else ("source (no domain metadata)", p.sources)
    if counts:
        out.append(f"<h2>Documents per {escape(by)}</h2>"
                   + _img(bar_chart(counts, f"kept documents per {by}", "documents"), "domains", "per domain"))
    removals = _removals(p.steps)
    out.append("<h2>Removals by step and reason</h2>"
               + (_img(bar_chart(removals, "removed documents", "documents"), "removals", "removals")
                  if removals else '<p class="note">Nothing was removed.</p>'))
    return out


def _section_drift(a: CorpusProfile, b: CorpusProfile, d: DriftResult) -> list[str]:
    cls = "drift" if d.verdict == "drift" else "nodrift"
    out = ["<h2>Distribution shift</h2>",
           f'<p>Comparing <b>{escape(a.name)}</b> (A) with <b>{escape(b.name)}</b> (B).</p>',
           f'<p><span class="verdict {cls}" id="verdict">{escape(d.verdict)}</span></p>',
           f"<p>Unigram Jensen-Shannon divergence (base 2; over the {DRIFT_VOCAB} most frequent words of both, "
           f"the rest pooled): <b id=\"jsd\">{d.jsd:.4f}</b>; threshold <b id=\"threshold\">{d.threshold:g}</b> "
           f"(drift when above). Over the full vocabulary: {_num(d.full_vocabulary_jsd, '{:.4f}')} "
           "(biased upwards by rare words; not used for the verdict).</p>",
           f'<p class="note">Why {DRIFT_THRESHOLD:g}: two random halves of one corpus differ by less than 0.03 '
           "from 50 documents (35,000 words) a side, Shakespeare and the King James Bible by 0.14 or more at any "
           "size (the measurements are in lmforge/data/drift.py).</p>"]
    size_rows = "".join(f"<tr><td>{escape(n)}</td><td>{s['documents']:,}</td><td>{s['words']:,}</td>"
                        f"<td>{s['unigram_tokens']:,}</td><td>{s['vocabulary']:,}</td></tr>" for n, s in d.sizes.items())
    out.append("<table id=\"sizes\"><tr><th>corpus</th><th>documents</th><th>words</th><th>words counted</th>"
               f"<th>distinct words</th></tr>{size_rows}</table>")
    if d.score_distances:
        rows = "".join(f"<tr><td>{escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in d.score_distances.items())
        out.append("<table id=\"score-distances\"><tr><th>series</th><th>histogram JSD</th></tr>"
                   f"{rows}</table>")
        panels = {k: {"A": a.scores[k].values, "B": b.scores[k].values} for k in d.score_distances}
        out.append('<p class="note">Histograms normalised to unit area (A and B may differ in size).</p>'
                   + _img(histograms(panels, density=True), "drift", "A against B histograms"))
    return out


def write_report(run_dir: str | Path, out_html: str | Path | None = None,
                 compare_to: str | Path | None = None, threshold: float = DRIFT_THRESHOLD) -> ReportResult:
    """Profile `run_dir` (a run directory or a jsonl corpus), optionally compare it with
    `compare_to`, and write the HTML page (atomically) to `out_html` (default: see
    `default_report_path`)."""
    if not 0.0 <= threshold <= 1.0:
        raise DataError(f"drift threshold {threshold} is outside [0, 1] (a Jensen-Shannon divergence in bits)")
    profile = profile_path(run_dir)
    other = profile_path(compare_to) if compare_to is not None else None
    if other is not None and other.name == profile.name:
        other.name = f"{other.name} (B)"
    drift = compare_profiles(profile, other, threshold) if other is not None else None
    body = [f"<h1>Data report: {escape(profile.name)}</h1>",
            f'<p class="note">{escape(str(Path(run_dir)))} ({escape(profile.kind)})</p>', *_section_run(profile)]
    if drift is not None and other is not None:
        body += _section_drift(profile, other, drift)
    notes = list(profile.notes) if drift is None else list(drift.notes)
    if notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Data report: {escape(profile.name)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")
    out = Path(out_html) if out_html is not None else default_report_path(run_dir)
    with atomic_open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return ReportResult(out, profile, drift)


def cmd_data_report(args: argparse.Namespace) -> int:
    """The CLI verb: write the report, print where, and the drift verdict when comparing. An
    existing file is replaced without --overwrite only when it is a data report."""
    from lmforge.storage.guard import check_output_file

    out = Path(args.out) if args.out is not None else default_report_path(args.run)
    head = out.read_bytes()[:4096] if out.is_file() else b""
    ours = head.startswith(b"<!DOCTYPE html>") and b"<title>Data report:" in head  # an earlier report
    check_output_file(out, args.overwrite or ours, {"input": args.run, "--compare": args.compare})
    result = write_report(args.run, args.out, args.compare, getattr(args, "threshold", DRIFT_THRESHOLD))
    print(f"report: {result.path}")
    if result.drift is not None:
        d = result.drift
        print(f"unigram JSD {d.jsd:.4f} (threshold {d.threshold:g}): {d.verdict}")
    return 0


def add_report_parser(data_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`lmforge data report ...` on the `data` verb's subparsers (cli.py's `dsub`): the arguments
    live next to the handler, so cli.py needs one line."""
    q = data_subparsers.add_parser("report", help="self-contained HTML report of a pipeline run (or a .jsonl "
                                   "corpus): plots, per-step table, drift against --compare")
    q.add_argument("run", metavar="RUN_DIR", help="a `data run` output_dir (stats.json, output.jsonl[.zst]) "
                   "or a .jsonl corpus of {\"text\"}")
    q.add_argument("--compare", metavar="OTHER", default=None,
                   help="another run directory or .jsonl corpus: unigram JSD, score histograms, drift verdict")
    q.add_argument("--out", metavar="FILE", default=None,
                   help="the HTML file (default: RUN_DIR/report.html, or CORPUS.report.html)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out file that is not a data "
                   "report (an earlier report is always replaced)")
    q.add_argument("--threshold", type=float, default=DRIFT_THRESHOLD,
                   help=f"drift when the unigram JSD is above this (default {DRIFT_THRESHOLD:g}, measured: "
                   "see lmforge/data/drift.py)")
    q.set_defaults(func=cmd_data_report)
    return q

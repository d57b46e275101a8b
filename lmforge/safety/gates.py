"""The filter's gates: the prompt gate (refuse with the policy message) and the streaming output
gate (never lets a blocked term out, whatever the chunk boundaries).

`ContentFilter` is the compiled policy (filter_config.py + matcher.py). The server calls:

    flt = ContentFilter.from_toml("filter.toml")
    verdict = flt.check_prompt(prompt)             # PromptVerdict: allowed, categories, message
    if not verdict.allowed: return verdict.message
    gate = flt.stream_gate()                        # one per response
    for chunk in model_stream: send(gate.feed(chunk)); if gate.stopped: break
    send(gate.close())

Why the gate holds text back: a term may arrive split over chunks ("ki", "ll yo", "urself"), so
text is released only up to where a match could still begin: the start of the leftmost partial
match of any term at the end of what has arrived (the `regex` package's partial matching over the
folded view), and a complete match that ends exactly at the end, which the next character could
still change ("kill" -> "kills"). So the gate holds back only as much as could still become a term,
never a fixed window, and never emits a character of a blocked span: under "mask" the span becomes
the mask string, under "stop" the stream ends before it (`stopped`).

Every block is reported to `on_block` (default: one warning line on the `lmforge.safety` logger)
as a `BlockEvent`: the gate and the category, never the matched text or term.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.safety.errors import SafetyError
from lmforge.safety.filter_config import FilterConfig, load_filter_config
from lmforge.safety.matcher import Hit, TermMatcher
from lmforge.safety.normalize import fold

__all__ = ["BlockEvent", "ContentFilter", "PromptVerdict", "StreamGate", "log_block"]

CONTEXT_CHARS = 16  # emitted characters kept so a term's "no letter before" test sees them

_log = logging.getLogger("lmforge.safety")


@dataclass(frozen=True)
class BlockEvent:
    gate: str       # "prompt" or "output" (the data gate records its drops in provenance)
    category: str


def log_block(event: BlockEvent) -> None:
    _log.warning("safety: blocked %s content at the %s gate", event.category, event.gate)


BlockHandler = Callable[[BlockEvent], None]


@dataclass(frozen=True)
class PromptVerdict:
    allowed: bool
    categories: tuple[str, ...]  # categories found (empty when allowed)
    message: str                 # the policy message when refused, "" when allowed


class ContentFilter:
    """The compiled policy: `hits`, `check_prompt`, `redact`, `stream_gate`."""

    def __init__(self, config: FilterConfig):
        self.config = config
        self.matcher = TermMatcher(config)

    @classmethod
    def from_toml(cls, path: Path | str, flag: str = "--safety-filter") -> ContentFilter:
        return cls(load_filter_config(path, flag))

    def hits(self, text: str) -> list[Hit]:
        return self.matcher.hits(text)

    def check_prompt(self, prompt: str, on_block: BlockHandler = log_block) -> PromptVerdict:
        cats = tuple(dict.fromkeys(h.category for h in self.matcher.iter_hits(prompt)))
        if not cats:
            return PromptVerdict(True, (), "")
        for c in cats:
            on_block(BlockEvent("prompt", c))
        return PromptVerdict(False, cats, self.config.policy_message.replace("{categories}", ", ".join(cats)))

    def stream_gate(self, action: str | None = None, on_block: BlockHandler = log_block) -> StreamGate:
        return StreamGate(self, action or self.config.action, on_block)

    def redact(self, text: str, action: str | None = None, on_block: BlockHandler = log_block) -> str:
        """The whole text through the output gate at once."""
        gate = self.stream_gate(action, on_block)
        return gate.feed(text) + gate.close()


class StreamGate:
    """Text chunks in, safe text out: `feed(chunk) -> str`, then `close() -> str` once at the end."""

    def __init__(self, flt: ContentFilter, action: str, on_block: BlockHandler = log_block):
        if action not in ("mask", "stop"):
            raise SafetyError(f"safety filter action {action!r}: must be mask or stop")
        self._flt = flt
        self._action = action
        self._on_block = on_block
        self._context = ""   # the last emitted original characters
        self._held = ""      # arrived, not yet emitted
        self.stopped = False
        self.blocked: list[str] = []  # categories, in order

    def feed(self, chunk: str) -> str:
        if self.stopped:
            return ""
        self._held += chunk
        return self._drain(final=False)

    def close(self) -> str:
        if self.stopped:
            return ""
        out = self._drain(final=True)
        self._held = ""
        return out

    def _drain(self, final: bool) -> str:
        matcher = self._flt.matcher
        text = self._context + self._held
        folded = fold(text)
        done = len(self._context)  # original characters before this index are emitted
        vpos = bisect.bisect_left(folded.starts, done)
        out: list[str] = []
        while True:
            m = matcher.search(folded, vpos, partial=not final)
            if m is None:
                out.append(text[done:])
                done = len(text)
                break
            pending = not final and (m.partial or m.end() == len(folded.text) or matcher.could_grow(folded, m.start()))
            if pending or m.end() == m.start():
                hold = folded.starts[m.start()] if m.start() < len(folded.text) else len(text)
                hold = max(hold, done)
                out.append(text[done:hold])
                done = hold
                break
            a, b = folded.original_span(m.start(), m.end())
            a = max(a, done)
            out.append(text[done:a])
            category = matcher.category_of(m)
            self.blocked.append(category)
            self._on_block(BlockEvent("output", category))
            if self._action == "stop":
                self.stopped = True
                self._held = ""
                return "".join(out)
            out.append(self._flt.config.mask)
            done = b
            vpos = m.end()
        self._held = text[done:]
        self._context = text[:done][-CONTEXT_CHARS:]
        return "".join(out)

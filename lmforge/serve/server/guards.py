"""The server's safety gates (lmforge/safety), around every request:

- in front: the adversarial-input detector (invisible characters, disguised words, gibberish
  suffixes, and with a model the windowed-perplexity change points) flags a crafted prompt; it is
  refused (400, code `adversarial_input`) or only logged, as the operator chose;
- the prompt gate of the content filter refuses a harmful prompt with the policy's message
  (400, code `content_filter`: Azure OpenAI's answer to a filtered prompt) before any model work;
- the output gate filters each choice's text as it streams: a blocked span is masked or the
  choice stops there (finish_reason `content_filter`), never a character of it sent, whatever
  the token and chunk boundaries (safety/gates.py's StreamGate holds back what could still
  become a term);
- the green-list watermark biases every sampled token's logits (server-wide: a client cannot
  turn it off).

Each block and flag is counted in /metrics and logged with its category or score, never the
text, and the watermark key is never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.safety.adversarial import AdversarialDetector
from lmforge.safety.gates import BlockEvent, ContentFilter, StreamGate, log_block
from lmforge.safety.watermark import GreenLists
from lmforge.serve.server.errors import APIError
from lmforge.serve.server.metrics import ServerMetrics
from lmforge.serve.server.text import IncrementalText

__all__ = ["DETECTOR_ACTIONS", "GuardedText", "ServeSafety"]

DETECTOR_ACTIONS = ("refuse", "log")
_log = logging.getLogger("lmforge.safety")


class GuardedText:
    """IncrementalText's deltas through an output gate: the same `push`/`finish`/`stopped`, plus
    `filtered` when the gate stopped the choice."""

    def __init__(self, text: IncrementalText, gate: StreamGate):
        self._text, self._gate = text, gate

    @property
    def stopped(self) -> bool:
        return self._text.stopped or self._gate.stopped

    @property
    def filtered(self) -> bool:
        return self._gate.stopped

    def push(self, token: int) -> str:
        delta = self._text.push(token)
        return self._gate.feed(delta) if delta else ""

    def finish(self) -> str:
        """The held-back rest, through the gate (called once, when the choice ends)."""
        if self._gate.stopped:
            return ""
        return self._gate.feed(self._text.finish()) + self._gate.close()


@dataclass(frozen=True)
class ServeSafety:
    """The gates one server runs; each is off when None."""

    watermark: GreenLists | None = None
    content_filter: ContentFilter | None = None
    detector: AdversarialDetector | None = None
    detector_action: str = "refuse"

    @property
    def screens_with_model(self) -> bool:
        """The detector runs the model (its perplexity component): callers run it off the event loop."""
        return self.detector is not None and self.detector.token_nll is not None

    def screen(self, texts: Sequence[str], param: str, metrics: ServerMetrics) -> None:
        """The request's own texts (prompts, or the chat's user and system messages) through the
        detector and the prompt gate; an APIError when one is refused."""
        if self.detector is not None:
            for text in texts:
                verdict = self.detector.check(text)  # logs a flag: score and components, never the text
                if verdict.flagged:
                    metrics.adversarial_flags.labels(action=self.detector_action).inc()
                    if self.detector_action == "refuse":
                        raise APIError(400, "the prompt was refused: it looks crafted to get around the model's "
                                       "safeguards", "invalid_request_error", param, "adversarial_input")
        if self.content_filter is not None:
            for text in texts:
                verdict = self.content_filter.check_prompt(text, on_block=_counted(metrics))
                if not verdict.allowed:
                    raise APIError(400, verdict.message, "invalid_request_error", param, "content_filter")

    def output_text(self, text: IncrementalText, metrics: ServerMetrics) -> IncrementalText | GuardedText:
        if self.content_filter is None:
            return text
        return GuardedText(text, self.content_filter.stream_gate(on_block=_counted(metrics)))

    def bias(self, contexts: Sequence[Sequence[int]], logits: torch.Tensor) -> torch.Tensor:
        """The watermark's green-list bias added to each row of `logits`, the row's green list
        seeded by its sequence's last tokens (prompt included), as generate()'s processor does."""
        if self.watermark is None:
            return logits
        green = self.watermark
        bias = np.zeros((len(contexts), logits.shape[-1]), dtype=np.float32)
        for row, ctx in enumerate(contexts):
            bias[row, :green.vocab_size] = green.mask(ctx) * green.config.delta
        return logits + torch.from_numpy(bias).to(device=logits.device, dtype=logits.dtype)


def _counted(metrics: ServerMetrics):
    def on_block(event: BlockEvent) -> None:
        metrics.safety_blocks.labels(gate=event.gate, category=event.category).inc()
        log_block(event)

    return on_block

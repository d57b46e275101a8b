"""Text around the token stream: the chat prompt, and turning generated ids into text deltas
that never show a half-decoded character or a prefix of a stop string that may still complete."""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # byte-level BPE: what an incomplete UTF-8 sequence decodes to so far
CHAT_STOP = ("\nUser:", "\nSystem:")  # a base model continues the transcript: stop at the next turn


def chat_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """The transcript a base model continues: one `Role: content` line per message, then
    `Assistant:`. (lmforge models have no chat template; a fine-tuned one would learn this one.)"""
    lines = [f"{role.capitalize()}: {content}" for role, content in messages]
    return "\n".join(lines) + "\nAssistant:"


class IncrementalText:
    """The text of a growing list of token ids, handed out as deltas. A delta holds back a tail
    that ends in an incomplete character or could be the start of a stop string; `finish` hands
    out the rest. When a stop string appears, the text ends before it (OpenAI's rule).
    (`filtered` is the output gate's: guards.py's GuardedText wraps this class.)"""

    filtered = False

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]):
        self._decode = decode
        self._stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded (up to a stop string once one is found)
        self.sent = 0   # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now safe to show (maybe "")."""
        self.ids.append(token)
        self.text = self._decode(self.ids)
        for stop in self._stops:
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self._take(len(self.text))
        safe = len(self.text)
        while safe > self.sent and self.text[safe - 1] == REPLACEMENT:
            safe -= 1
        for stop in self._stops:  # the longest tail that is a proper prefix of a stop string
            for k in range(min(len(stop) - 1, safe - self.sent), 0, -1):
                if self.text[safe - k:safe] == stop[:k]:
                    safe -= k
                    break
        return self._take(safe)

    def finish(self) -> str:
        """The held-back rest, once no token will follow."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out, self.sent = self.text[self.sent:upto], upto
        return out

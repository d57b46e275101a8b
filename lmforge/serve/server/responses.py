"""The JSON bodies of OpenAI's completion and chat completion objects and their stream chunks."""

from __future__ import annotations

import json
import time

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shapes:
    """Builds one request's objects: `chat` picks chat.completion(.chunk) over text_completion."""

    def __init__(self, cid: str, model: str, chat: bool):
        self.cid, self.model, self.chat = cid, model, chat
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.cid, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def final(self, texts: list[str], reasons: list[str | None], use: dict) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
            return {**self._head("chat.completion"), "choices": choices, "usage": use}
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return {**self._head("text_completion"), "choices": choices, "usage": use}

    def chunk(self, index: int, text: str | None, reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta: dict = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, use: dict) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": use}

"""Drive the chat page of `lmforge serve` in headless Chromium over the DevTools protocol (the
same client as tests/helpers/browser.py): type a prompt as a person would (focus, text, Enter),
watch the reply bubble while it streams, and take a screenshot."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field

from tests.helpers.browser import TIMEOUT_S, _console_errors, open_page

REPLY_JS = """JSON.stringify((() => {
  const all = document.querySelectorAll('.msg.assistant, .msg.error');
  const e = all[all.length - 1];
  if (!e) return null;
  const r = e.getBoundingClientRect();
  return {text: e.textContent, state: e.dataset.state || '', cls: e.className,
          box: {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}};
})())"""


@dataclass
class ChatRun:
    reply: str
    seen_lengths: list[int]      # the reply's length at each look while it streamed
    screenshot: bytes
    box: dict                    # the reply bubble's box in the screenshot
    errors: list[str] = field(default_factory=list)


def chat_once(url: str, prompt: str, api_key: str = "", timeout: float = TIMEOUT_S) -> ChatRun:
    with open_page(url, 1000, 700, timeout) as tools:
        def js(expr: str):
            return tools.call("Runtime.evaluate", expression=expr, returnByValue=True,
                              awaitPromise=True)["result"].get("value")

        if api_key:
            js(f"const k = document.getElementById('key'); k.value = {json.dumps(api_key)};"
               "k.dispatchEvent(new Event('change')); true")
        js("document.getElementById('prompt').focus(); true")
        tools.call("Input.insertText", text=prompt)
        for kind in ("keyDown", "keyUp"):
            tools.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
        lengths: list[int] = []
        end = time.monotonic() + timeout
        reply = None
        while time.monotonic() < end:
            reply = json.loads(js(REPLY_JS))
            if reply is not None:
                lengths.append(len(reply["text"]))
                # an error bubble is marked before its text is written: wait for the text too
                if reply["state"] == "done" or ("error" in reply["cls"] and reply["text"].strip()):
                    break
            time.sleep(0.02)
        assert reply is not None, "no reply bubble appeared"
        shot = tools.call("Page.captureScreenshot", format="png")
        return ChatRun(reply["text"], lengths, base64.b64decode(shot["data"]), reply["box"],
                       _console_errors(tools.events))

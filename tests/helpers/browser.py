"""Open a local HTML page in headless Chromium (Debian `chromium`) and return what a person would
see and what the DevTools console said: errors, a full-page screenshot, the boxes of chosen elements.

Why the DevTools protocol (over a small stdlib websocket client, no package needed) rather than
`--enable-logging=stderr`: the protocol reports each console message with its level, uncaught
exceptions, and failed resource loads (a missing image is a `Log.entryAdded` error, never a
console call), and it can measure element boxes in the same process that takes the screenshot,
so a plot's pixels are looked for exactly where the plot is. The flags turn off Chromium's own
background traffic: on a machine without network it would otherwise log errors of its own.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
         "--remote-debugging-port=0")
TIMEOUT_S = 60.0


def chromium() -> str:
    """The Chromium executable; a missing browser is a failure with the command that installs it
    (CI installs it: scripts/setup_env.sh), never a silent skip."""
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    raise AssertionError("headless Chromium is needed for the HTML report test and none of "
                         f"{', '.join(CHROMIUM_NAMES)} is on PATH; install it: apt-get install -y chromium")


class _WebSocket:
    """The client side of RFC 6455, text frames only: enough for the DevTools protocol."""

    def __init__(self, url: str, timeout: float):
        u = urllib.parse.urlparse(url)
        self._sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                            ).encode())
        self._buf = b""
        while b"\r\n\r\n" not in self._buf:
            self._buf += self._recv_some()
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket upgrade refused: {head[:200]!r}")

    def _recv_some(self) -> bytes:
        data = self._sock.recv(1 << 16)
        if not data:
            raise ConnectionError("DevTools connection closed")
        return data

    def _exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += self._recv_some()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        self._sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def send(self, text: str) -> None:
        self._frame(0x1, text.encode())

    def recv(self) -> str:
        parts: list[bytes] = []
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            payload = self._exact(n)  # a server never masks
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the websocket")
            if opcode == 0x9:
                self._frame(0xA, payload)
                continue
            if opcode in (0x1, 0x2, 0x0):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        self._sock.close()


class _DevTools:
    """Commands by id; the events that arrive meanwhile are kept in order."""

    def __init__(self, url: str, timeout: float):
        self._ws = _WebSocket(url, timeout)
        self._next = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self._next += 1
        self._ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == self._next:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_for(self, event: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(e["method"] == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout:.0f} s")
            self.events.append(json.loads(self._ws.recv()))

    def settle(self, seconds: float) -> None:
        """Let late events arrive: a round trip at a time until `seconds` have passed."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.call("Runtime.evaluate", expression="1")
            time.sleep(0.05)

    def close(self) -> None:
        self._ws.close()


def _console_errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description")))
                                                        for a in p.get("args", [])))
        elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            out.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
    return out


@dataclass
class PageView:
    errors: list[str]            # console errors, uncaught exceptions, failed loads
    screenshot: bytes            # PNG of the whole page, 1 image pixel = 1 CSS pixel
    boxes: dict[str, dict]       # element id -> {x, y, width, height, naturalWidth}


BOXES_JS = """JSON.stringify(Object.fromEntries([...document.querySelectorAll(%s)].map(e => {
  const r = e.getBoundingClientRect();
  return [e.id, {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height,
                 naturalWidth: e.naturalWidth === undefined ? null : e.naturalWidth}];
})))"""


def _devtools_port(user_dir: Path, proc: subprocess.Popen, timeout: float) -> int:
    marker = user_dir / "DevToolsActivePort"  # Chromium writes the port it chose here
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before DevTools started")
        if marker.is_file() and (lines := marker.read_text().split()):
            return int(lines[0])
        time.sleep(0.05)
    raise TimeoutError(f"chromium wrote no DevToolsActivePort within {timeout:.0f} s")


def _page_socket(port: int, timeout: float) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP(S)_PROXY
    deadline = time.monotonic() + timeout
    while True:
        try:
            with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
        except OSError:
            pages = []
        if pages:
            return pages[0]["webSocketDebuggerUrl"]
        if time.monotonic() > deadline:
            raise TimeoutError(f"chromium listed no page target on port {port} within {timeout:.0f} s")
        time.sleep(0.1)


@contextlib.contextmanager
def open_page(url: str, width: int, height: int, timeout: float = TIMEOUT_S) -> Iterator[_DevTools]:
    """A fresh headless Chromium showing `url` (loaded) at width x height: its DevTools session, with
    only the events the page itself caused. Chromium, its profile and log are removed afterwards; a
    failure shows the end of Chromium's log."""
    user_dir = Path(tempfile.mkdtemp(prefix="lmforge-chromium-"))
    log = open(user_dir.parent / f"{user_dir.name}.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={user_dir}", "about:blank"],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        try:
            tools = _DevTools(_page_socket(_devtools_port(user_dir, proc, timeout), timeout), timeout)
        except Exception as e:
            log.flush()
            tail = Path(log.name).read_bytes()[-3000:].decode(errors="replace")
            raise AssertionError(f"headless chromium failed: {e!r}\n--- chromium's log (end) ---\n{tail}") from e
        try:
            for domain in ("Runtime", "Log", "Page"):
                tools.call(f"{domain}.enable")
            tools.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                       mobile=False)
            tools.events.clear()  # only what the page itself causes
            tools.call("Page.navigate", url=url)
            tools.wait_for("Page.loadEventFired", timeout)
            yield tools
        finally:
            tools.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(user_dir, ignore_errors=True)
        Path(log.name).unlink(missing_ok=True)


def view_page(page: Path, width: int = 1300, height: int = 900, selector: str = "img",
              timeout: float = TIMEOUT_S) -> PageView:
    """Load `page` (a local file) in a fresh headless Chromium: console errors, a full-page
    screenshot and the boxes of the elements matching `selector`."""
    with open_page(Path(page).resolve().as_uri(), width, height, timeout) as tools:
        tools.settle(0.5)
        boxes = json.loads(tools.call("Runtime.evaluate", expression=BOXES_JS % json.dumps(selector),
                                      returnByValue=True)["result"]["value"])
        size = tools.call("Runtime.evaluate", returnByValue=True, expression=(
            "JSON.stringify([document.documentElement.scrollWidth, document.documentElement.scrollHeight])"))
        full_w, full_h = json.loads(size["result"]["value"])
        shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": max(full_w, width), "height": full_h, "scale": 1})
        return PageView(_console_errors(tools.events), base64.b64decode(shot["data"]), boxes)


def drawn_fraction(screenshot: bytes, box: dict, inset: int = 2) -> float:
    """The share of pixels inside `box` (less `inset` px each side: the image's own border) that
    are clearly darker than a white background: 0 for an empty area, a few percent and up for a
    drawn plot (axes, ticks, labels, bars)."""
    from PIL import Image

    img = Image.open(io.BytesIO(screenshot)).convert("L")
    x0, y0 = round(box["x"]) + inset, round(box["y"]) + inset
    x1, y1 = round(box["x"] + box["width"]) - inset, round(box["y"] + box["height"]) - inset
    region = img.crop((x0, y0, x1, y1))
    hist = region.histogram()
    return sum(hist[:200]) / max(region.width * region.height, 1)

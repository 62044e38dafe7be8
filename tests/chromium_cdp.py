"""Load an HTML file in headless Chromium and record console errors, exceptions, dialogs and network
requests through the DevTools protocol over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, messages
separated by NUL), so no websocket package is needed.

Used by the report tests; ``find_chromium()`` returns None when no browser is installed (the test then
skips and says so). Debian: ``apt-get install -y chromium``.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> Optional[str]:
    """``$NSACONF_CHROMIUM`` or the first Chromium/Chrome on PATH."""
    env = os.environ.get("NSACONF_CHROMIUM")
    if env:
        return env if Path(env).exists() or shutil.which(env) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageLoad:
    """What happened while one page loaded."""

    url: str
    console_errors: list[str] = field(default_factory=list)  # console.error/assert, uncaught exceptions, Log errors
    requests: list[str] = field(default_factory=list)  # every URL requested other than the page itself
    dialogs: list[str] = field(default_factory=list)  # alert()/confirm()/prompt() messages
    evaluated: Any = None  # value of the JS expression evaluated after load


class CDPError(RuntimeError):
    pass


class Chromium:
    """A headless Chromium driven over the DevTools pipe. Use as a context manager."""

    def __init__(self, executable: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="nsaconf-chromium-")
        to_chrome_r, self._to_chrome_w = os.pipe()
        self._from_chrome_r, from_chrome_w = os.pipe()

        def child_fds() -> None:  # in the child: the protocol pipes become (inheritable) fds 3 and 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)  # first out of the way of 3 and 4
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-default-apps", "--mute-audio",
                f"--user-data-dir={self._tmp.name}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=child_fds)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next_id = 0
        self._events: list[dict] = []

    # ---------------------------------------------------------------------------------- protocol
    def _send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> int:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome_w, json.dumps(msg).encode() + b"\0")
        return self._next_id

    def _recv(self, deadline: float) -> Optional[dict]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._from_chrome_r], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._from_chrome_r, 1 << 16)
            if not chunk:
                raise CDPError("Chromium closed the DevTools pipe (did it crash?)")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> dict:
        mid = self._send(method, params, session)
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._recv(deadline)
            if msg is None:
                raise CDPError(f"no answer to {method} within {self.timeout} s")
            if msg.get("id") == mid:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._on_event(msg)

    def _on_event(self, msg: dict) -> None:
        self._events.append(msg)
        if msg["method"] == "Page.javascriptDialogOpening":  # a dialog blocks the page: dismiss it, keep the record
            self._send("Page.handleJavaScriptDialog", {"accept": True}, msg.get("sessionId"))

    def _pump(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            msg = self._recv(deadline)
            if msg is None:
                return
            if "method" in msg:
                self._on_event(msg)

    def _wait_event(self, method: str, session: str) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            if any(e["method"] == method and e.get("sessionId") == session for e in self._events):
                return
            msg = self._recv(deadline)
            if msg is None:
                raise CDPError(f"page did not fire {method} within {self.timeout} s")
            if "method" in msg:
                self._on_event(msg)

    # ---------------------------------------------------------------------------------- API
    def load(self, path: Path, expression: str = "null", settle: float = 0.5, width: Optional[int] = None,
             screenshots: Optional[dict[str, Path]] = None) -> PageLoad:
        """Open ``path`` in a fresh tab (``width``: a viewport of that many CSS px, 900 high), wait for
        ``load`` plus ``settle`` seconds, evaluate ``expression``; then write a PNG of each element
        ``screenshots`` names (CSS selector -> file; every ``<details>`` opened first)."""
        url = Path(path).resolve().as_uri()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._events = []
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.call(f"{domain}.enable", {}, session)
        if width:
            self.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session)
        self.call("Page.navigate", {"url": url}, session)
        self._wait_event("Page.loadEventFired", session)
        self._pump(settle)
        value = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        out = PageLoad(url=url, evaluated=value.get("result", {}).get("value"))
        if screenshots:
            self._screenshots(session, screenshots)
        if "exceptionDetails" in value:
            out.console_errors.append(f"evaluate failed: {value['exceptionDetails'].get('text')}")
        for e in self._events:
            if e.get("sessionId") != session:
                continue
            p = e.get("params", {})
            m = e["method"]
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.console_errors.append("console." + p["type"] + ": " +
                                          " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.console_errors.append("uncaught: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.console_errors.append("log: " + p["entry"].get("text", ""))
            elif m == "Network.requestWillBeSent":
                req = p.get("request", {}).get("url", "")
                if req != url:
                    out.requests.append(req)
            elif m == "Page.javascriptDialogOpening":
                out.dialogs.append(p.get("message", ""))
        self.call("Target.closeTarget", {"targetId": target})
        return out

    def _screenshots(self, session: str, shots: dict[str, Path]) -> None:
        import base64

        self.call("Runtime.evaluate", {"expression": "document.querySelectorAll('details').forEach("
                                                     "function (d) { d.open = true; })"}, session)
        for selector, png in shots.items():
            expr = ("(function () { var e = document.querySelector(%s); if (!e) { return null; } "
                    "var r = e.getBoundingClientRect(); return [r.left + scrollX, r.top + scrollY, r.width, r.height]; })()"
                    % json.dumps(selector))
            box = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)["result"].get("value")
            if not box:
                raise CDPError(f"no element {selector!r} to screenshot")
            x, y, w, h = box
            data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
                "x": x, "y": y, "width": max(w, 1), "height": max(min(h, 6000), 1), "scale": 1}}, session)["data"]
            Path(png).parent.mkdir(parents=True, exist_ok=True)
            Path(png).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self._send("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            for fd in (self._to_chrome_w, self._from_chrome_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._tmp.cleanup()

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

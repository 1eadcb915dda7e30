"""Headless-Chromium screenshots of HTML pages, with the page's console errors.

:func:`screenshot` drives Debian's ``/usr/bin/chromium`` through the Chrome DevTools protocol over
``--remote-debugging-pipe`` (file descriptors 3 and 4, NUL-separated JSON; no websocket, no
dependency). It collects ``console.error``/``console.assert`` calls, uncaught exceptions and
browser log entries of level ``error`` (failed resource loads, blocked requests, ...), waits for the
load event plus a settle delay, and captures a PNG. If the pipe cannot be used, it falls back to the
``--screenshot`` command line and parses the ``CONSOLE`` lines that ``--enable-logging=stderr``
prints (that log has no levels, so only messages that look like errors are kept).
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from functools import lru_cache
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
         "--no-default-browser-check", "--disable-dev-shm-usage"]


@lru_cache(maxsize=1)
def chromium_path() -> str | None:
    """The first Chromium/Chrome binary found (``/usr/bin/chromium`` first), or None."""
    for c in CANDIDATES:
        p = c if os.path.isabs(c) else shutil.which(c)
        if p and os.path.exists(p) and os.access(p, os.X_OK):
            return p
    return None


@lru_cache(maxsize=1)
def chromium_available() -> bool:
    """True when a headless Chromium can be run here (``chromium --version`` succeeds)."""
    p = chromium_path()
    if p is None:
        return False
    try:
        r = subprocess.run([p, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and "chrom" in r.stdout.lower()


class _CDPError(RuntimeError):
    pass


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class _Pipe:
    """A DevTools-protocol connection over the browser's fds 3 (commands in) and 4 (messages out)."""

    def __init__(self, args: list[str], timeout: float):
        cmd_r, self._w = os.pipe()  # we write commands, the browser reads fd 3
        self._r, out_w = os.pipe()  # the browser writes fd 4, we read
        # the child's ends go to fds >= 10, so that moving them onto 3 and 4 cannot overwrite one another; a
        # shell (bash: dash cannot redirect from fds >= 10) moves them onto 3 and 4 and execs the browser (the
        # Debian launcher is itself a shell script that execs the binary: the fds survive both execs)
        cmd_r, out_w = _high_fd(cmd_r), _high_fd(out_w)
        bash = shutil.which("bash")
        if bash is None:
            for fd in (cmd_r, out_w, self._w, self._r):
                os.close(fd)
            raise _CDPError("bash is needed to hand the DevTools pipe to the browser")
        self.proc = subprocess.Popen([bash, "-c", f'exec "$0" "$@" 3<&{cmd_r} 4>&{out_w}', *args],
                                     pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self.timeout = timeout
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.on_event = None

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _CDPError("timed out waiting for the browser")
            ready, _, _ = select.select([self._r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise _CDPError("the browser closed the DevTools pipe (did it start?)")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def _dispatch(self, msg: dict):
        if "method" in msg and self.on_event is not None:
            self.on_event(msg)
        self.events.append(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        self._id += 1
        mid = self._id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        try:
            os.write(self._w, data)
        except OSError as e:
            raise _CDPError(f"cannot write to the browser: {e}") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            m = self._read(deadline)
            if m.get("id") == mid:
                if "error" in m:
                    raise _CDPError(f"{method}: {m['error'].get('message', m['error'])}")
                return m.get("result", {})
            self._dispatch(m)

    def wait_event(self, method: str, session: str | None, timeout: float) -> dict | None:
        for m in self.events:
            if m.get("method") == method and m.get("sessionId") == session:
                return m
        deadline = time.monotonic() + timeout
        while True:
            try:
                m = self._read(deadline)
            except _CDPError:
                return None
            self._dispatch(m)
            if m.get("method") == method and m.get("sessionId") == session:
                return m

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _arg_text(a: dict) -> str:
    if "value" in a:
        v = a["value"]
        return v if isinstance(v, str) else json.dumps(v)
    return str(a.get("description") or a.get("unserializableValue") or a.get("type", ""))


def _error_of(msg: dict) -> str | None:
    """The console-error text of one DevTools event, or None when it is not an error."""
    m, p = msg.get("method"), msg.get("params", {})
    if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
        return "console." + p["type"] + ": " + " ".join(_arg_text(a) for a in p.get("args", []))
    if m == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        text = (d.get("exception") or {}).get("description") or d.get("text", "exception")
        where = f" ({d.get('url', '')}:{d.get('lineNumber', '?')})" if d.get("url") else ""
        return f"Uncaught {text}{where}" if not text.startswith("Uncaught") else text + where
    if m == "Log.entryAdded":
        e = p.get("entry", {})
        if e.get("level") == "error":
            return f"{e.get('source', 'log')}: {e.get('text', '')}" + (f" ({e['url']})" if e.get("url") else "")
    if m == "Inspector.targetCrashed":
        return "page crashed"
    return None


def _url(html_path) -> str:
    s = str(html_path)
    if re.match(r"^[a-z]+://", s) or s.startswith(("about:", "data:")):
        return s
    return Path(s).resolve().as_uri()


def _cdp_screenshot(url: str, png_path: Path, width: int, height: int, timeout: float, settle_ms: int,
                    full_page: bool, profile: str) -> list[str]:
    chrome = chromium_path()
    args = [chrome, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", f"--window-size={width},{height}",
            "about:blank"]
    pipe = _Pipe(args, timeout)
    errors: list[str] = []
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

        def on_event(m):
            if m.get("sessionId") == sid:
                e = _error_of(m)
                if e is not None:
                    errors.append(e)

        pipe.on_event = on_event
        for method in ("Page.enable", "Runtime.enable", "Log.enable", "Inspector.enable"):
            pipe.call(method, session=sid)
        pipe.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=sid)
        nav = pipe.call("Page.navigate", {"url": url}, session=sid)
        if nav.get("errorText"):
            errors.append(f"navigation failed: {nav['errorText']} ({url})")
        if pipe.wait_event("Page.loadEventFired", sid, timeout) is None:
            errors.append(f"the page did not finish loading within {timeout:.0f} s")
        pipe.call("Runtime.evaluate", {"expression": "new Promise(r => requestAnimationFrame(() => setTimeout(r, "
                                                     f"{int(settle_ms)})))", "awaitPromise": True}, session=sid)
        h = height
        if full_page:
            m = pipe.call("Page.getLayoutMetrics", session=sid)
            size = m.get("cssContentSize") or m.get("contentSize") or {}
            h = int(min(max(height, size.get("height", height)), 16384))
            pipe.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": h, "deviceScaleFactor": 1, "mobile": False}, session=sid)
            pipe.call("Runtime.evaluate", {"expression": "new Promise(r => requestAnimationFrame(() => "
                                                         "setTimeout(r, 200)))", "awaitPromise": True}, session=sid)
        shot = pipe.call("Page.captureScreenshot", {"format": "png", "fromSurface": True,
                                                    "clip": {"x": 0, "y": 0, "width": width, "height": h, "scale": 1}},
                         session=sid)
        png_path.write_bytes(base64.b64decode(shot["data"]))
    finally:
        pipe.close()
    return errors


_CONSOLE = re.compile(r':CONSOLE(?:\(\d+\)|:\d+)?\]\s*"(?P<msg>.*)",\s*source:\s*(?P<src>.*)$')


def _cli_screenshot(url: str, png_path: Path, width: int, height: int, timeout: float, settle_ms: int,
                    profile: str) -> list[str]:
    args = [chromium_path(), *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
            f"--virtual-time-budget={max(1000, int(settle_ms) + 2000)}", f"--screenshot={png_path}",
            f"--window-size={width},{height}", url]
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    errors = []
    for line in r.stderr.splitlines():
        m = _CONSOLE.search(line)
        if m and re.search(r"Uncaught|Error|error|Failed|failed", m["msg"]):
            errors.append(f"{m['msg']} ({m['src']})")
        elif "Uncaught" in line and not m:
            errors.append(line.strip())
    if not png_path.exists():
        errors.append(f"chromium wrote no screenshot (exit {r.returncode})")
    return errors


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1400, height: int = 1800, *,
               timeout: float = 60.0, settle_ms: int = 600, full_page: bool = False, method: str = "auto") -> list[str]:
    """Render ``html_path`` (a file or URL) in headless Chromium, save a ``width`` × ``height`` PNG (the whole
    page, up to 16384 px, with ``full_page=True``) to ``png_path`` and return the page's console error
    messages (empty list: none). ``method``: "cdp" (DevTools pipe), "cli" (``--screenshot`` and the stderr
    log; no full page) or "auto" (cdp, else cli)."""
    if method not in ("auto", "cdp", "cli"):
        raise ValueError(f"method must be 'auto', 'cdp' or 'cli', not {method!r}")
    if not chromium_available():
        raise RuntimeError("headless Chromium is not installed (apt-get install chromium)")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    url = _url(html_path)
    if method != "cli":
        with tempfile.TemporaryDirectory(prefix="viz-chromium-") as profile:
            try:
                return _cdp_screenshot(url, png_path, width, height, timeout, settle_ms, full_page, profile)
            except _CDPError as e:
                if method == "cdp":
                    raise RuntimeError(f"headless Chromium over the DevTools pipe failed: {e}") from None
    with tempfile.TemporaryDirectory(prefix="viz-chromium-") as profile:
        return _cli_screenshot(url, png_path, width, height, timeout, settle_ms, profile)


__all__ = ["screenshot", "chromium_available", "chromium_path"]

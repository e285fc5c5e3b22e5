"""Drive a real headless Chromium (Debian's package) from tests, with the standard library only.

Two ways in:

* a one-shot command line: :func:`dump_dom` (the DOM after the page's scripts ran for a virtual-time
  budget);
* :class:`Browser`, a live session over the Chrome DevTools Protocol: a minimal RFC 6455 websocket
  client (text frames, fragmentation, ping/pong, close) is enough for ``Runtime.evaluate`` and
  ``Page.captureScreenshot``, and needs no new package. A session lets a test wait for a *condition*
  in the page (e.g. "version 7 is displayed") instead of sleeping, which makes a live-update test
  deterministic.

Chromium is found with :func:`find_chromium`; tests skip with a reason when it is absent
(``make browser`` installs it).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")


def find_chromium() -> str | None:
    """Path of the Chromium executable, or None."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


def end_process_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop Chromium and wait until *every* process it started has exited.

    The browser's main process exits before its helpers (zygote, renderers, crash handler), which
    go on writing into the profile: removing the profile directory then fails with "Directory not
    empty" (issue 15). Chromium is started in its own session, so its process group is exactly
    its processes: terminate the main one, then wait for the group to be empty (SIGKILL after half
    the timeout), and only then may the profile be removed.
    """
    pgid = proc.pid  # start_new_session=True: the group id is the leader's pid
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout / 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout / 2)
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        members = _group_members(pgid)
        if not members:
            return
        now = time.monotonic()
        if not killed and now > deadline - timeout / 2:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            killed = True
        if now > deadline:
            raise TimeoutError(f"chromium helper processes {members} outlived the browser")
        time.sleep(0.02)  # polling /proc for the exits: there is no wait() for grandchildren


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="sc-chromium-") as profile:
        proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            end_process_group(proc)  # the helpers may still hold the profile
        if proc.returncode:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def dump_dom(url: str, budget_ms: int = 2000, timeout: float = 60.0) -> str:
    """Serialized DOM of ``url`` after its scripts ran for ``budget_ms`` of virtual time."""
    done = _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)
    return done.stdout.decode("utf-8", "replace")


class _WebSocket:
    """Just enough of a websocket client for the DevTools protocol (client frames are masked)."""

    def __init__(self, ws_url: str, timeout: float) -> None:
        assert ws_url.startswith("ws://"), ws_url
        hostport, _, path = ws_url[5:].partition("/")
        host, _, port = hostport.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the websocket handshake")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise ConnectionError(f"websocket handshake refused: {status!r}")
        self.buf = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("DevTools websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode("utf-8"))

    def recv(self) -> str:
        parts: list[bytes] = []
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise ConnectionError("DevTools websocket closed by the browser")
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode("utf-8")

    def close(self) -> None:
        try:
            self._send_frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class Browser:
    """A headless Chromium with one page, driven over the DevTools protocol.

    Parameters
    ----------
    size : (int, int)
        Window width and height in CSS pixels.
    timeout : float
        Upper bound for start-up and for any single protocol call (a liveness guard, not a
        performance assertion).
    """

    def __init__(self, size: tuple[int, int] = (1100, 700), timeout: float = 60.0) -> None:
        self.size = size
        self.timeout = timeout
        self._next_id = 0
        self._proc: subprocess.Popen | None = None
        self._ws: _WebSocket | None = None
        self._profile: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Browser:
        exe = find_chromium()
        if exe is None:
            raise FileNotFoundError("chromium not installed (apt-get install chromium)")
        self._profile = tempfile.TemporaryDirectory(prefix="sc-chromium-")
        profile = Path(self._profile.name)
        self._proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--remote-debugging-address=127.0.0.1", f"--window-size={self.size[0]},{self.size[1]}",
             "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port = self._wait_port(profile / "DevToolsActivePort")
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list",
                                                       timeout=self.timeout))
            page = next(t for t in targets if t.get("type") == "page")
            self._ws = _WebSocket(page["webSocketDebuggerUrl"], self.timeout)
            self.call("Page.enable")
            self.call("Runtime.enable")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_port(self, path: Path) -> int:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self._proc.returncode} before DevTools was up")
            try:
                first = path.read_text().splitlines()[0]
                return int(first)
            except (FileNotFoundError, IndexError, ValueError):
                time.sleep(0.05)
        raise TimeoutError("chromium did not open its DevTools port")

    def __exit__(self, *exc: object) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self._proc is not None:
            end_process_group(self._proc)  # before the profile goes: helpers still write to it
            self._proc = None
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None

    def call(self, method: str, **params: Any) -> dict:
        """Send one protocol command and return its result (events in between are skipped)."""
        assert self._ws is not None, "use Browser as a context manager"
        self._next_id += 1
        msg_id = self._next_id
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """Value of a JS expression in the page (JSON-serialisable values only)."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error in {expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None, interval: float = 0.05) -> Any:
        """Poll ``expression`` until truthy; returns its value or raises TimeoutError (liveness guard)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None  # page still navigating: its context is not there yet
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"page never satisfied {expression!r} (last value {value!r})")

    def screenshot_png(self) -> bytes:
        """PNG bytes of the viewport."""
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

"""The progress display of a running scan: rate, position in the scan and counters, on one line.

On a terminal the line is rewritten in place (``\\r``) at most ``refresh_s`` apart; when the stream
is not a terminal (a log file, CI) a plain line is written every ``every_s`` seconds instead, so logs
stay readable. ``enabled=False`` (``--quiet``) writes nothing. The display only formats numbers it
is given: calling :meth:`ProgressDisplay.update` costs microseconds and never blocks the scan.

Examples
--------
>>> import io
>>> out = io.StringIO()
>>> p = ProgressDisplay(total=100, scan_shape=(10, 10), stream=out, every_s=0.0)
>>> p.update(42, {"dropped": 0, "flags active": 1}, now=p.t0 + 2.0)
>>> print(out.getvalue().strip())
scan 42/100 (42.0 %) row 4 col 1 | 21.0 frames/s | dropped 0 | flags active 1
>>> p.update(50, now=p.t0 + 4.0)
>>> p.close(now=p.t0 + 5.0)
>>> print(out.getvalue().splitlines()[-1])
scan 50/100 (50.0 %) row 4 col 9 | 12.5 frames/s | dropped 0 | flags active 1
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import IO, Any

__all__ = ["ProgressDisplay", "format_progress"]


def format_progress(done: int, total: int, scan_shape: tuple[int, int] | None, rate: float | None,
                    counters: Mapping[str, Any] | None = None) -> str:
    """One progress line: ``scan done/total (pct) row r col c | rate | counter value | ...``.

    ``row``/``col`` are those of the latest position reached (0-based, raster order).

    >>> format_progress(5, 8, (2, 4), 1234.5, {"missing spectra": 2})
    'scan 5/8 (62.5 %) row 1 col 0 | 1234 frames/s | missing spectra 2'
    """
    pct = 100.0 * done / total if total else 0.0
    parts = [f"scan {done}/{total} ({pct:.1f} %)"]
    if scan_shape is not None and done > 0:
        nx = int(scan_shape[1])
        last = min(done, total) - 1
        parts[0] += f" row {last // nx} col {last % nx}"
    if rate is not None:
        parts.append(f"{rate:.1f} frames/s" if rate < 100 else f"{rate:.0f} frames/s")
    for key, value in (counters or {}).items():
        parts.append(f"{key} {value}")
    return " | ".join(parts)


class ProgressDisplay:
    """Show a scan's progress on ``stream`` (stderr by default).

    Parameters
    ----------
    total : int
        Positions in the scan.
    scan_shape : (ny, nx), optional
        For the row/column of the latest position.
    stream : file, optional
        Default ``sys.stderr``.
    enabled : bool, default True
        False writes nothing (``--quiet``).
    tty : bool, optional
        Rewrite one line in place; default: whether ``stream`` is a terminal.
    refresh_s : float, default 0.1
        Shortest time between rewrites of the terminal line.
    every_s : float, default 5.0
        Time between plain lines when not on a terminal.
    """

    def __init__(self, total: int, scan_shape: tuple[int, int] | None = None, *, stream: IO[str] | None = None,
                 enabled: bool = True, tty: bool | None = None, refresh_s: float = 0.1,
                 every_s: float = 5.0) -> None:
        self.total = int(total)
        self.scan_shape = None if scan_shape is None else tuple(int(v) for v in scan_shape)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(enabled)
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if isatty is not None else False
        self.tty = tty
        self.refresh_s = float(refresh_s)
        self.every_s = float(every_s)
        self.t0 = time.monotonic()
        self.done = 0
        self.counters: dict[str, Any] = {}
        self._last_write = -float("inf")
        self._written_done = -1
        self._width = 0
        self._closed = False

    def start(self, now: float | None = None) -> None:
        """Restart the rate's clock (call when data starts to flow, after any warm-up)."""
        self.t0 = time.monotonic() if now is None else now

    @property
    def interval_s(self) -> float:
        return self.refresh_s if self.tty else self.every_s

    def rate(self, now: float | None = None) -> float | None:
        """Positions a second since the display started (None before any time has passed)."""
        dt = (time.monotonic() if now is None else now) - self.t0
        return self.done / dt if dt > 0 else None

    def update(self, done: int, counters: Mapping[str, Any] | None = None, *, now: float | None = None) -> None:
        """Record progress; writes when the last write is at least :attr:`interval_s` old."""
        self.done = int(done)
        if counters is not None:
            self.counters = dict(counters)
        if not self.enabled or self._closed:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_write >= self.interval_s:
            self._write(now)

    def _write(self, now: float) -> None:
        line = format_progress(self.done, self.total, self.scan_shape, self.rate(now), self.counters)
        self._last_write = now
        self._written_done = self.done
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, *, now: float | None = None) -> None:
        """Write the final state (and end the terminal line)."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self.done != self._written_done or self.tty:
            self._write(time.monotonic() if now is None else now)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

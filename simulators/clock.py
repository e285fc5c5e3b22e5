"""One scan clock shared by every simulated instrument of a microscope.

A real 4D-STEM scan is driven by the scan generator: every detector (Merlin, EDS) records the same
position during the same dwell. The simulators model that with one :class:`ScanClock`: the Merlin
server arms and triggers it (as ``STARTACQUISITION``/``SOFTTRIGGER`` would), and every simulated
instrument waits on it to know when position ``i`` has been acquired.

With ``dwell_s=0`` the clock runs "as fast as possible": every position is due at once and each
instrument goes at its own speed, which is what tests and benchmarks want.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

__all__ = ["ScanClock", "ScanRun"]


@dataclass(frozen=True)
class ScanRun:
    """One triggered scan: which run, how many positions, and when each one is due."""

    run_id: int
    n_positions: int
    dwell_s: float
    t0: float  # time.monotonic() of the trigger

    def due(self, position: int) -> float:
        """Monotonic time at which ``position`` (0-based) has finished its dwell."""
        return self.t0 + (position + 1) * self.dwell_s


class ScanClock:
    """Arm/trigger/abort state of a simulated scan, observable from several threads.

    Examples
    --------
    >>> clock = ScanClock()
    >>> clock.arm(n_positions=4, dwell_s=0.0)
    >>> run = clock.trigger()
    >>> clock.wait_for(run, 3, timeout=1.0)
    True
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: tuple[int, float] | None = None
        self._run: ScanRun | None = None
        self._aborted_run_id: int | None = None
        self._next_id = 1

    def arm(self, n_positions: int, dwell_s: float) -> None:
        """Prepare a scan of ``n_positions`` at ``dwell_s`` seconds each (0 = as fast as possible)."""
        if n_positions < 0 or dwell_s < 0:
            raise ValueError("n_positions and dwell_s must be >= 0")
        with self._cond:
            self._armed = (int(n_positions), float(dwell_s))

    def trigger(self) -> ScanRun:
        """Start the armed scan now; every waiting instrument wakes up."""
        with self._cond:
            if self._armed is None:
                raise RuntimeError("trigger before arm")
            n, dwell = self._armed
            self._armed = None
            self._run = ScanRun(self._next_id, n, dwell, time.monotonic())
            self._next_id += 1
            self._cond.notify_all()
            return self._run

    def abort(self) -> None:
        """Stop the current scan; :meth:`wait_for` returns False for it from now on."""
        with self._cond:
            if self._run is not None:
                self._aborted_run_id = self._run.run_id
            self._armed = None
            self._cond.notify_all()

    def is_aborted(self, run: ScanRun) -> bool:
        with self._cond:
            return self._aborted_run_id == run.run_id

    def wait_for_run(self, after_run_id: int = 0, timeout: float | None = None) -> ScanRun | None:
        """Block until a scan with ``run_id > after_run_id`` is triggered; None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._run is None or self._run.run_id <= after_run_id:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._run

    def wait_for(self, run: ScanRun, position: int, timeout: float | None = None) -> bool:
        """Block until ``position`` of ``run`` is acquired. False if the run was aborted or timed out."""
        due = run.due(position)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._aborted_run_id == run.run_id:
                    return False
                now = time.monotonic()
                if now >= due:
                    return True
                wait = due - now
                if deadline is not None:
                    if now >= deadline:
                        return False
                    wait = min(wait, deadline - now)
                # Condition.wait wakes early on abort; otherwise sleeps until the position is due.
                self._cond.wait(wait)

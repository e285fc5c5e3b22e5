"""The lifecycle every socket-owning background thread shares: start, wait until bound, stop, re-raise.

ZeroMQ sockets belong to the thread that made them, so each publisher, bridge and server here runs
its socket in one daemon thread. This mixin gives them one start/stop/error contract instead of
a copy each. A subclass sets :attr:`_thread_name` and :attr:`_what`, creates ``self._stop`` and
``self._listening`` (``threading.Event``) in ``__init__``, and implements ``_run``; ``_run`` stores
any exception in ``self._error`` and sets ``self._listening`` once bound (or on failure).
"""

from __future__ import annotations

import threading

__all__ = ["BackgroundSocketThread"]


class BackgroundSocketThread:
    """Mixin: one daemon thread owning a socket, with a bounded stop and error re-raising."""

    _thread_name = "streamclust-worker"
    _what = "background thread"
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def start(self):
        if self._thread is not None:
            raise RuntimeError(f"{self._what} already started")
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()
        return self

    def wait_for_listen(self, timeout: float = 10.0):
        """Block until the socket is bound; return the bound endpoint (with its real port)."""
        if not self._listening.wait(timeout):
            self._raise_error()
            raise TimeoutError(f"{self._what} did not bind within {timeout} s")
        self._raise_error()
        return self.endpoint

    def _join(self, timeout: float) -> None:
        """Signal the thread to stop, wait at most ``timeout`` s, then re-raise its error."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"{self._what} did not stop within {timeout} s")
        self._raise_error()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close its socket; re-raise an error of the thread."""
        self._join(timeout)

    def __enter__(self):
        self.start()
        self.wait_for_listen()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _raise_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"{self._what} failed") from err

"""The Merlin receiver's buffers: the ring of frame slots between the reader thread and the
consumer, and the pool of image arrays the consumer decodes into.

Neither allocates per frame: the ring is one byte array of frame-sized slots that the reader fills
with ``recv_into`` and the consumer hands back; the pool recycles image arrays nobody references.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

from streamclust.adapters.framing import MPX_PREFIX_SIZE

__all__ = ["FrameRing", "ImagePool", "ReaderStopped", "POLL_S"]

#: longest wait (seconds) of the reader thread before it checks whether it should stop
POLL_S = 0.2
_NEVER = 1 << 62


class ReaderStopped(Exception):
    """The receiver is closing: the reader thread stops where it waits."""


class FrameRing:
    """Frame-sized slots, back to back, used first-in first-out (one message geometry).

    The reader takes runs of contiguous free slots so that one ``recv_into`` can fill several
    small frames; slots are handed back (:meth:`release`) in any order and reclaimed in order.
    """

    def __init__(self, n_slots: int, msg_size: int, header_size: int):
        self.buf = np.empty(n_slots * msg_size, np.uint8)
        self.scratch = np.empty(msg_size, np.uint8)
        self.msg_size = msg_size
        self.header_size = header_size
        self.n_slots = n_slots
        self._done = [False] * n_slots
        self._w = 0  # slots handed out so far (monotonic)
        self._r = 0  # slots reclaimed so far (monotonic)
        self._released = 0  # slots released so far (monotonic; written by the consumer only)
        self._wake_at = _NEVER  # while the reader waits: wake it when _released reaches this
        self._space = threading.Event()

    def acquire_run(self, max_k: int, block: bool, stop: threading.Event, min_k: int = 1) -> tuple[int, int]:
        """Return ``(first_slot, k)``: up to ``max_k`` contiguous free slots (k = 0: none, not blocking).

        Blocking, it waits for ``min_k`` of them (fewer where the ring wraps): when the consumer
        is the bottleneck the ring is full, and taking each slot as soon as it is freed would
        mean one ``recv_into``, one wake-up of each thread and one GIL hand-over a frame; taking
        them in runs turns that into one per run.
        """
        n = self.n_slots
        while True:
            done = self._done
            while self._r < self._w and done[self._r % n]:
                done[self._r % n] = False
                self._r += 1
            free = n - (self._w - self._r)
            first = self._w % n
            k = min(max_k, free, n - first)
            if not block or k >= max(1, min(min_k, max_k, n - first)):
                self._wake_at = _NEVER
                return first, k
            self._space.clear()
            # wake after enough further releases; if a slot released out of order waits behind
            # the head, the next release may free the whole run: wake at once then
            stuck = self._released > self._r
            self._wake_at = self._released + (1 if stuck else max(1, min(min_k, max_k, n - first) - k))
            # re-check after clear: a release may have happened in between
            if done[self._r % n] and (stuck or min_k <= 1):
                continue
            if not self._space.wait(POLL_S) and stop.is_set():
                raise ReaderStopped()

    def commit(self, k: int = 1) -> None:
        """The next ``k`` slots of the run now belong to frames (held, queued or released)."""
        self._w += k

    def release(self, slot: int) -> None:
        """The consumer is done with ``slot`` (only the consumer thread calls this)."""
        self._done[slot] = True
        self._released += 1
        if self._released >= self._wake_at:
            self._space.set()

    def release_own(self, slot: int) -> None:
        """The reader gives back a slot it never handed over (it never waits on itself)."""
        self._done[slot] = True

    def array(self, slot: int | None, k: int = 1) -> np.ndarray:
        """Slots ``slot .. slot + k - 1`` as one byte array (None: the scratch slot)."""
        if slot is None:
            return self.scratch
        start = slot * self.msg_size
        return self.buf[start:start + k * self.msg_size]

    def view(self, slot: int | None, k: int = 1) -> memoryview:
        return memoryview(self.array(slot, k))

    def pixels(self, slot: int) -> np.ndarray:
        start = slot * self.msg_size + MPX_PREFIX_SIZE + self.header_size
        return self.buf[start:(slot + 1) * self.msg_size]

    def header_bytes(self, slot: int) -> bytes:
        start = slot * self.msg_size + MPX_PREFIX_SIZE
        return self.buf[start:start + self.header_size].tobytes()



class ImagePool:
    """Recycle image arrays the caller no longer references.

    A fresh 512x512 image per frame costs an mmap, page faults and zeroing in the kernel: about as
    much as decoding it. An array whose only reference is this pool (nobody kept the image, nor a
    view of it) is handed out again; otherwise a new one is made (the pool keeps at most ``size``).
    """

    def __init__(self, shape: tuple[int, int], dtype: np.dtype, size: int = 16):
        self.shape, self.dtype, self.size = shape, dtype, size
        self._arrays: list[np.ndarray] = []

    def get(self) -> np.ndarray:
        for a in self._arrays:
            # references: the list, the loop variable, getrefcount's argument
            if sys.getrefcount(a) == 3:
                return a
        a = np.empty(self.shape, self.dtype)
        if len(self._arrays) < self.size:
            self._arrays.append(a)
        return a


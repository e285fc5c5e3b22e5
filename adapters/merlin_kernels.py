"""Numba kernel that checks a run of received Merlin frame messages at once, with its Python twin.

Once an acquisition's first frame has been parsed carefully, every later frame message has the
same size, the same ``MPX,<length>,`` prefix and the same MQ1 geometry fields; only the sequence
number (and the time stamps after the geometry) change. The live receiver reads many such messages
with one ``recv_into``; :func:`scan_frames` then confirms, in one call instead of a Python parse a
frame, that each one is such a regular message and extracts its sequence number. The first one
that is not (a corrupt prefix, another geometry, a non-digit sequence, a truncated frame whose
successor starts early) stops the scan: the receiver hands it to its careful path, which names it
by byte offset and sequence and counts it.

A message is regular when, as the receiver's Python check has it:

* its first 15 bytes equal ``prefix`` (``MPX,<10 digits>,``);
* it continues with ``MQ1,``, then 1 to :data:`MAX_SEQUENCE_DIGITS` ASCII digits and a comma;
* then come exactly the bytes ``geometry`` followed by a comma (MQ1 fields 2-8, the size, chip
  count, width, height, pixel type, chip layout and chip select, with their separators);
* and that comma lies within the first 64 bytes after the prefix.

:func:`scan_frames_python` is the reference twin the tests compare the kernel against.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["MAX_SEQUENCE_DIGITS", "scan_frames", "scan_frames_python"]

#: longest sequence field a regular message may have (more digits: the careful path decides)
MAX_SEQUENCE_DIGITS = 18
#: the geometry's closing comma must lie within this many bytes after the MPX prefix
_HEAD_WINDOW = 64
_COMMA = 44
_ZERO = 48
_NINE = 57


@njit(cache=True, nogil=True)
def scan_frames(buf, n_msgs, msg_size, prefix, geometry, seqs):  # pragma: no cover - JIT
    """Check ``n_msgs`` messages of ``msg_size`` bytes laid back to back in ``buf``.

    Parameters
    ----------
    buf : uint8[:]
        The received bytes; message ``i`` starts at ``i * msg_size``.
    n_msgs : int
        Messages to check (``n_msgs * msg_size <= buf.size``).
    msg_size : int
        Bytes of one message, MPX prefix included.
    prefix : uint8[:]
        The acquisition's MPX prefix (15 bytes).
    geometry : uint8[:]
        MQ1 fields 2-8 of the acquisition's first frame, comma separated.
    seqs : int64[:]
        Receives the sequence number of each regular message (at least ``n_msgs`` long).

    Returns
    -------
    int
        How many messages, from the first, are regular (``n_msgs`` when all are).
    """
    p_len = prefix.shape[0]
    g_len = geometry.shape[0]
    size = buf.shape[0]
    for i in range(n_msgs):
        base = i * msg_size
        # every byte looked at lies in the prefix and the _HEAD_WINDOW bytes after it
        lim = min(base + p_len + _HEAD_WINDOW, size)
        h = base + p_len
        if h + 4 > lim:
            return i
        for j in range(p_len):
            if buf[base + j] != prefix[j]:
                return i
        if buf[h] != 77 or buf[h + 1] != 81 or buf[h + 2] != 49 or buf[h + 3] != _COMMA:  # "MQ1,"
            return i
        q = h + 4
        seq = 0
        nd = 0
        while nd <= MAX_SEQUENCE_DIGITS and q < lim:
            c = buf[q]
            if c < _ZERO or c > _NINE:
                break
            seq = seq * 10 + (c - _ZERO)
            nd += 1
            q += 1
        if nd == 0 or nd > MAX_SEQUENCE_DIGITS or q >= lim or buf[q] != _COMMA:
            return i
        q += 1
        end = q + g_len  # where the comma closing the geometry must be
        if end >= lim:
            return i
        for j in range(g_len):
            if buf[q + j] != geometry[j]:
                return i
        if buf[end] != _COMMA:
            return i
        seqs[i] = seq
    return n_msgs


def scan_frames_python(buf, n_msgs: int, msg_size: int, prefix: bytes, geometry: bytes, seqs) -> int:
    """Python twin of :func:`scan_frames` (the receiver's former per-frame check).

    Examples
    --------
    >>> payload = b"MQ1,000007,00384,04,0512,0512,R64,2x2,0F,rest"
    >>> msg = b"MPX,%010d," % len(payload) + payload
    >>> other = msg.replace(b"R64", b"U16")  # another pixel type at the same size
    >>> seqs = np.zeros(2, np.int64)
    >>> scan_frames_python(msg + other, 2, len(msg), msg[:15], b"00384,04,0512,0512,R64,2x2,0F", seqs)
    1
    >>> int(seqs[0])
    7
    """
    buf = bytes(buf)
    p_len = len(prefix)
    for i in range(n_msgs):
        base = i * msg_size
        head = buf[base:base + p_len + _HEAD_WINDOW]
        fields = head[p_len:].split(b",", 9)
        if (head[:p_len] != prefix or fields[0] != b"MQ1" or len(fields) != 10
                or b",".join(fields[2:9]) != geometry or not fields[1].isdigit()
                or not 1 <= len(fields[1]) <= MAX_SEQUENCE_DIGITS or not fields[1].isascii()):
            return i
        seqs[i] = int(fields[1])
    return n_msgs

"""One live scan's ingest: a Merlin receiver and an EDS receiver joined by scan position.

This is the glue between the adapters and the engine: it connects to the detector's data port and
to the EDS stream, joins frames and spectra by scan position (``position = sequence - 1``) and hands
batches to a callback. Every frame and spectrum ends up in a batch or in a counter with its reason;
:class:`IngestReport` gathers those counters so they can go into every result.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from streamclust.adapters.eds import SpectrumReceiver
from streamclust.adapters.join import Batch, join_streams
from streamclust.adapters.merlin import MerlinReceiver
from streamclust.adapters.merlin_control import MerlinControl

logger = logging.getLogger(__name__)

__all__ = ["IngestReport", "acquire_scan"]


#: join counters of frames that never reach a batch, whatever ``on_missing`` is
_JOIN_FRAME_DROPS = ("duplicate_frames", "out_of_range_frames", "rejected_frames", "pending_frames")
#: join counters of frames whose spectrum never came: in a batch with "emit", dropped with "drop"
_JOIN_FRAME_ALONE = ("expired_frames", "evicted_frames", "late_frames", "flushed_frames")


@dataclass
class IngestReport:
    """Counters of one scan's ingest, for summaries and results files.

    ``complete`` is True only when the detector delivered its whole frame count and the scan was
    not stopped; ``ended_by`` says how the Merlin acquisition ended (``last_frame``, ``timeout``,
    ``connection_lost``, ``new_header``, ``consumer_stopped``, ``stopped``, or None when no
    acquisition header came at all). :meth:`frame_account` splits every frame that reached the
    receiver into "in a batch" and "dropped, by reason".
    """

    n_positions: int
    elapsed_s: float = 0.0
    batches: int = 0
    positions_delivered: int = 0
    merlin: dict = field(default_factory=dict)
    eds: dict = field(default_factory=dict)
    join: dict = field(default_factory=dict)
    complete: bool = False
    #: batch rows that hold a real frame / a real spectrum (what the analysis was given)
    frames_delivered: int = 0
    spectra_delivered: int = 0
    ended_by: str | None = None
    on_missing: str = "emit"
    #: True when the caller's ``stop`` event ended the scan
    stopped: bool = False

    @property
    def frames_received(self) -> int:
        return int(self.merlin.get("frames_received", 0))

    @property
    def frames_dropped(self) -> int:
        return sum(self.frame_account()["dropped"].values())

    @property
    def partial(self) -> bool:
        """The scan ended short (fewer frames than the header announced, a lost connection, a stop)."""
        return not self.complete

    def frame_account(self) -> dict:
        """Where every frame that reached the receiver went.

        Returns ``{"delivered": n, "dropped": {reason: n}, "total": n}``. Merlin-side reasons are
        the receiver's (``truncated``, ``bad_header``, ``ring_full``, ``after_acquisition_end``...);
        join-side reasons carry a ``join_`` prefix (``join_duplicate_frames``...). ``total`` equals
        the frame messages the detector put on the wire (damaged ones included) whenever the
        receiver read the stream to its end (not with ``stop``: frames still in flight then are
        only counted as far as they got).
        """
        dropped = {str(k): int(v) for k, v in self.merlin.get("dropped", {}).items() if v}
        kinds = _JOIN_FRAME_DROPS + (_JOIN_FRAME_ALONE if self.on_missing == "drop" else ())
        for key in kinds:
            n = int(self.join.get(key, 0))
            if n:
                dropped[f"join_{key}"] = n
        # decoded but never given to the joiner (the scan was stopped with frames in flight)
        unjoined = int(self.merlin.get("frames_decoded", 0)) - int(self.join.get("frames_in", 0))
        if unjoined > 0:
            dropped["stopped_in_flight"] = unjoined
        delivered = self.frames_delivered
        return {"delivered": delivered, "dropped": dropped, "total": delivered + sum(dropped.values())}

    def as_dict(self) -> dict:
        return {
            "n_positions": self.n_positions,
            "elapsed_s": self.elapsed_s,
            "batches": self.batches,
            "positions_delivered": self.positions_delivered,
            "frames_delivered": self.frames_delivered,
            "spectra_delivered": self.spectra_delivered,
            "complete": self.complete,
            "partial": self.partial,
            "ended_by": self.ended_by,
            "stopped": self.stopped,
            "frame_account": self.frame_account(),
            "merlin": self.merlin,
            "eds": self.eds,
            "join": self.join,
        }


def acquire_scan(
    merlin_address: tuple[str, int],
    eds_endpoint: str,
    n_positions: int,
    on_batch: Callable[[Batch], None],
    *,
    eds_socket_type: str = "pull",
    timeout_s: float = 10.0,
    batch_size: int = 256,
    join_timeout_s: float = 2.0,
    on_missing: str = "emit",
    max_pending: int = 2048,
    max_pending_spectra: int = 65536,
    queue_size: int = 256,
    on_full: str = "block",
    ring_slots: int = 64,
    control_port: int | None = None,
    arm: bool = False,
    eds_security=None,
    stop: threading.Event | None = None,
) -> IngestReport:
    """Receive one scan and call ``on_batch`` for every joined batch, in arrival order.

    Every call opens its own connections and closes them (threads and sockets included) before it
    returns, so a long session is a loop of calls; a dropped connection only ends the scan it
    belonged to (the report says ``complete=False``, ``ended_by="connection_lost"``).

    Parameters
    ----------
    merlin_address : (host, port)
        The Merlin data port.
    eds_endpoint : str
        The EDS ZeroMQ endpoint (connected to).
    n_positions : int
        Scan positions (ScanX * ScanY); positions outside are counted and dropped by the joiner.
    on_batch : callable
        Called from this thread with each :class:`~streamclust.adapters.join.Batch`.
    timeout_s : float
        Longest silence on either stream before the scan is declared incomplete.
    on_missing : {"emit", "drop"}
        A frame whose spectrum never arrives (or the reverse): deliver it with the missing half
        marked in the batch masks (default: no frame is wasted), or drop it; counted either way.
    max_pending : int
        Unpaired frames held while the EDS stream runs behind (0.5 MiB each at quad 12-bit: the
        default holds at most 1 GiB, 4 s of a 2 ms scan). Beyond it the oldest is handed on
        unpaired, counted.
    max_pending_spectra : int
        Unpaired spectra held while the frame stream runs behind (4 KiB each at 2,048 channels:
        256 MiB, 131 s of a 2 ms scan). Beyond it the oldest is handed on unpaired, counted.
    queue_size : int
        Items between the receiving threads and the joiner. With ``ring_slots`` and
        ``batch_size`` it bounds the frames held while ``on_batch`` is slow.
    on_full : {"block", "drop"}
        A slow consumer: hold the detector back by TCP back-pressure (lossless, default) or drop
        frames at the receiver and count them (``ring_full``).
    ring_slots : int
        Frame slots of the Merlin receiver.
    control_port : int, optional
        The Merlin control port; with ``arm`` the acquisition is started there
        (``CMD,STARTACQUISITION``) once the data port is connected.
    eds_security : CurveClient, optional
        CURVE keys for a remote EDS publisher (:mod:`streamclust.adapters.security`).
    stop : threading.Event, optional
        Set from another thread to end the scan after the current batch (``stopped=True``).

    Notes
    -----
    Memory: at most ``ring_slots + queue_size + max_pending + 2 * batch_size + 16`` frames are held at any
    time (ring, hand-over queue, unpaired store, the batch being filled and the one being analysed,
    the receiver's image pool), however slow ``on_batch`` is: a slow consumer holds the detector
    back (``on_full="block"``) or loses frames, counted (``"drop"``), never memory.
    """
    if arm and control_port is None:
        raise ValueError("arm=True needs the Merlin control_port")
    report = IngestReport(n_positions=n_positions, on_missing=on_missing)
    t0 = time.perf_counter()
    # The EDS receiver connects first: PUSH/PULL is lossless only once the peer is there.
    eds = SpectrumReceiver(eds_endpoint, socket_type=eds_socket_type, security=eds_security)
    eds.start()
    stream = None
    try:
        with MerlinReceiver(*merlin_address, timeout=timeout_s, on_full=on_full, ring_slots=ring_slots) as rx:
            try:
                if arm:
                    with MerlinControl(merlin_address[0], control_port, timeout=timeout_s) as ctl:
                        ctl.start_acquisition()
                    logger.info("STARTACQUISITION sent to %s:%d", merlin_address[0], control_port)
                stream = join_streams(
                    rx.frames(timeout=timeout_s),
                    eds.spectra(timeout=timeout_s),
                    n_positions,
                    batch_size=batch_size,
                    timeout_s=join_timeout_s,
                    on_missing=on_missing,
                    max_pending=max_pending,
                    max_pending_spectra=max_pending_spectra,
                    queue_size=queue_size,
                )
                batches = iter(stream)
                for batch in batches:
                    report.batches += 1
                    report.positions_delivered += len(batch.positions)
                    report.frames_delivered += int(np.count_nonzero(batch.has_frame))
                    report.spectra_delivered += int(np.count_nonzero(batch.has_spectrum))
                    on_batch(batch)
                    if stop is not None and stop.is_set():
                        report.stopped = True
                        logger.warning("scan stopped on request after %d positions", report.positions_delivered)
                        break
            finally:
                if stream is not None and report.stopped:
                    batches.close()  # stops the joiner's threads now, not at garbage collection
                report.merlin = rx.stats.as_dict()
                report.ended_by = "stopped" if report.stopped else rx.stats.ended_by
                report.complete = bool(rx.stats.complete) and not report.stopped
        report.join = dict(stream.stats) if stream is not None else {}
    finally:
        eds.stop()
        report.eds = dict(eds.stats)
        report.elapsed_s = time.perf_counter() - t0
    if report.complete:
        logger.info("scan ingest done: %d positions in %.2f s (%d batches)",
                    report.positions_delivered, report.elapsed_s, report.batches)
    else:
        account = report.frame_account()
        logger.warning("scan ingest PARTIAL (%s): %d of %d positions, frames delivered %d, dropped %s",
                       report.ended_by, report.positions_delivered, n_positions, account["delivered"],
                       account["dropped"] or "none")
    return report


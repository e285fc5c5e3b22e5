"""One live scan's ingest: a Merlin receiver and an EDS receiver joined by scan position.

This is the glue between the adapters and the engine: it connects to the detector's data port and
to the EDS stream, joins frames and spectra by scan position (``position = sequence - 1``) and hands
batches to a callback. Every frame and spectrum ends up in a batch or in a counter with its reason;
:class:`IngestReport` gathers those counters so they can go into every result.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from streamclust.adapters.eds import SpectrumReceiver
from streamclust.adapters.join import Batch, join_streams
from streamclust.adapters.merlin import MerlinReceiver

logger = logging.getLogger(__name__)

__all__ = ["IngestReport", "acquire_scan"]


@dataclass
class IngestReport:
    """Counters of one scan's ingest, for summaries and results files."""

    n_positions: int
    elapsed_s: float = 0.0
    batches: int = 0
    positions_delivered: int = 0
    merlin: dict = field(default_factory=dict)
    eds: dict = field(default_factory=dict)
    join: dict = field(default_factory=dict)
    complete: bool = False

    @property
    def frames_received(self) -> int:
        return int(self.merlin.get("frames_received", 0))

    @property
    def frames_dropped(self) -> int:
        return int(self.merlin.get("frames_dropped", 0)) + int(self.join.get("frames_without_spectrum", 0))

    def as_dict(self) -> dict:
        return {
            "n_positions": self.n_positions,
            "elapsed_s": self.elapsed_s,
            "batches": self.batches,
            "positions_delivered": self.positions_delivered,
            "complete": self.complete,
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
    max_pending: int = 8192,
) -> IngestReport:
    """Receive one scan and call ``on_batch`` for every joined batch, in arrival order.

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
        Unpaired items held while one stream runs ahead of the other (spectra are small; frames
        are 0.5 MiB each at quad 12-bit). Beyond it the oldest is handed on unpaired, counted.
    """
    report = IngestReport(n_positions=n_positions)
    t0 = time.perf_counter()
    # The EDS receiver connects first: PUSH/PULL is lossless only once the peer is there.
    eds = SpectrumReceiver(eds_endpoint, socket_type=eds_socket_type)
    eds.start()
    try:
        with MerlinReceiver(*merlin_address, timeout=timeout_s) as rx:
            stream = join_streams(
                rx.frames(timeout=timeout_s),
                eds.spectra(timeout=timeout_s),
                n_positions,
                batch_size=batch_size,
                timeout_s=join_timeout_s,
                on_missing=on_missing,
                max_pending=max_pending,
            )
            for batch in stream:
                report.batches += 1
                report.positions_delivered += len(batch.positions)
                on_batch(batch)
            report.merlin = rx.stats.as_dict()
            report.complete = bool(rx.stats.complete)
        report.join = dict(stream.stats)
    finally:
        eds.stop()
        report.eds = dict(eds.stats)
        report.elapsed_s = time.perf_counter() - t0
    logger.info("scan ingest done: %d positions in %.2f s (%d batches)",
                report.positions_delivered, report.elapsed_s, report.batches)
    return report

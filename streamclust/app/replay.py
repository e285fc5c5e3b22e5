"""Replay a recorded scan (Merlin ``.mib`` + EDS recording) through the live pipeline, as fast as it goes.

The recording is read with :class:`~streamclust.adapters.mib.MibFile` (memory-mapped, one frame
decoded at a time into the batch) and :func:`~streamclust.adapters.eds_file.read_eds_recording`,
turned into the same :class:`~streamclust.adapters.join.Batch` objects the live joiner makes, and
fed to the same :class:`~streamclust.app.run.ScanSession` as ``streamclust run``.

Why the result equals the live one: on a lossless scan both streams arrive in raster order, so the
joiner completes positions in raster order and cuts batches of ``[scan] batch_size`` consecutive
positions; :func:`iter_batches` cuts exactly those batches. The engine's result depends on batch
boundaries (mini-batch FCM steps and refresh points are taken per batch), hence the same batch
size is not a detail (tests/test_replay.py checks equality against a live scan of the same data).

A recording with holes is replayed as the live joiner would hand it out with ``on_missing="emit"``:
frames without a spectrum are analysed with the frame alone; spectra whose frame is missing come
last, alone. Frames whose sequence lies outside the scan, or repeats one already read, are
counted and skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streamclust.adapters.join import Batch
from streamclust.app.config import Config, load_config
from streamclust.app.progress import ProgressDisplay
from streamclust.distributed.replay_config import ReplayConfig

logger = logging.getLogger(__name__)

__all__ = ["ReplayStats", "iter_batches", "replay_scan", "dask_config"]


@dataclass
class ReplayStats:
    """Counters of one replay (what the joiner would have counted)."""

    frames_in: int = 0
    spectra_in: int = 0
    joined: int = 0
    frames_without_spectrum: int = 0
    spectra_without_frame: int = 0
    duplicate_frames: int = 0
    out_of_range_frames: int = 0
    batches: int = 0
    errors: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def iter_batches(mib, spectra: np.ndarray, acquired: np.ndarray, *, batch_size: int = 256,
                 on_missing: str = "emit", stats: ReplayStats | None = None) -> Iterator[Batch]:
    """Batches of a recording in the order the live joiner would hand them out.

    Parameters
    ----------
    mib : MibFile
        Open recording; frame ``i`` belongs to position ``sequence - 1``.
    spectra : ndarray (n_positions, channels)
    acquired : ndarray of bool (n_positions,)
        False where the recording holds no spectrum.
    batch_size : int
    on_missing : {"emit", "drop"}
    stats : ReplayStats, optional
        Filled as the batches are made.

    Examples
    --------
    >>> import os, tempfile
    >>> from streamclust.adapters.mib import MibFile
    >>> from streamclust.adapters.eds_file import read_eds_recording
    >>> from streamclust.simulators.phantom import LamellaPhantom
    >>> from streamclust.simulators.recording import record_scan
    >>> rec = record_scan(LamellaPhantom(scan_shape=(2, 3), seed=0), os.path.join(tempfile.mkdtemp(), "s"))
    >>> eds = read_eds_recording(rec.eds)
    >>> with MibFile(rec.mib) as mib:
    ...     batches = list(iter_batches(mib, eds.flat_spectra, eds.acquired.ravel(), batch_size=4))
    >>> [b.positions.tolist() for b in batches], bool(batches[0].has_spectrum.all())
    ([[0, 1, 2, 3], [4, 5]], True)
    """
    stats = stats if stats is not None else ReplayStats()
    n = int(spectra.shape[0])
    acquired = np.asarray(acquired, bool).ravel()
    if acquired.shape != (n,):
        raise ValueError(f"acquired has {acquired.size} entries for {n} spectra")
    stats.spectra_in = int(acquired.sum())
    h, w = mib.image_shape
    seen = np.zeros(n, bool)
    rows_pos: list[int] = []
    rows_idx: list[int] = []

    def make(pos_list, idx_list) -> Batch:
        k = len(pos_list)
        positions = np.asarray(pos_list, np.int64)
        has_frame = np.asarray([i >= 0 for i in idx_list], bool)
        has_spectrum = acquired[positions].copy()
        if on_missing == "drop":
            keep = has_frame & has_spectrum
            positions, has_frame, has_spectrum = positions[keep], has_frame[keep], has_spectrum[keep]
            idx_list = [i for i, kp in zip(idx_list, keep) if kp]
            k = len(positions)
        alloc = np.empty if has_frame.all() else np.zeros
        frames = alloc((k, h, w), mib.image_dtype)
        for j, i in enumerate(idx_list):
            if i >= 0:
                mib.frame(i, out=frames[j])
        batch_spectra = spectra[positions].copy()
        batch_spectra[~has_spectrum] = 0
        stats.batches += 1
        return Batch(positions, frames, batch_spectra, has_frame, has_spectrum)

    for i in range(len(mib)):
        stats.frames_in += 1
        pos = mib.header(i).sequence - 1
        if not 0 <= pos < n:
            stats.out_of_range_frames += 1
            continue
        if seen[pos]:
            stats.duplicate_frames += 1
            continue
        seen[pos] = True
        if acquired[pos]:
            stats.joined += 1
        else:
            stats.frames_without_spectrum += 1
            if on_missing == "drop":
                continue
        rows_pos.append(pos)
        rows_idx.append(i)
        if len(rows_pos) == batch_size:
            yield make(rows_pos, rows_idx)
            rows_pos, rows_idx = [], []
    alone = np.flatnonzero(acquired & ~seen)
    stats.spectra_without_frame = int(alone.size)
    if on_missing == "emit":
        for pos in alone.tolist():
            rows_pos.append(pos)
            rows_idx.append(-1)
            if len(rows_pos) == batch_size:
                yield make(rows_pos, rows_idx)
                rows_pos, rows_idx = [], []
    if rows_pos:
        yield make(rows_pos, rows_idx)


def _scan_shape(mib, eds, mib_path) -> tuple[int, int]:
    shape = tuple(int(v) for v in eds.spectra.shape[:2])
    hdr = mib.acquisition_header
    hdr_shape = hdr.scan_shape if hdr is not None else None
    if hdr_shape is not None and int(np.prod(hdr_shape)) != shape[0] * shape[1]:
        raise ValueError(f"{mib_path}: acquisition header scan shape {hdr_shape} and the EDS recording's "
                         f"{shape} differ")
    return shape


def replay_scan(mib_path: str | Path, eds_path: str | Path, out_dir: str | Path, *,
                config: Config | None = None, progress: ProgressDisplay | None = None, liveview=None,
                scan_id: str | None = None, session_factory=None) -> dict:
    """Replay a recording through the live pipeline; write results, pictures and ``summary.json``.

    Parameters
    ----------
    mib_path : path-like
        The Merlin recording (its ``.hdr`` beside it, when present).
    eds_path : path-like
        The EDS recording (docs/wire-formats.md layout).
    out_dir : path-like
    config : Config, optional
        ``[scan] batch_size`` and ``on_missing``, ``[engine]``, ``[centres]``, ``[flags]``,
        ``[events]``; the scan shape comes from the recording.
    progress : ProgressDisplay, optional
    liveview : LiveView, optional
    session_factory : callable, optional
        ``(config, **kwargs) -> ScanSession``-like; default :class:`~streamclust.app.run.ScanSession`.

    Returns
    -------
    dict
        The summary, with ``replay`` counters (see :class:`ReplayStats`) and ``positions_per_s``.
    """
    from streamclust.adapters.eds_file import read_eds_recording
    from streamclust.adapters.mib import MibFile
    from streamclust.app.run import ScanSession

    cfg = config if config is not None else load_config()
    eds = read_eds_recording(eds_path)
    t0 = time.perf_counter()
    with MibFile(mib_path) as mib:
        shape = _scan_shape(mib, eds, mib_path)
        n = shape[0] * shape[1]
        if progress is not None:
            progress.total, progress.scan_shape = n, shape
        factory = session_factory or ScanSession
        session = factory(cfg, scan_shape=shape, frame_shape=mib.image_shape,
                          energy_axis_kev=eds.energy_axis_kev, out_dir=out_dir,
                          scan_id=scan_id or f"replay-{Path(mib_path).stem}", progress=progress,
                          liveview=liveview, events_endpoint=_events_endpoint(cfg), source=str(mib_path))
        session.warm_up()
        stats = ReplayStats()
        try:
            for batch in iter_batches(mib, eds.flat_spectra, eds.acquired.ravel(),
                                      batch_size=cfg.scan.batch_size, on_missing=cfg.scan.on_missing,
                                      stats=stats):
                session.on_batch(batch)
        except BaseException as exc:
            # one line at info; the command line shows the error (and the traceback with -v)
            logger.info("replay of %s aborted (%s: %s)", mib_path, type(exc).__name__, exc)
            session.finish({"replay": stats.as_dict()}, status="aborted")
            raise
    elapsed = time.perf_counter() - t0
    dropped = {k: v for k, v in (("duplicate_frames", stats.duplicate_frames),
                                 ("out_of_range_frames", stats.out_of_range_frames),
                                 ("frames_without_spectrum",
                                  stats.frames_without_spectrum if cfg.scan.on_missing == "drop" else 0)) if v}
    delivered = stats.frames_in - sum(dropped.values())
    report = {"elapsed_s": elapsed, "merlin": {"frames_received": stats.frames_in},
              "frame_account": {"delivered": delivered, "dropped": dropped, "total": stats.frames_in},
              "replay": stats.as_dict(), "source": {"mib": str(mib_path), "eds": str(eds_path)}}
    complete = session.live.n_seen == n
    summary = session.finish(report, status="complete" if complete else "partial")
    summary["positions_per_s"] = round(session.live.n_seen / elapsed, 1) if elapsed else None
    return summary


def _events_endpoint(cfg: Config) -> str | None:
    """A replay binds its event socket on a free port unless one is configured (no clash with a
    live ``streamclust run`` on the same machine)."""
    return None if "events.endpoint" in cfg.explicit else "tcp://127.0.0.1:0"


def dask_config(cfg: Config) -> ReplayConfig:
    """The :func:`streamclust.distributed.dask_replay.replay_dask` configuration matching ``cfg``:
    the engine's, centres' and flagger's parameters as they are (the two-level clustering must be
    the engine's, docs/host-refinement.md), and ``pca_method`` only when set in the configuration
    file (the Dask replay's own default, "auto", picks the exact scatter when it fits, which merges
    exactly across workers)."""
    own = {"pca_method": cfg.engine.pca_method} if "engine.pca_method" in cfg.explicit else {}
    return ReplayConfig.from_params(cfg.engine, cfg.centres, cfg.flags, **own)

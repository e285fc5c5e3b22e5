"""Drift detection: notice when a raster scan enters new material, so the model refreshes early.

A scan crosses layers (substrate, film, caps). Between scheduled refreshes the engine assigns new
positions to the clusters of its last refresh; positions of a layer the model has not seen land
far from every centre. :class:`NoveltyDrift` watches that distance, one value a position:

``novelty = log(d_min / baseline)``, with ``d_min`` the squared distance of a position's scores to
its nearest level-1 centre and ``baseline`` the median ``d_min`` of the positions stored at the
last refresh (so a position like those the model was fitted on scores about 0, whatever the
units). river's Page-Hinkley test (``mode="up"``) accumulates the excess over the running mean and
fires when it passes ``threshold``: a sustained rise, not one outlier. The engine then refreshes
at once (``StreamingEngine(drift_threshold=...)``), at least ``min_gap`` positions after the last
refresh, and resets the detector with the new model's baseline.

Why it matters: the scheduled refresh comes every ``refresh_every`` positions (the configuration's
automatic value is an eighth of the scan: 64 rows of a 512 x 512 scan). Measured on the default
64 x 64 phantom (one level, ``refresh_every`` 512), the batch-median novelty of the first cap
rows is 3-5x that of the film (log ratio about 1.5); the positions of an embedded second phase do
not raise the median (it is a minority of its rows), which is why flags come from the
clustering, not from this test.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> det = NoveltyDrift().reset(rng.exponential(1.0, 2048))  # the model's own positions
>>> det.update_many(rng.exponential(1.0, 20000))          # the model's own material: no drift
>>> det.update_many(rng.exponential(1.0, 200) * 5.0)      # a new layer: distances 5x larger
12
>>> det.n_detections_
1
"""

from __future__ import annotations

import logging
import math

import numpy as np
from river import drift

logger = logging.getLogger(__name__)

__all__ = ["NoveltyDrift"]


class NoveltyDrift:
    """Page-Hinkley test on the log novelty of incoming positions.

    Parameters
    ----------
    threshold : float, default=20.0
        Page-Hinkley threshold on the cumulative excess of the log novelty over its running mean
        plus ``delta``. Measured with exponential distances (heavier-tailed in log than the
        engine's): distances 3x / 5x / 20x the baseline's fire after 24 / 17 / 7 positions; 2
        million stationary positions never fired.
    min_instances : int, default=30
        Positions after a reset before the test may fire.
    delta : float, default=0.5
        Rise of the log novelty tolerated (0.5: distances 1.6x the baseline's). It is what keeps
        the test quiet on stationary data: each position of the model's own material adds
        ``-delta`` to the statistic on average (with 0.005, river's default, the test fired after
        40 positions of stationary exponential distances at threshold 20).

    Attributes
    ----------
    baseline_ : float
        Median squared distance at the last reset.
    n_seen_ : int
        Values since the last reset.
    n_detections_ : int
        Detections since construction.
    """

    def __init__(self, threshold: float = 20.0, min_instances: int = 30, delta: float = 0.5) -> None:
        self.threshold = threshold
        self.min_instances = min_instances
        self.delta = delta
        self.n_detections_ = 0
        self.baseline_ = math.nan
        self.n_seen_ = 0
        self._ph = None

    def reset(self, reference: np.ndarray) -> NoveltyDrift:
        """Start a new test for a freshly fitted model: ``reference`` are the squared distances of
        (a sample of) the model's own positions to it.

        They set the baseline (their median) and are fed to the test first as its history:
        Page-Hinkley measures a rise over the running mean of what it has seen, so a test started
        on the first positions of a new layer would take the layer as its reference (measured:
        film positions at 50x the substrate model's distances right after its refresh never fired).
        """
        ref = np.asarray(reference, dtype=np.float64).ravel()
        ref = ref[np.isfinite(ref)]
        b = float(np.median(ref)) if ref.size else math.nan
        if not (b > 0 and math.isfinite(b)):
            raise ValueError(f"the reference distances need a positive finite median, got {b!r}")
        self.baseline_ = b
        # alpha = 1: the classic cumulative sum. river's default fading (0.9999) lets the sum
        # settle at -delta / (1 - alpha) with a spread of sigma / sqrt(2 (1 - alpha)) (about 90
        # here), and the test then fired on stationary data after 20-27k positions whatever the
        # threshold (40-60); the engine resets the test at every refresh, so nothing needs fading
        self._ph = drift.PageHinkley(min_instances=int(self.min_instances), delta=float(self.delta),
                                     threshold=float(self.threshold), alpha=1.0, mode="up")
        for v in self._log_novelty(ref):
            self._ph.update(float(v))
        if self._ph.drift_detected:
            # the model's own positions looked like a rise (a reference that is not stationary,
            # e.g. sorted): no history then, rather than a test that fires at once
            logger.debug("drift reference fired on itself: the test starts without history")
            self._ph = drift.PageHinkley(min_instances=int(self.min_instances), delta=float(self.delta),
                                         threshold=float(self.threshold), alpha=1.0, mode="up")
        self.n_seen_ = 0
        return self

    def _log_novelty(self, d: np.ndarray) -> np.ndarray:
        # a position exactly on a centre (d = 0) is as familiar as it gets: floor, not -inf
        return np.log(np.maximum(d, 1e-12 * self.baseline_) / self.baseline_)

    def update_many(self, sq_distances: np.ndarray) -> int | None:
        """Feed the squared nearest-centre distances of positions in arrival order; return the index
        of the first position at which the test fired (the test is then spent until :meth:`reset`),
        else None."""
        if self._ph is None:
            return None
        values = self._log_novelty(np.asarray(sq_distances, dtype=np.float64).ravel())
        for i, v in enumerate(values):
            if not math.isfinite(v):
                continue
            self._ph.update(float(v))
            self.n_seen_ += 1
            if self._ph.drift_detected:
                self.n_detections_ += 1
                self._ph = None
                return i
        return None

"""A live view fed with a real flag: the lamella phantom's signals in a real centre store, memberships
from the truth fractions plus noise (as tests/test_followup.py), and the real flagger with
``method = "test"`` re-assessing as rows arrive, so the flag carries p-values that evolve.

Shared by tests/test_liveview_evidence.py and docs' screenshot (``python tests/liveview_scene.py``).
"""

from __future__ import annotations

import numpy as np

from streamclust.engine.centres import ThresholdedCentres, centre_signals
from streamclust.flags.stats import line_windows, window_counts
from streamclust.flags.flagger import FLAG_EDS_REBIN, SecondPhaseFlagger, eds_window
from streamclust.app.liveview import LiveView, store_position_provider
from streamclust.simulators.phantom import LamellaPhantom

SCAN = (64, 64)
ROWS = (24, 32, 40, 48, 64)  # rows done at each assessment; the phantom's flag is raised at 24


class Scene:
    """The phantom, its signals, memberships and a flagger; :meth:`feed` publishes row by row."""

    def __init__(self, seed: int = 0) -> None:
        self.phantom = ph = LamellaPhantom(SCAN, seed=seed, frame_shape=(64, 64))
        n = ph.n_positions
        self.positions = np.arange(n)
        self.frames = ph.frames(self.positions)
        self.spectra = ph.spectra(self.positions)
        rng = np.random.default_rng(1)
        u = np.stack([ph.truth.fractions[k].ravel() for k in ph.truth.label_names], axis=1)
        u = np.clip(u + rng.normal(0.0, 0.05, u.shape), 0.0, None)
        self.memberships = u / u.sum(axis=1, keepdims=True)
        self.n_clusters = u.shape[1]
        self.store = ThresholdedCentres(self.n_clusters, n_positions=n, cbed_shape=(32, 32))
        self.flagger = SecondPhaseFlagger(method="test")
        self.lines = window_counts(self.spectra, line_windows(ph.energy_axis_kev, self.flagger.elements))
        self._window = eds_window(ph.energy_axis_kev)
        self.done = 0
        self.events: list = []

    def view(self, **kw) -> LiveView:
        return LiveView(scan_shape=SCAN, n_clusters=self.n_clusters, energy_axis_kev=self.phantom.energy_axis_kev,
                        position_provider=store_position_provider(self.store), title="lamella phantom, seed 0",
                        elements=self.flagger.elements, **kw)

    def feed(self, view: LiveView, rows: int) -> int:
        """Acquire up to ``rows`` rows, re-assess, publish to ``view``; returns the view's version."""
        ph, m = self.phantom, rows * SCAN[1]
        new = slice(self.done, m)
        self.store.add(self.positions[new], self.frames[new], self.spectra[new])
        self.done = m
        u = self.memberships.copy()
        u[m:] = np.nan
        cs = self.store.update(u)
        cbed, eds = self.store.features(eds_rebin=FLAG_EDS_REBIN, eds_channels=self._window)
        self.events += self.flagger.update(u, SCAN, cbed, eds, signals=centre_signals(cs, ph.energy_axis_kev),
                                           line_counts=self.lines)
        return view.update(memberships=u, flags=[view.flag_from_event(f) for f in self.flagger.active_flags],
                           progress=(m, ph.n_positions), counters={"positions": m},
                           centres=view.centres_from_set(cs), bright_field=view.bright_field_from_store(self.store))


if __name__ == "__main__":  # the screenshot in docs/liveview-flag.png
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from browser import Browser  # noqa: E402

    from streamclust.simulators.followup import FollowUpServer  # noqa: E402

    scene = Scene()
    with FollowUpServer(scene.phantom) as server, scene.view(followup_endpoint=server.endpoint) as view:
        for rows in ROWS[:3]:
            scene.feed(view, rows)
        with Browser(size=(1180, 1560)) as b:
            b.goto(view.url)
            b.wait_for("document.getElementById('pat-diff').dataset.drawn")
            b.wait_for("document.querySelector('#history polyline') !== null")
            b.evaluate("document.getElementById('btn-followup').click()")
            b.wait_for("document.getElementById('action-state').dataset.state === 'done'")
            b.wait_for("document.getElementById('bf').naturalWidth > 0")
            out = Path(__file__).parents[1] / "docs" / "liveview-flag.png"
            out.write_bytes(b.screenshot_png())
            print("wrote", out)

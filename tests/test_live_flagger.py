"""The live analysis builds its second-phase flagger once, from the ``[flags]`` configuration, and
everything made from the flagger (the element-line windows of the composition test, the flagger's
EDS block) is made from that one."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.adapters.join import Batch
from streamclust.app.config import load_config
from streamclust.flags.stats import line_windows, window_counts
from streamclust.flags.flagger import SecondPhaseFlagger
from streamclust.app.live import LiveAnalysis

SCAN = (16, 16)


def test_the_flagger_is_built_once_from_its_configuration(make_phantom):
    ph = make_phantom(scan_shape=SCAN, seed=0)
    cfg = load_config().override("flags", method="test", elements=["Fe", "Si"], min_positions=5)
    live = LiveAnalysis.from_config(cfg, ph.scan_shape, ph.frame_shape, ph.energy_axis_kev)
    f = live.flagger
    assert (f.method, f.elements, f.min_positions) == ("test", ("Fe", "Si"), 5)
    with pytest.raises(AttributeError):
        live.flagger = SecondPhaseFlagger()  # a replaced flagger would not match its line windows
    # the line counts kept per position are the configured elements' (not the default Fe, Co)
    pos = np.arange(64)
    spectra = ph.spectra(pos)
    ones = np.ones(pos.size, bool)
    live.process(Batch(pos, ph.frames(pos), spectra, ones, ones))
    want = window_counts(spectra, line_windows(ph.energy_axis_kev, ("Fe", "Si")))
    np.testing.assert_array_equal(live._lines[pos], np.minimum(want, np.iinfo(np.uint16).max))


def test_bad_flagger_parameters_fail_when_the_analysis_is_built(make_phantom):
    ph = make_phantom(scan_shape=SCAN, seed=0)
    with pytest.raises(TypeError, match="no_such"):
        LiveAnalysis(ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, flags={"no_such": 1})
    with pytest.raises(ValueError, match="method"):
        LiveAnalysis(ph.scan_shape, ph.frame_shape, ph.energy_axis_kev, flags={"method": "vote"})

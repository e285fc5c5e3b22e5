"""The simulated microscope in its own process serves exactly the phantom built in this one
(the demo's default, streamclust.simulators.microscope_process)."""

from __future__ import annotations

import numpy as np

from streamclust.app.acquisition import acquire_scan
from streamclust.simulators.microscope_process import MicroscopeProcess
from streamclust.simulators.phantom import LamellaPhantom


def test_child_microscope_serves_the_same_scan_bit_for_bit():
    kwargs = {"scan_shape": [6, 5], "seed": 4, "frame_shape": [64, 64], "n_inclusions": 2}
    here = LamellaPhantom(**{**kwargs, "scan_shape": (6, 5), "frame_shape": (64, 64)})
    n = here.n_positions
    frames = np.zeros((n, 64, 64), np.int64)
    spectra = np.zeros((n, here.n_channels), np.int64)
    seen = np.zeros((2, n), int)

    def on_batch(b):
        p = b.positions
        frames[p[b.has_frame]] = b.frames[b.has_frame]
        spectra[p[b.has_spectrum]] = b.spectra[b.has_spectrum]
        np.add.at(seen[0], p[b.has_frame], 1)
        np.add.at(seen[1], p[b.has_spectrum], 1)

    scope = MicroscopeProcess(kwargs, {"dwell_s": 0.0, "layout": "1x1"})
    with scope:
        assert scope.data_address[1] > 0 and scope.eds_endpoint.startswith("tcp://")
        report = acquire_scan(scope.data_address, scope.eds_endpoint, n, on_batch, batch_size=8)
        proc = scope._proc
    assert report.complete
    assert (seen == 1).all()
    assert np.array_equal(frames, here.frames(np.arange(n)))
    assert np.array_equal(spectra, here.spectra(np.arange(n)))
    # stopped on request, not killed, and its pipes closed
    assert proc.returncode == 0 and scope._proc is None


def test_a_child_that_cannot_start_is_reported_with_its_error():
    import pytest

    with pytest.raises(RuntimeError, match="ended before listening: ValueError: scan_shape must be positive"):
        MicroscopeProcess({"scan_shape": [0, -1]}).start()


def test_a_child_that_does_not_listen_in_time_is_stopped_not_waited_for():
    import pytest

    # building a 64 x 64 phantom and compiling its kernels takes far longer than 10 ms
    scope = MicroscopeProcess({"scan_shape": [64, 64], "seed": 0}, start_timeout=0.01)
    with pytest.raises(RuntimeError, match="did not listen within"):
        scope.start()
    assert scope._proc is None  # killed and reaped, its pipes closed

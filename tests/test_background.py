"""The shared socket-thread lifecycle, through the real classes that use it."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.simulators.eds import ArraySpectrumSource, EDSPublisher


def _source():
    return ArraySpectrumSource(np.zeros((4, 8), np.uint16), scan_shape=(2, 2), energy_offset_kev=0.0,
                               channel_width_kev=0.01, live_time_s=0.01)


def test_a_bind_failure_is_reraised_from_wait_for_listen():
    pub = EDSPublisher(_source(), endpoint="tcp://not-an-interface-here:0")
    pub.start()
    with pytest.raises(RuntimeError, match="EDS publisher failed"):
        pub.wait_for_listen(timeout=5.0)
    pub.stop()


def test_start_twice_is_refused_and_stop_is_bounded():
    with EDSPublisher(_source()) as pub:
        assert pub.endpoint.startswith("tcp://127.0.0.1:")
        with pytest.raises(RuntimeError, match="already started"):
            pub.start()
    assert not pub._thread.is_alive()

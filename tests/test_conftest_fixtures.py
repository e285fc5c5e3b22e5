"""The shared fixtures of tests/conftest.py start real simulated instruments on 127.0.0.1 port 0."""

import numpy as np
from streamclust.adapters.merlin import MerlinReceiver
from streamclust.simulators.merlin import ArraySource
from streamclust.simulators.eds import ArraySpectrumSource

def test_fixtures(merlin_server, eds_publisher, make_phantom, microscope):
    frames = np.arange(4 * 256 * 256, dtype=np.uint16).reshape(4, 256, 256)
    s = merlin_server(ArraySource(frames), layout="1x1", headless=True)
    with MerlinReceiver(*s.data_address, timeout=5.0) as rx:
        got = [f.sequence for f in rx.frames()]
    assert got == [1, 2, 3, 4]
    pub = eds_publisher(ArraySpectrumSource(np.zeros((2, 4), np.uint16)))
    assert pub.endpoint.startswith("tcp://127.0.0.1:")
    ph = make_phantom(scan_shape=(4, 4), frame_shape=(64, 64))
    assert make_phantom(scan_shape=(4, 4), frame_shape=(64, 64)) is ph
    m = microscope(ph)
    assert m.endpoints

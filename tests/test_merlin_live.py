"""Simulated Merlin server -> MerlinReceiver over real loopback sockets, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest

from streamclust.adapters.merlin import MerlinReceiver
from streamclust.adapters.merlin_control import MerlinControl
from streamclust.simulators.clock import ScanClock
from streamclust.simulators.merlin import ArraySource, MerlinServer

DTYPES = {1: np.uint8, 6: np.uint8, 12: np.uint16, 24: np.uint32}
SHAPES = {"1x1": (256, 256), "2x2": (512, 512), "2x2G": (514, 514)}


def random_frames(n, shape, depth, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**depth, (n, *shape)).astype(DTYPES[depth])


@pytest.fixture
def make_server():
    servers = []

    def make(frames, **kw):
        kw.setdefault("data_port", 0)
        kw.setdefault("control_port", 0)
        server = MerlinServer(ArraySource(frames), **kw)
        server.start()
        server.wait_for_listen()
        servers.append(server)
        return server

    yield make
    for s in servers:
        s.stop()


CASES = [
    # (layout, counter depth, raw): every pixel type the detector sends
    ("1x1", 1, False), ("1x1", 6, False), ("1x1", 12, False), ("1x1", 24, False),
    ("1x1", 1, True), ("1x1", 6, True), ("1x1", 12, True),
    ("2x2", 1, False), ("2x2", 6, False), ("2x2", 12, False), ("2x2", 24, False),
    ("2x2", 1, True), ("2x2", 6, True), ("2x2", 12, True), ("2x2", 24, True),
    ("2x2G", 12, False), ("2x2G", 1, True),
]


@pytest.mark.parametrize("layout,depth,raw", CASES)
def test_pixel_exact_for_every_pixel_type_and_layout(make_server, layout, depth, raw):
    frames = random_frames(3, SHAPES[layout], depth, seed=depth)
    if layout == "2x2G":  # the 2-pixel gap between chips carries no counts
        frames[:, 256:258, :] = 0
        frames[:, :, 256:258] = 0
    server = make_server(frames, layout=layout, counter_depth=depth, raw=raw, headless=True)
    with MerlinReceiver(*server.data_address, timeout=5.0) as rx:
        got = list(rx.frames())
        header = rx.header
    assert [f.sequence for f in got] == [1, 2, 3]
    for f in got:
        assert f.image.shape == SHAPES[layout]
        np.testing.assert_array_equal(f.image, frames[f.sequence - 1])
    assert header.n_frames == 3 and header.counter_depth == depth
    assert rx.stats.complete and rx.stats.frames_decoded == 3 and rx.stats.frames_dropped == 0


def test_internal_trigger_via_control_port(make_server):
    frames = random_frames(5, (256, 256), 12)
    server = make_server(frames, layout="1x1")
    with MerlinReceiver(*server.data_address, control_port=server.control_address[1]) as rx:
        rx.control.set("NUMFRAMESTOACQUIRE", 4)
        rx.control.start_acquisition()
        got = [f.sequence for f in rx.frames()]
        assert rx.header.n_frames == 4
        assert server.wait_until_idle(5.0)
        assert rx.control.status() == 0
    assert got == [1, 2, 3, 4]


def test_soft_trigger_releases_frames_per_trigger(make_server):
    frames = random_frames(6, (256, 256), 6)
    server = make_server(frames, layout="1x1", counter_depth=6, trigger="soft", frames_per_trigger=2)
    with MerlinReceiver(*server.data_address, control_port=server.control_address[1]) as rx:
        rx.control.start_acquisition()
        acq = rx.next_acquisition(timeout=5.0)
        assert acq.header.frames_per_trigger == 2
        assert rx.control.status() == 1
        it = acq.frames(timeout=5.0)
        rx.control.soft_trigger()
        first = [next(it).sequence, next(it).sequence]
        # nothing more leaves the detector before the next trigger
        assert server.frames_sent <= 2
        rx.control.soft_trigger()
        rx.control.soft_trigger()
        rest = [f.sequence for f in it]
    assert first == [1, 2] and rest == [3, 4, 5, 6]
    assert acq.complete


def test_several_acquisitions_on_one_connection(make_server):
    frames = random_frames(4, (512, 512), 12)
    server = make_server(frames, layout="2x2")
    with MerlinReceiver(*server.data_address, control_port=server.control_address[1]) as rx:
        ctl = rx.control
        results = []
        for depth, raw, n in ((12, False, 4), (1, True, 2), (6, False, 3)):
            ctl.set("COUNTERDEPTH", depth)
            ctl.set("FILEFORMAT", 2 if raw else 0)
            ctl.set("NUMFRAMESTOACQUIRE", n)
            ctl.start_acquisition()
            acq = rx.next_acquisition(timeout=5.0)
            imgs = [f.image for f in acq.frames()]
            results.append((acq.number, acq.header.counter_depth, len(imgs), acq.complete))
            expect = np.minimum(frames[: len(imgs)], 2**depth - 1)  # the counter saturates
            np.testing.assert_array_equal(np.stack(imgs), expect)
            assert server.wait_until_idle(5.0)
    assert results == [(1, 12, 4, True), (2, 1, 2, True), (3, 6, 3, True)]
    assert rx.stats.acquisitions == 3 and server.acquisitions_served == 3


def test_acquisitions_iterator_and_abort(make_server):
    frames = random_frames(3, (256, 256), 12)
    server = make_server(frames, layout="1x1", trigger="soft")
    with MerlinReceiver(*server.data_address, control_port=server.control_address[1], timeout=1.0) as rx:
        rx.control.start_acquisition()
        acq = rx.next_acquisition()
        rx.control.abort()
        assert server.wait_until_idle(5.0)
        assert list(acq.frames(timeout=0.3)) == []
        assert acq.complete is False and acq.ended_by == "timeout"
        rx.control.set("TRIGGERSTART", 0)
        rx.control.start_acquisition()
        acq2 = next(iter(rx.acquisitions()))
        assert [f.sequence for f in acq2.frames()] == [1, 2, 3]


def test_continuous_mode_until_stop(make_server):
    frames = random_frames(3, (256, 256), 6)
    server = make_server(frames, layout="1x1", counter_depth=6, n_frames=0)
    with MerlinReceiver(*server.data_address, control_port=server.control_address[1], timeout=0.5) as rx:
        rx.control.start_acquisition()
        seen = []
        for f in rx.frames():
            np.testing.assert_array_equal(f.image, frames[(f.sequence - 1) % 3])
            seen.append(f.sequence)
            if len(seen) == 7:
                rx.control.stop()
        assert rx.header.n_frames == 0
    assert seen[:7] == list(range(1, 8))
    assert rx.stats.complete is None  # continuous: no count to reach


def test_dwell_follows_the_shared_clock(make_server):
    clock = ScanClock()
    frames = random_frames(4, (256, 256), 12)
    server = make_server(frames, layout="1x1", clock=clock, dwell_s=0.002, headless=True)
    with MerlinReceiver(*server.data_address) as rx:
        got = [f.sequence for f in rx.frames()]
    run = clock.wait_for_run(0, timeout=1.0)
    assert got == [1, 2, 3, 4]
    assert run is not None and run.n_positions == 4 and run.dwell_s == pytest.approx(0.002)


def test_images_reused_without_copy(make_server):
    frames = random_frames(3, (256, 256), 12)
    server = make_server(frames, layout="1x1", headless=True)
    with MerlinReceiver(*server.data_address) as rx:
        ids, sums = set(), []
        for f in rx.frames(copy=False):
            ids.add(id(f.image))
            sums.append(int(f.image.sum()))
    assert len(ids) == 1
    assert sums == [int(x.sum()) for x in frames]


def test_pixel_cache_serves_identical_bytes_twice(make_server):
    frames = random_frames(3, (512, 512), 1)
    server = make_server(frames, layout="2x2", counter_depth=1, raw=True)
    with MerlinReceiver(*server.data_address, control_port=server.control_address[1]) as rx:
        for _ in range(2):
            rx.control.start_acquisition()
            imgs = [f.image for f in rx.frames()]
            np.testing.assert_array_equal(np.stack(imgs), frames)
            assert server.wait_until_idle(5.0)
    assert server.acquisitions_served == 2


def test_array_source_validates_shape():
    with pytest.raises(ValueError, match="height, width"):
        ArraySource(np.zeros((4, 4)))


def test_control_client_standalone(make_server):
    server = make_server(random_frames(1, (256, 256), 12), layout="1x1")
    with MerlinControl(*server.control_address) as ctl:
        assert ctl.get_int("IMAGEX") == 256


@pytest.mark.parametrize("render_threads", [0, 1, 3])
@pytest.mark.parametrize("layout,depth,raw", [("2x2", 12, False), ("2x2", 1, True), ("1x1", 24, True)])
def test_frames_rendered_ahead_arrive_in_order_pixel_exact(make_server, render_threads, layout, depth, raw):
    # values above the counter's range: the server saturates them like the detector would
    frames = random_frames(9, SHAPES[layout], 12, seed=5).astype(np.uint32) * (2 if depth == 24 else 1)
    server = make_server(frames, layout=layout, counter_depth=depth, raw=raw, headless=True, cache=False,
                         render_threads=render_threads, n_frames=20)  # 20 frames cycle the 9 positions
    with MerlinReceiver(*server.data_address, timeout=5.0) as rx:
        got = [(f.sequence, f.image.copy()) for f in rx.frames()]
    assert [s for s, _ in got] == list(range(1, 21)) and server.render_threads == render_threads
    expected = np.minimum(frames, 2**depth - 1)
    for seq, image in got:
        np.testing.assert_array_equal(image, expected[(seq - 1) % 9])


def test_render_threads_auto_and_validation():
    frames = np.zeros((2, 256, 256), np.uint16)
    assert MerlinServer(ArraySource(frames), layout="1x1").render_threads >= 1

    class Opaque:  # an unknown source: its frame_into is never called from two threads at once
        n_positions, frame_shape = 2, (256, 256)

        def frame_into(self, position, out):
            out[...] = position

    assert MerlinServer(Opaque(), layout="1x1").render_threads == 1
    with pytest.raises(ValueError, match="render_threads"):
        MerlinServer(Opaque(), layout="1x1", render_threads=-1)


def test_frames_decode_into_the_buffers_an_out_allocator_hands_out(make_server):
    frames = random_frames(5, (512, 512), 12, seed=3)
    server = make_server(frames, layout="2x2", counter_depth=12, headless=True)
    handed = []

    def allocate(shape, dtype):
        handed.append(np.full(shape, 7, dtype))
        return handed[-1]

    with MerlinReceiver(*server.data_address, timeout=5.0) as rx:
        it = rx.frames()
        it.out_allocator = allocate
        got = list(it)
    assert len(got) == len(handed) == 5
    for f, out in zip(got, handed):
        assert f.image is out
        np.testing.assert_array_equal(out, frames[f.sequence - 1])


def test_phantom_rendered_by_several_threads_equals_its_frames():
    """Numba's random state is per thread: parallel rendering must not change a single count."""
    from streamclust.simulators.phantom import LamellaPhantom

    ph = LamellaPhantom(scan_shape=(4, 4), seed=3)
    with MerlinServer(ph, data_port=0, control_port=0, layout="2x2", counter_depth=12, headless=True,
                      cache=False, render_threads=3) as server:
        with MerlinReceiver(*server.data_address, timeout=10.0) as rx:
            got = {f.sequence - 1: f.image.copy() for f in rx.frames()}
    assert sorted(got) == list(range(16))
    np.testing.assert_array_equal(np.stack([got[p] for p in range(16)]), ph.frames(np.arange(16)))

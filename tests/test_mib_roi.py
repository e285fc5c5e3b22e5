"""Region-of-interest readouts: any frame size the header declares, in files and over TCP.

The Merlin software can read out fewer rows (for speed); the MQ1 header then declares e.g. a
single chip as 256x128. The reader, the live receiver and the simulator follow the header's
width and height, bounded by what the header's chips can hold, for raw and processed pixels.
"""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from streamclust.adapters import mib_kernels as k
from streamclust.adapters.errors import HeaderError
from streamclust.adapters.framing import frame_message
from streamclust.adapters.merlin import MerlinReceiver
from streamclust.adapters.mib import MibFile, parse_frame_header, raw_chip_placement, read_mib
from streamclust.simulators.merlin import ArraySource, MerlinServer
from streamclust.simulators.mib_encode import FrameEncoder, encode_acquisition_header, write_mib

DTYPES = {1: np.uint8, 6: np.uint8, 12: np.uint16, 24: np.uint32}

# (layout, raw, image shape): single chip 256x128, quad ROIs, a gapped raw quad ROI, a 3x1 strip
ROI_CASES = [
    ("1x1", False, (128, 256)), ("1x1", True, (128, 256)), ("1x1", True, (37, 256)),
    ("1x1", False, (100, 200)), ("2x2", False, (256, 512)), ("2x2", True, (256, 512)),
    ("2x2", True, (74, 512)), ("2x2G", True, (258, 514)), ("2x2G", False, (130, 514)),
    ("3x1", False, (64, 768)), ("4x1", False, (256, 1024)), ("4x1", False, (100, 1024)),
]


def _frames(n, shape, depth, layout, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 2**depth, (n, *shape)).astype(DTYPES[depth])
    if layout == "2x2G" and shape[1] == 514:  # the gap between chips carries no counts
        rows = (shape[0] - 2) // 2
        frames[:, rows:rows + 2, :] = 0
        frames[:, :, 256:258] = 0
    return frames


@pytest.mark.parametrize("depth", [1, 6, 12, 24])
@pytest.mark.parametrize("layout, raw, shape", ROI_CASES)
def test_roi_file_round_trip(tmp_path, layout, raw, shape, depth):
    frames = _frames(3, shape, depth, layout, seed=depth)
    mib, _ = write_mib(tmp_path / "roi", frames, counter_depth=depth, raw=raw, layout=layout)
    with MibFile(mib) as f:
        h = f.first_header
        assert h.image_shape == shape
        if raw:  # raw data is whole chip rows: header width = chips x 256, height = rows a chip
            rows = shape[0] if layout == "1x1" else (shape[0] - (2 if shape[1] == 514 else 0)) // 2
            assert (h.width, h.height) == (256 * h.n_chips, rows)
        else:
            assert (h.height, h.width) == shape
    np.testing.assert_array_equal(read_mib(mib), frames)


def test_single_chip_256x128_header_is_what_the_issue_reported(tmp_path):
    frames = _frames(2, (128, 256), 12, "1x1")
    mib, _ = write_mib(tmp_path / "roi", frames, counter_depth=12, layout="1x1")
    assert b"01,0256,0128,U16,   1x1" in mib.read_bytes()[:64]
    assert read_mib(mib).shape == (2, 128, 256)


@pytest.mark.parametrize("old, new, match", [
    (b"01,0256,0128,", b"01,0256,0300,", "at most 256x256"),
    (b"01,0256,0128,", b"01,0512,0128,", "at most 256x256"),
    (b"01,0256,0128,", b"01,0256,0000,", "impossible"),
    (b"01,0256,0128,", b"01,0256,9999,", "at most 256x256"),
])
def test_roi_larger_than_the_chips_is_a_precise_header_error(old, new, match):
    enc = FrameEncoder(image_shape=(128, 256), counter_depth=12, layout="1x1")
    head = enc.header(1).replace(old, new)
    with pytest.raises(HeaderError, match=match) as info:
        parse_frame_header(head)
    assert info.value.sequence == 1 and info.value.offset == 0


def test_raw_roi_must_be_whole_chip_rows():
    enc = FrameEncoder(image_shape=(128, 256), counter_depth=1, layout="1x1", raw=True)
    for old, new in ((b"0256,0128,R64", b"0200,0128,R64"), (b"0256,0128,R64", b"0256,0257,R64")):
        with pytest.raises(HeaderError, match="256 wide and 1..256 rows"):
            parse_frame_header(enc.header(1).replace(old, new), counter_depth=1)


def test_file_smaller_than_the_declared_frame_is_an_error_not_an_allocation(tmp_path):
    frames = _frames(1, (128, 256), 12, "1x1")
    mib, _ = write_mib(tmp_path / "roi", frames, counter_depth=12, layout="1x1")
    data = mib.read_bytes()
    # the header claims a full chip; the file holds the pixels of 128 rows only
    mib.write_bytes(data.replace(b"01,0256,0128,", b"01,0256,0256,", 1))
    with pytest.raises(Exception, match="truncated|no complete frame"):
        read_mib(mib)


@pytest.mark.parametrize("rows", [128, 37])
def test_binned_raw_roi_equals_binned_unpacked(rows):
    rng = np.random.default_rng(rows)
    image = rng.integers(0, 2, (2 * rows, 512)).astype(np.uint8)
    enc = FrameEncoder(image_shape=image.shape, counter_depth=1, layout="2x2", raw=True)
    src = np.frombuffer(enc.pixels(image), np.uint8)
    row0, col0, flip = raw_chip_placement("2x2", rows)
    bf = 8
    hb = -(-2 * rows // bf)
    padded = np.zeros((hb * bf, 512), np.int64)
    padded[:2 * rows] = image
    expect = padded.reshape(hb, bf, 512 // bf, bf).sum(axis=(1, 3))
    out = np.zeros((hb, 512 // bf), np.int64)
    k.bin_raw_1bit(src, out, row0, col0, flip, bf)
    np.testing.assert_array_equal(out, expect)


# -- over TCP: the simulated detector sends ROI frames, the receiver follows the header ---------

@pytest.mark.parametrize("depth", [1, 12, 24])
@pytest.mark.parametrize("layout, raw, shape", [c for c in ROI_CASES if c[0] != "3x1"])
def test_roi_frames_over_tcp_are_pixel_exact(layout, raw, shape, depth):
    frames = _frames(3, shape, depth, layout, seed=depth + 1)
    with MerlinServer(ArraySource(frames), data_port=0, control_port=0, layout=layout,
                      counter_depth=depth, raw=raw, headless=True) as server:
        with MerlinReceiver(*server.data_address, timeout=5.0) as rx:
            got = [(f.sequence, f.image.copy()) for f in rx.frames()]
    assert [s for s, _ in got] == [1, 2, 3]
    for seq, image in got:
        assert image.shape == shape
        np.testing.assert_array_equal(image, frames[seq - 1])
    assert rx.stats.complete and rx.stats.frames_dropped == 0


class _OneShot:
    """Accept one connection, send ``data`` and close."""

    def __init__(self, data: bytes):
        self.data = data
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5.0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall(self.data)

    def close(self):
        self.thread.join(5.0)
        self.listener.close()


def test_receiver_counts_and_survives_a_frame_claiming_more_than_its_chips():
    enc = FrameEncoder(image_shape=(128, 256), counter_depth=6, layout="1x1")
    images = [np.full((128, 256), i, np.uint8) for i in range(5)]
    bad = bytearray(enc.encode(2, images[2]))
    bad[:64] = bytes(bad[:64]).replace(b"0256,0128", b"0256,0300")  # same length on the wire
    stream = b"".join([
        frame_message(encode_acquisition_header(n_frames=4, counter_depth=6, layout="1x1")),
        frame_message(enc.encode(1, images[1])), frame_message(bytes(bad)),
        frame_message(enc.encode(3, images[3])), frame_message(enc.encode(4, images[4])),
    ])
    server = _OneShot(stream)
    try:
        with MerlinReceiver(*server.listener.getsockname()[:2], timeout=2.0) as rx:
            got = [(f.sequence, int(f.image[0, 0]), f.image.shape) for f in rx.frames()]
    finally:
        server.close()
    assert got == [(1, 1, (128, 256)), (3, 3, (128, 256)), (4, 4, (128, 256))]
    assert rx.stats.dropped["bad_header"] == 1
    err = next(e for e in rx.stats.errors if e["reason"] == "bad_header")
    assert "at most 256x256" in err["message"]

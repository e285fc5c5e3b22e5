"""The MIB codec against real Merlin recordings (rosettasciio's test data, software 0.77).

These files are the proof that the decoder reads what real hardware writes and that the encoder
writes what real hardware writes: shapes, values, header fields, the raw quad chip layout (pinned
by comparing raw and processed 1-bit recordings of the same illumination), and byte-exact
re-encoding.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from streamclust.adapters.mib import MibFile, parse_acquisition_header, read_mib
from streamclust.simulators.mib_encode import FrameEncoder, encode_acquisition_header

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "merlin-qd"
pytestmark = pytest.mark.skipif(not DATA.is_dir(),
                                reason=f"real Merlin recordings not found at {DATA}")

NAME = re.compile(r"(Quad|Single)_(\d+)_Frame_CounterDepth_(\d+)_Rows_256(RAW)?\.mib")
FILES = sorted(p.name for p in DATA.glob("*.mib")) if DATA.is_dir() else []
DTYPES = {1: np.uint8, 6: np.uint8, 12: np.uint16, 24: np.uint32}
# the recordings were made in British Summer Time: field 9 is local, the MQ1A tail UTC
BST = timezone(timedelta(hours=1))


def _meta(name):
    m = NAME.fullmatch(name)
    assert m, name
    return {"quad": m[1] == "Quad", "n": int(m[2]), "depth": int(m[3]), "raw": bool(m[4])}


def _read(stem: str) -> np.ndarray:
    return read_mib(DATA / f"{stem}.mib")


def test_all_twenty_recordings_present():
    # 2 sizes x 2 frame counts x (4 depths + raw 1-bit)
    assert len(FILES) == 20


@pytest.mark.parametrize("name", FILES)
def test_read_every_real_file(name):
    meta = _meta(name)
    frames = read_mib(DATA / name)
    side = 512 if meta["quad"] else 256
    assert frames.shape == (meta["n"], side, side)
    assert frames.dtype == DTYPES[meta["depth"]]
    assert frames.max() <= 2 ** meta["depth"] - 1
    if meta["depth"] == 1:
        assert set(np.unique(frames)) == {0, 1}
    # real data: not blank, not saturated everywhere
    assert 0 < frames.mean() < 2 ** meta["depth"] - 1

    with MibFile(DATA / name) as f:
        hdr = f.acquisition_header
        assert hdr is not None
        assert hdr.n_frames == meta["n"] == f.n_frames
        assert hdr.counter_depth == meta["depth"]
        assert hdr.assembly_size == ("2x2" if meta["quad"] else "1x1")
        assert hdr.software_version == "0.77"
        assert hdr.thresholds == (2.0, 511.0, 0, 0, 0, 0, 0, 0)
        headers = f.headers
        assert [h.sequence for h in headers] == list(range(1, meta["n"] + 1))
        for h in headers:
            assert h.counter_depth == meta["depth"]
            assert h.raw == meta["raw"]
            assert h.header_size == (768 if meta["quad"] else 384)
            assert h.n_chips == (4 if meta["quad"] else 1)
            assert h.shutter_s == 0.001 and h.shutter_ns == 1_000_000
            assert h.thresholds[:2] == (2.0, 511.0)
            assert len(h.dacs) == h.n_chips and all(len(d) == 27 for d in h.dacs)
            assert h.tail_timestamp.endswith("Z")
            assert h.image_shape == (side, side)
        if meta["raw"]:
            assert (headers[0].width, headers[0].height) == ((1024, 256) if meta["quad"]
                                                             else (256, 256))
        # frame(i) and iter_frames agree with read_mib
        for (h, img), ref in zip(f.iter_frames(), frames):
            np.testing.assert_array_equal(img, ref)


@pytest.mark.parametrize("size", ["Quad", "Single"])
@pytest.mark.parametrize("n", [1, 9])
def test_raw_numba_and_numpy_paths_agree(size, n):
    path = DATA / f"{size}_{n}_Frame_CounterDepth_1_Rows_256RAW.mib"
    with MibFile(path, use_numba=False) as f:
        slow = f.read_all()
    np.testing.assert_array_equal(read_mib(path), slow)


def _arrangements(raw_rows: np.ndarray):
    """Every way of placing the four raw chip strips in a 512x512 image with 180-degree turns.

    Yields (description, image); the documented arrangement is ("3210", "0011").
    """
    from itertools import permutations, product

    chips = [raw_rows[:, k * 256:(k + 1) * 256] for k in range(4)]
    for order in permutations(range(4)):
        for flips in product((0, 1), repeat=4):
            img = np.empty((512, 512), raw_rows.dtype)
            for slot, (k, fl) in enumerate(zip(order, flips)):
                r, c = divmod(slot, 2)
                img[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = (
                    chips[k][::-1, ::-1] if fl else chips[k])
            yield "".join(map(str, order)) + "/" + "".join(map(str, flips)), img


@pytest.mark.parametrize("n", [1, 9])
def test_raw_quad_layout_pinned_by_processed_1bit(n):
    """Raw and processed 1-bit recordings of the same illumination decode to the same frames.

    They are separate acquisitions, so a few pixels differ by shot noise; the check is that the
    documented layout agrees with the processed frames about as well as two processed frames
    agree with each other, and far better than any other chip arrangement.
    """
    raw = _read(f"Quad_{n}_Frame_CounterDepth_1_Rows_256RAW")
    proc = _read(f"Quad_{n}_Frame_CounterDepth_1_Rows_256")
    mismatch = (raw != proc).mean(axis=(1, 2))
    assert mismatch.max() < 1e-3  # about 150 of 262,144 pixels
    if n > 1:
        noise = (proc[0] != proc[1:]).mean(axis=(1, 2))
        assert mismatch.mean() < 2 * noise.mean()

    # the data must single out one arrangement of the raw chip strips: ours
    from streamclust.adapters.mib_kernels import unpack_raw_1bit_numpy

    data = (DATA / f"Quad_{n}_Frame_CounterDepth_1_Rows_256RAW.mib").read_bytes()
    strips = np.empty((256, 1024), np.uint8)
    unpack_raw_1bit_numpy(data[768:768 + 32768], strips, np.zeros(4, np.int64),
                          np.arange(4, dtype=np.int64) * 256, np.zeros(4, np.uint8))
    scores = {desc: (img != proc[0]).mean() for desc, img in _arrangements(strips)}
    best = min(scores, key=scores.get)
    assert best == "3210/0011", best
    second = sorted(scores.values())[1]
    assert second > 10 * scores[best]
    np.testing.assert_array_equal(dict(_arrangements(strips))[best], raw[0])


@pytest.mark.parametrize("size", ["Quad", "Single"])
def test_counter_depths_agree_on_the_same_illumination(size):
    """6-bit is the 12-bit count clipped at 63, 1-bit is 6-bit clipped at 1, 24-bit equals 12-bit
    where counts stay below 4096: checked on the pixels that saw anything, and shown to be
    specific by the same comparison with one image flipped."""
    c1, c6, c12, c24 = (_read(f"{size}_9_Frame_CounterDepth_{d}_Rows_256") for d in (1, 6, 12, 24))
    c1, c6, c12, c24 = (a.astype(np.int64) for a in (c1, c6, c12, c24))

    def agreement(low, high, clip):
        lit = (low > 0) | (high > 0)
        return (low[lit] == np.minimum(high[lit], clip)).mean()

    for low, high, clip in ((c6, c12, 63), (c1, c6, 1), (c12, c24, 4095)):
        same = agreement(low, high, clip)
        flipped = agreement(low, high[:, ::-1, :], clip)
        assert same > 0.85, same
        assert flipped < 0.5 * same, (same, flipped)
    # correlation of the mean images across depths
    assert np.corrcoef(c12.mean(0).ravel(), c24.mean(0).ravel())[0, 1] > 0.9
    assert np.corrcoef(np.minimum(c6, 1).mean(0).ravel(), c1.mean(0).ravel())[0, 1] > 0.98
    assert np.corrcoef(np.minimum(c12, 63).mean(0).ravel(), c6.mean(0).ravel())[0, 1] > 0.9
    # 6-bit counters saturate at 63 where 12-bit ones do not
    assert c6.max() == 63 and c12.max() > 63


@pytest.mark.parametrize("name", FILES)
def test_reencoding_real_frames_reproduces_the_bytes(name):
    data = (DATA / name).read_bytes()
    with MibFile(DATA / name) as f:
        first = f.first_header
        enc = FrameEncoder(image_shape=first.image_shape, counter_depth=first.counter_depth,
                           raw=first.raw, layout=first.layout, shutter_s=first.shutter_s)
        assert (enc.header_size, enc.pixel_bytes) == (first.header_size, first.pixel_bytes)
        for i, (h, img) in enumerate(f.iter_frames()):
            record = data[i * f.record_size:(i + 1) * f.record_size]
            assert enc.pixels(img) == record[h.header_size:]
            ts = datetime.strptime(h.timestamp, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=BST)
            ns = int(h.tail_timestamp[-4:-1])
            assert enc.header(h.sequence, ts, extra_ns=ns, counter=h.counter) == \
                record[:h.header_size]
            assert enc.encode(h.sequence, img, ts)[h.header_size:] == record[h.header_size:]


@pytest.mark.parametrize("name", [n.replace(".mib", ".hdr") for n in FILES])
def test_reencoding_real_acquisition_headers(name):
    data = (DATA / name).read_bytes()
    hdr = parse_acquisition_header(data)
    assert len(hdr) == 27
    mine = encode_acquisition_header(
        n_frames=hdr.n_frames, counter_depth=hdr.counter_depth, layout=hdr.assembly_size,
        raw=name.endswith("RAW.hdr"), frames_per_trigger=hdr.frames_per_trigger,
        time_stamp=datetime.strptime(hdr["Time and Date Stamp (day, mnth, yr, hr, min, s)"],
                                     "%d/%m/%Y %H:%M:%S"),
        active_counters=hdr["Active Counters"], temperature=hdr["Temperature (C)"],
        humidity=hdr["Humidity (%)"])
    assert mine == data
    assert parse_acquisition_header(mine) == hdr


@pytest.mark.parametrize("stem, rows", [("Single_9_Frame_CounterDepth_1_Rows_256RAW", 128),
                                        ("Quad_9_Frame_CounterDepth_1_Rows_256RAW", 128),
                                        ("Quad_9_Frame_CounterDepth_1_Rows_256RAW", 40)])
def test_real_raw_frames_cut_to_a_region_of_interest(tmp_path, stem, rows):
    # A region-of-interest readout of the same exposure: the first `rows` raw rows of every frame,
    # with the header's height saying so. The decoder must place them where the full frame has
    # them: the top chips' rows 0..rows-1 above the (rotated) bottom chips' last rows.
    full = _read(stem)
    data = (DATA / f"{stem}.mib").read_bytes()
    with MibFile(DATA / f"{stem}.mib") as f:
        h = f.first_header
        record = f.record_size
    row_bytes = h.width // 8  # 1-bit raw: every chip row of 256 pixels is 32 bytes
    out = bytearray()
    for i in range(len(full)):
        head = bytearray(data[i * record:i * record + h.header_size])
        head[:64] = bytes(head[:64]).replace(f",{h.width:04d},0256,".encode(), f",{h.width:04d},{rows:04d},".encode(), 1)
        start = i * record + h.header_size
        out += head + data[start:start + rows * row_bytes]
    roi = tmp_path / "roi.mib"
    roi.write_bytes(bytes(out))
    got = read_mib(roi, hdr_path=DATA / f"{stem}.hdr")
    if h.n_chips == 1:
        np.testing.assert_array_equal(got, full[:, :rows])
    else:
        expect = np.concatenate([full[:, :rows], full[:, 512 - rows:]], axis=1)
        np.testing.assert_array_equal(got, expect)

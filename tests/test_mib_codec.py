"""The MIB codec on synthetic data: framing, headers, every pixel type and layout, bad input."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamclust.adapters import mib_kernels as k
from streamclust.adapters.errors import FramingError, HeaderError, PixelDataError
from streamclust.adapters.framing import (
    MPX_PREFIX_SIZE,
    encode_mpx_prefix,
    frame_message,
    parse_mpx_prefix,
)
from streamclust.adapters.mib import (
    MQ1_PEEK,
    FrameDecoder,
    MibFile,
    parse_acquisition_header,
    parse_frame_header,
    peek_header_size,
    raw_chip_placement,
    read_mib,
)
from streamclust.simulators.mib_encode import (
    FrameEncoder,
    MibWriter,
    encode_acquisition_header,
    write_mib,
)

FIXED_TIME = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)

# (counter_depth, raw, layout, image shape)
CASES = [
    (d, raw, layout, shape)
    for d in (1, 6, 12, 24)
    for raw in (False, True)
    for layout, shape in (("1x1", (256, 256)), ("2x2", (512, 512)), ("2x2G", (514, 514)),
                          ("2x2G", (512, 512)))
] + [(d, False, "3x1", (256, 768)) for d in (1, 12)]


def _random_image(rng, shape, depth, layout):
    img = rng.integers(0, 2 ** depth, size=shape, dtype=np.int64)
    # bias towards the extremes: zeros and saturated pixels are where packing bugs hide
    img[rng.random(shape) < 0.2] = 0
    img[rng.random(shape) < 0.05] = 2 ** depth - 1
    if layout == "2x2G" and shape == (514, 514):
        img[256:258, :] = 0
        img[:, 256:258] = 0
    return img.astype({1: np.uint8, 6: np.uint8, 12: np.uint16, 24: np.uint32}[depth])


def _expected(img, layout):
    if layout == "2x2G" and img.shape == (512, 512):
        out = np.zeros((514, 514), img.dtype)
        out[:256, :256] = img[:256, :256]
        out[:256, 258:] = img[:256, 256:]
        out[258:, :256] = img[256:, :256]
        out[258:, 258:] = img[256:, 256:]
        return out
    return img


# --------------------------------------------------------------------------------------------
# framing
# --------------------------------------------------------------------------------------------

def test_mpx_prefix_round_trip():
    for n in (0, 1, 525056, 9_999_999_998):
        prefix = encode_mpx_prefix(n)
        assert len(prefix) == MPX_PREFIX_SIZE
        assert parse_mpx_prefix(prefix) == n
    assert frame_message(b"abc") == b"MPX,0000000004,abc"
    with pytest.raises(ValueError):
        encode_mpx_prefix(-1)
    with pytest.raises(ValueError):
        encode_mpx_prefix(10_000_000_000)


@pytest.mark.parametrize(
    "data, what",
    [
        (b"MPY,0000000010,", "magic"),
        (b"MPX,00000000x0,", "digits"),
        (b"MPX,-000000010,", "digits"),
        (b"MPX,0000000010;", "comma"),
        (b"MPX,0000000000,", "length 0"),
        (b"MPX,00000010,", "digits"),
    ],
)
def test_mpx_prefix_errors_name_the_offset(data, what):
    buf = b"junk" + data + b"payload"
    with pytest.raises(FramingError, match=what) as info:
        parse_mpx_prefix(buf, offset=4)
    assert info.value.offset == 4
    assert info.value.reason == "bad_framing"


def test_mpx_prefix_too_short():
    with pytest.raises(FramingError, match="needs 15 bytes") as info:
        parse_mpx_prefix(b"xMPX,000000", offset=1)
    assert info.value.offset == 1


def test_mpx_prefix_bounded_before_allocation():
    with pytest.raises(FramingError, match="more than"):
        parse_mpx_prefix(b"MPX,9999999999,", max_payload=525056)
    assert parse_mpx_prefix(memoryview(b"MPX,0000525057,"), max_payload=525056) == 525056


# --------------------------------------------------------------------------------------------
# acquisition header
# --------------------------------------------------------------------------------------------

def test_acquisition_header_tolerates_line_ends_spacing_and_padding():
    crlf = encode_acquisition_header(n_frames=4096, counter_depth=12, scan_shape=(64, 64))
    lf = crlf.replace(b"\r\n", b"\n").replace(b":\t", b":  ")
    no_prefix = crlf[len(b"HDR,\t\r\n"):]
    nul_padded = crlf.rstrip(b" ") + b"\x00" * 100
    for data in (crlf, lf, no_prefix, nul_padded, memoryview(crlf)):
        h = parse_acquisition_header(data)
        assert h.n_frames == 4096
        assert h.counter_depth == 12
        assert h.frames_per_trigger == 1
        assert h.assembly_size == "2x2"
        assert h.scan_shape == (64, 64)
        assert h.chip_mode == "SPM"
        assert h["Gain"] == "SLGM"


def test_acquisition_header_keeps_unknown_keys_and_finds_keys_loosely():
    text = (b"HDR,\r\nFrames in Acquisition (number):\t0\r\nCOUNTER DEPTH:\t24\r\n"
            b"Vendor Secret (x):\tabc:def\r\nScanX:\t3\r\nScanY:\t2\r\nEnd\t")
    h = parse_acquisition_header(text)
    assert h.n_frames == 0  # continuous
    assert h.counter_depth == 24
    assert h["Vendor Secret (x)"] == "abc:def"
    assert h.scan_shape == (2, 3)
    assert len(h) == 5 and list(h)[0] == "Frames in Acquisition (number)"


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "no fields"),
        (b"\x00" * 2048, "no fields"),
        (b"HDR,\r\njust some words\r\nEnd\t", "key: value"),
        (b"Frames in Acquisition (Number):\t9\r\n", "Counter Depth"),
        (b"Frames in Acquisition (Number):\tmany\r\nCounter Depth (number):\t12\r\n", "integer"),
        (b"Frames in Acquisition (Number):\t9\r\nCounter Depth (number):\t13\r\n", "depth"),
        (b"Frames in Acquisition (Number):\t-1\r\nCounter Depth (number):\t12\r\n", "negative"),
        (b"A:\x01\x02\r\n", "control"),
    ],
)
def test_acquisition_header_garbage_raises(data, match):
    with pytest.raises(HeaderError, match=match):
        parse_acquisition_header(data)


def test_encode_acquisition_header_rejects_unknown_fields():
    with pytest.raises(TypeError):
        encode_acquisition_header(n_frames=1, counter_depth=12, colour="blue")
    with pytest.raises(ValueError):
        encode_acquisition_header(n_frames=1, counter_depth=7)


# --------------------------------------------------------------------------------------------
# frame header
# --------------------------------------------------------------------------------------------

def test_frame_header_fields_and_sizes():
    enc = FrameEncoder(image_shape=(512, 512), counter_depth=1, raw=True, shutter_s=0.0005)
    hdr = enc.header(42, FIXED_TIME, extra_ns=7)
    assert len(hdr) == enc.header_size == 768
    assert hdr[:MQ1_PEEK] == b"MQ1,000042,00768"
    assert peek_header_size(hdr[:MQ1_PEEK]) == 768
    h = parse_frame_header(hdr)
    assert (h.sequence, h.n_chips, h.width, h.height) == (42, 4, 1024, 256)
    assert (h.pixel_type, h.layout, h.counter_depth, h.chip_select) == ("R64", "2x2", 1, 0xF)
    assert h.raw and h.pixel_bytes == 32768 and h.image_shape == (512, 512)
    assert h.image_dtype == np.uint8
    assert h.timestamp == "2024-03-01 12:00:00.123456"
    assert h.tail_timestamp == "2024-03-01T12:00:00.123456007Z"
    assert h.shutter_s == 0.0005 and h.shutter_ns == 500_000
    assert h.message_size == enc.message_size == 768 + 32768
    assert FrameEncoder(image_shape=(256, 256), layout="1x1").header_size == 384


def test_frame_header_local_time_and_utc_tail():
    tz = timezone(timedelta(hours=2))
    enc = FrameEncoder(image_shape=(256, 256), layout="1x1")
    h = parse_frame_header(enc.header(1, datetime(2024, 1, 1, 10, 0, 0, tzinfo=tz)))
    assert h.timestamp.startswith("2024-01-01 10:00:00")
    assert h.tail_timestamp.startswith("2024-01-01T08:00:00")


def test_sequence_beyond_six_digits():
    enc = FrameEncoder(image_shape=(256, 256), layout="1x1", counter_depth=6)
    hdr = enc.header(1_048_576, FIXED_TIME)
    assert peek_header_size(hdr) == 384
    assert parse_frame_header(hdr).sequence == 1_048_576


def _quad_header(**kw):
    return FrameEncoder(image_shape=(512, 512), counter_depth=12, **kw).header(3, FIXED_TIME)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda h: b"MQ2" + h[3:], "magic"),
        (lambda h: h[:11] + b"0x768" + h[16:], "5 digits"),
        (lambda h: h[:11] + b"00010" + h[16:], "outside"),
        (lambda h: h[:11] + b"00640" + h[16:], "cuts"),
        (lambda h: h[:12], "16 bytes"),
        (lambda h: h[:500], "available"),
        (lambda h: h.replace(b"U16", b"F32"), "pixel type"),
        (lambda h: h.replace(b"U16", b"U08"), "cannot be carried"),
        (lambda h: h.replace(b"0512,0512", b"0512,0513"), "at most 512x512"),
        (lambda h: h.replace(b"0512,0512", b"0512,0000"), "impossible"),
        (lambda h: h.replace(b",04,", b",03,"), "needs 4 chips"),
        (lambda h: h.replace(b"   2x2", b"   3x3"), "layout"),
        (lambda h: h.replace(b"1000000ns", b"1000000xs"), "tail"),
        (lambda h: h.replace(b"ns,12,", b"ns,13,"), "depth"),
        (lambda h: h.replace(b"0.001000", b"0.00x000"), "malformed"),
        (lambda h: h.replace(b"0.001000", b"-0.00100"), "shutter"),
        (lambda h: h.replace(b"2.000000E+0", b"2.0000x0E+0"), "thresholds"),
        (lambda h: h[:700] + b"\x01" + h[701:], "ASCII|NUL|cuts"),
        (lambda h: h[:700] + b"\xff" + h[701:], "ASCII"),
    ],
)
def test_frame_header_errors(mutate, match):
    data = b"x" * 10 + mutate(_quad_header())
    with pytest.raises(HeaderError, match=match) as info:
        parse_frame_header(data, offset=10)
    assert info.value.offset == 10
    assert info.value.reason == "bad_header"


def test_frame_header_error_names_sequence():
    bad = _quad_header().replace(b"U16", b"X16")
    with pytest.raises(HeaderError) as info:
        parse_frame_header(bad)
    assert info.value.sequence == 3


def test_frame_header_bounds_pixel_bytes_and_checks_depth_hint():
    hdr = _quad_header()
    with pytest.raises(HeaderError, match="more than"):
        parse_frame_header(hdr, max_pixel_bytes=1000)
    with pytest.raises(HeaderError, match="disagrees"):
        parse_frame_header(hdr, counter_depth=6)


def test_frame_header_without_tail_uses_hint():
    hdr = FrameEncoder(image_shape=(256, 256), layout="1x1", raw=True, counter_depth=6).header(
        1, FIXED_TIME)
    text = hdr.rstrip(b"\x00")
    old = text[:text.index(b",MQ1A")] + b","
    old = old.ljust(384, b"\x00")
    with pytest.raises(HeaderError, match="pass counter_depth"):
        parse_frame_header(old)
    h = parse_frame_header(old, counter_depth=6)
    assert h.counter_depth == 6 and h.pixel_bytes == 65536 and h.tail_timestamp is None


# --------------------------------------------------------------------------------------------
# pixel data: every type and layout round-trips
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth, raw, layout, shape", CASES)
def test_round_trip_every_pixel_type_and_layout(depth, raw, layout, shape):
    rng = np.random.default_rng(depth * 100 + raw * 10 + shape[1])
    enc = FrameEncoder(image_shape=shape, counter_depth=depth, raw=raw, layout=layout)
    img = _random_image(rng, shape, depth, layout)
    message = enc.encode(5, img, FIXED_TIME)
    assert len(message) == enc.message_size
    h = parse_frame_header(message)
    assert h.pixel_type == ("R64" if raw else {1: "U08", 6: "U08", 12: "U16", 24: "U32"}[depth])
    assert h.pixel_bytes == enc.pixel_bytes and h.header_size == enc.header_size
    assert h.counter_depth == depth
    expected = _expected(img, layout)
    assert h.image_shape == expected.shape
    pixels = memoryview(message)[h.header_size:]
    fast = FrameDecoder(h).decode(pixels)
    slow = FrameDecoder(h, use_numba=False).decode(bytes(pixels))
    assert fast.dtype == h.image_dtype == expected.dtype
    np.testing.assert_array_equal(fast, expected)
    np.testing.assert_array_equal(slow, expected)
    # decoding into a caller's buffer, from an ndarray
    out = np.full(h.image_shape, 7, h.image_dtype)
    dec = FrameDecoder(h)
    assert dec.decode(np.frombuffer(pixels, np.uint8), out=out) is out
    np.testing.assert_array_equal(out, expected)
    # pixels() into a caller's buffer (aligned or not) and the NumPy packing agree
    buf = bytearray(enc.pixel_bytes + 1)
    enc.pixels(img, out=memoryview(buf)[1:])
    assert bytes(buf[1:]) == bytes(pixels)
    slow_enc = FrameEncoder(image_shape=shape, counter_depth=depth, raw=raw, layout=layout,
                            use_numba=False)
    assert slow_enc.pixels(img) == bytes(pixels)


def test_raw_24bit_is_two_12bit_frames_high_first():
    img = np.zeros((256, 256), np.uint32)
    img[0, 0] = (0xABC << 12) | 0x123
    enc = FrameEncoder(image_shape=(256, 256), counter_depth=24, raw=True, layout="1x1")
    pix = enc.pixels(img)
    assert len(pix) == 2 * 256 * 256 * 2
    hi = FrameEncoder(image_shape=(256, 256), counter_depth=12, raw=True, layout="1x1")
    assert pix[:len(pix) // 2] == hi.pixels((img >> 12).astype(np.uint16))
    assert pix[len(pix) // 2:] == hi.pixels((img & 0xFFF).astype(np.uint16))


def test_raw_packing_lsb_first():
    # pixel 0 is bit 0 of the first big-endian 64-bit word: the word's last byte
    img = np.zeros((256, 256), np.uint8)
    img[0, 0] = 1
    pix = FrameEncoder(image_shape=(256, 256), counter_depth=1, raw=True, layout="1x1").pixels(img)
    assert pix[:8] == b"\x00" * 7 + b"\x01"
    img6 = np.zeros((256, 256), np.uint8)
    img6[0, :8] = np.arange(1, 9)
    enc6 = FrameEncoder(image_shape=(256, 256), counter_depth=6, raw=True, layout="1x1")
    pix6 = enc6.pixels(img6)
    assert pix6[:8] == bytes(range(8, 0, -1))


@pytest.mark.parametrize("layout, n_chips", [("1x1", 1), ("2x2", 4)])
@pytest.mark.parametrize("depth", [1, 6, 12])
def test_kernels_match_numpy_twins(layout, n_chips, depth):
    rng = np.random.default_rng(depth)
    row0, col0, flip = raw_chip_placement(layout)
    side = 256 if n_chips == 1 else 512
    nbytes = 256 * 256 * n_chips * {1: 1, 6: 8, 12: 16}[depth] // 8
    src = rng.integers(0, 256, nbytes, dtype=np.uint8)
    dtype = np.uint16 if depth == 12 else np.uint8
    fast = np.zeros((side, side), dtype)
    slow = np.ones((side, side), dtype)
    if depth == 1:
        fwd, rev = k.bit_luts()
        k.unpack_raw_1bit(src, fast.view(np.uint64), row0, col0, flip, fwd, rev)
        k.unpack_raw_1bit_numpy(src, slow, row0, col0, flip)
    else:
        k.unpack_raw_words(src.view(np.uint64), fast.view(np.uint64), row0, col0, flip,
                           fast.itemsize)
        k.unpack_raw_words_numpy(src, slow, row0, col0, flip, fast.itemsize)
    np.testing.assert_array_equal(fast, slow)
    # and the packing kernels invert them, like their twins
    packed_fast = np.zeros(nbytes, np.uint8)
    packed_slow = np.ones(nbytes, np.uint8)
    if depth == 1:
        k.pack_raw_1bit(fast.view(np.uint64), packed_fast, row0, col0, flip)
        k.pack_raw_1bit_numpy(fast, packed_slow, row0, col0, flip)
    else:
        k.pack_raw_words(fast.view(np.uint64), packed_fast.view(np.uint64), row0, col0, flip,
                         fast.itemsize)
        k.pack_raw_words_numpy(fast, packed_slow, row0, col0, flip, fast.itemsize)
    np.testing.assert_array_equal(packed_fast, src)
    np.testing.assert_array_equal(packed_slow, src)


@pytest.mark.parametrize("layout, n_chips", [("1x1", 1), ("2x2", 4)])
@pytest.mark.parametrize("bin_factor", [8, 16, 64])
def test_raw_1bit_binning_equals_unpack_then_sum(layout, n_chips, bin_factor):
    rng = np.random.default_rng(bin_factor + n_chips)
    row0, col0, flip = raw_chip_placement(layout)
    side = 256 if n_chips == 1 else 512
    src = rng.integers(0, 256, 256 * 256 * n_chips // 8, dtype=np.uint8)
    src[:64] = 0xFF  # saturated bytes and empty ones: where bit counting goes wrong
    src[64:128] = 0
    image = np.zeros((side, side), np.uint8)
    fwd, rev = k.bit_luts()
    k.unpack_raw_1bit(src, image.view(np.uint64), row0, col0, flip, fwd, rev)
    expected = image.reshape(side // bin_factor, bin_factor, side // bin_factor, bin_factor).sum(axis=(1, 3))
    fast = np.zeros((side // bin_factor,) * 2, np.int32)
    slow = np.zeros((side // bin_factor,) * 2, np.int32)
    k.bin_raw_1bit(src, fast, row0, col0, flip, bin_factor)
    k.bin_raw_1bit_numpy(src, slow, row0, col0, flip, bin_factor)
    np.testing.assert_array_equal(fast, expected)
    np.testing.assert_array_equal(slow, expected)
    k.bin_raw_1bit(src, fast, row0, col0, flip, bin_factor)  # it adds: a second frame doubles
    np.testing.assert_array_equal(fast, 2 * expected)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_byte_swap_kernels_match_numpy_twin(dtype, shift):
    rng = np.random.default_rng(shift)
    n = 1031  # not a multiple of any vector width
    values = rng.integers(0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True)
    raw = values.astype(np.dtype(dtype).newbyteorder(">")).tobytes()
    buf = np.zeros(len(raw) + shift, np.uint8)
    src = buf[shift:]  # unaligned for shift > 0, as pixels behind an MQ1 header are
    src[:] = np.frombuffer(raw, np.uint8)
    fast = np.zeros(n, dtype)
    slow = np.ones(n, dtype)
    (k.swap_be16 if dtype == np.uint16 else k.swap_be32)(src, fast)
    k.swap_be_numpy(src, slow)
    np.testing.assert_array_equal(fast, values)
    np.testing.assert_array_equal(slow, values)


@pytest.mark.parametrize("depth", [12, 24])
def test_processed_decoder_numba_and_numpy_agree(depth):
    enc = FrameEncoder(image_shape=(256, 256), counter_depth=depth, raw=False, layout="1x1")
    img = _random_image(np.random.default_rng(depth), (256, 256), depth, "1x1")
    msg = enc.encode(3, img, FIXED_TIME)
    h = parse_frame_header(msg)
    shifted = bytearray(b"\x00" + msg[h.header_size:])
    for use_numba in (True, False):
        out = np.zeros(h.image_shape, h.image_dtype)
        got = FrameDecoder(h, use_numba=use_numba).decode(memoryview(shifted)[1:], out=out)
        assert got is out
        np.testing.assert_array_equal(out, img)


def test_decoder_matches_and_unaligned_input():
    enc = FrameEncoder(image_shape=(512, 512), counter_depth=12, raw=True)
    img = _random_image(np.random.default_rng(1), (512, 512), 12, "2x2")
    msg = enc.encode(1, img, FIXED_TIME)
    h = parse_frame_header(msg)
    dec = FrameDecoder(h)
    assert dec.matches(parse_frame_header(enc.encode(2, img, FIXED_TIME)))
    assert not dec.matches(parse_frame_header(FrameEncoder(counter_depth=6, raw=True).header(1)))
    shifted = bytearray(b"\x00" + msg[h.header_size:])
    np.testing.assert_array_equal(dec.decode(memoryview(shifted)[1:]), img)


def test_decoder_rejects_wrong_size_and_out():
    h = parse_frame_header(FrameEncoder(counter_depth=12).header(9))
    dec = FrameDecoder(h)
    with pytest.raises(PixelDataError, match="524287 bytes") as info:
        dec.decode(bytes(h.pixel_bytes - 1))
    assert info.value.sequence == 9
    with pytest.raises(PixelDataError):
        dec.decode(np.zeros((512, 1024), np.uint8)[:, ::2])
    with pytest.raises(ValueError, match="out must"):
        dec.decode(bytes(h.pixel_bytes), out=np.zeros((512, 512), np.uint8))


@pytest.mark.parametrize("depth, raw",
                         [(1, True), (6, False), (12, False), (12, True), (24, False)])
def test_encoder_validates_values(depth, raw):
    enc = FrameEncoder(image_shape=(256, 256), counter_depth=depth, raw=raw, layout="1x1")
    img = np.zeros((256, 256), np.int64)
    img[5, 5] = 2 ** depth
    with pytest.raises(ValueError, match="outside"):
        enc.pixels(img)
    img[5, 5] = -1
    with pytest.raises(ValueError, match="outside"):
        enc.pixels(img)
    with pytest.raises(ValueError, match="shape"):
        enc.pixels(np.zeros((512, 512), np.uint8))
    with pytest.raises(ValueError, match="integer"):
        enc.pixels(np.zeros((256, 256), np.float32))


def test_encoder_rejects_bad_configuration():
    with pytest.raises(ValueError):
        FrameEncoder(image_shape=(600, 512))  # larger than a quad (the default layout 2x2)
    with pytest.raises(ValueError):
        FrameEncoder(image_shape=(256, 256), raw=True)  # raw quad rows are 512 wide
    with pytest.raises(ValueError):
        FrameEncoder(image_shape=(257, 256), layout="1x1", raw=True)
    with pytest.raises(ValueError):
        FrameEncoder(counter_depth=8)
    with pytest.raises(ValueError):
        FrameEncoder(layout="4x4")
    with pytest.raises(ValueError):
        FrameEncoder(image_shape=(256, 512), layout="2x1", raw=True)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth, raw, layout, shape", [
    (12, False, "2x2", (512, 512)), (1, True, "2x2", (512, 512)), (6, True, "1x1", (256, 256)),
    (24, True, "2x2G", (514, 514)), (1, False, "2x1", (256, 512))])
def test_write_mib_reads_back(tmp_path, depth, raw, layout, shape):
    rng = np.random.default_rng(0)
    frames = np.stack([_random_image(rng, shape, depth, layout) for _ in range(3)])
    mib, hdr = write_mib(tmp_path / "scan", frames, counter_depth=depth, raw=raw, layout=layout,
                         scan_shape=(1, 3), start_time=FIXED_TIME)
    assert mib.name == "scan.mib" and hdr.name == "scan.hdr"
    np.testing.assert_array_equal(read_mib(mib), frames)
    with MibFile(mib) as f:
        assert f.acquisition_header.n_frames == 3
        assert f.acquisition_header.scan_shape == (1, 3)
        assert [h.sequence for h in f.headers] == [1, 2, 3]
        stamps = [h.timestamp for h in f.headers]
        assert stamps == sorted(stamps) and len(set(stamps)) == 3
    assert len(hdr.read_bytes()) == 2048


def test_mib_writer_streams_and_counts(tmp_path):
    with MibWriter(tmp_path / "live.mib", counter_depth=6, layout="1x1") as w:
        for i in range(4):
            w.write(np.full((256, 256), i, np.uint8))
        assert not (tmp_path / "live.hdr").exists()
    h = parse_acquisition_header((tmp_path / "live.hdr").read_bytes())
    assert h.n_frames == 4 and h.counter_depth == 6 and h.assembly_size == "1x1"
    frames = read_mib(tmp_path / "live.mib")
    assert [int(f[0, 0]) for f in frames] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="closed"):
        w.write(np.zeros((256, 256), np.uint8))


def _two_frame_file(tmp_path, depth=12):
    rng = np.random.default_rng(3)
    frames = np.stack([_random_image(rng, (256, 256), depth, "1x1") for _ in range(2)])
    mib, _ = write_mib(tmp_path / "two", frames, counter_depth=depth, layout="1x1",
                       start_time=FIXED_TIME)
    return mib, frames


def test_truncated_file_raise_or_skip(tmp_path):
    mib, frames = _two_frame_file(tmp_path)
    data = mib.read_bytes()
    record = len(data) // 2
    mib.write_bytes(data[:-100])
    with pytest.raises(PixelDataError, match="truncated") as info:
        MibFile(mib)
    assert info.value.offset == record and info.value.sequence == 2
    with MibFile(mib, on_truncated="skip") as f:
        assert f.n_frames == 1
        np.testing.assert_array_equal(f.frame(0), frames[0])
    mib.write_bytes(data[:10])
    with pytest.raises(HeaderError):
        MibFile(mib)
    mib.write_bytes(data[:300])
    with pytest.raises(HeaderError):
        MibFile(mib)
    with pytest.raises(ValueError):
        MibFile(mib, on_truncated="ignore")


def test_corrupt_second_header_names_offset_and_sequence(tmp_path):
    mib, frames = _two_frame_file(tmp_path)
    data = bytearray(mib.read_bytes())
    record = len(data) // 2
    data[record + 30:record + 33] = b"U32"
    mib.write_bytes(bytes(data))
    with MibFile(mib) as f:
        np.testing.assert_array_equal(f.frame(0), frames[0])
        with pytest.raises(HeaderError) as info:
            f.frame(1)
        assert info.value.offset == record and info.value.sequence == 2
    data[record:record + 3] = b"XXX"
    mib.write_bytes(bytes(data))
    with pytest.raises(HeaderError, match="magic") as info:
        read_mib(mib)
    assert info.value.offset == record


def test_mibfile_without_hdr(tmp_path):
    mib, frames = _two_frame_file(tmp_path, depth=6)
    mib.with_suffix(".hdr").unlink()
    with MibFile(mib) as f:
        assert f.acquisition_header is None
        assert f.first_header.counter_depth == 6
        assert len(f) == 2 and f.image_shape == (256, 256)
        with pytest.raises(IndexError):
            f.header(2)
    np.testing.assert_array_equal(read_mib(mib), frames)


# --------------------------------------------------------------------------------------------
# property-based: only documented exceptions come out of the parsers and decoder
# --------------------------------------------------------------------------------------------

_SETTINGS = settings(max_examples=300, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
_VALID_HEADERS = [
    FrameEncoder(image_shape=s, counter_depth=d, raw=r, layout=lay).header(1, FIXED_TIME)
    for d, r, lay, s in [(12, False, "2x2", (512, 512)), (1, True, "2x2", (512, 512)),
                         (6, True, "1x1", (256, 256)), (24, False, "2x2G", (514, 514))]
]


@st.composite
def _mutated(draw, seeds):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 2))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == 1:
            data[pos:pos] = draw(st.binary(max_size=8))
        else:
            del data[pos:pos + draw(st.integers(1, 40))]
    return bytes(data)


@_SETTINGS
@given(st.one_of(st.binary(max_size=20), _mutated([b"MPX,0000525057,"])),
       st.integers(0, 3), st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_parse_mpx_prefix(data, offset, max_payload):
    try:
        n = parse_mpx_prefix(data, offset=offset, max_payload=max_payload)
    except FramingError:
        return
    assert 0 <= n <= (max_payload if max_payload is not None else n)


@_SETTINGS
@given(st.one_of(st.binary(max_size=800), _mutated(_VALID_HEADERS)),
       st.sampled_from([None, 1, 6, 12, 24]))
def test_fuzz_parse_frame_header(data, depth):
    try:
        h = parse_frame_header(data, counter_depth=depth, max_pixel_bytes=4 * 1024 * 1024)
    except HeaderError:
        return
    assert h.pixel_bytes <= 4 * 1024 * 1024
    dec = FrameDecoder(h)
    try:
        dec.decode(bytes(h.pixel_bytes - 1))
    except PixelDataError:
        pass
    else:
        raise AssertionError("short pixel data accepted")
    assert dec.decode(bytes(h.pixel_bytes)).shape == h.image_shape


@_SETTINGS
@given(st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda s: s.encode("utf-8")),
    _mutated([encode_acquisition_header(n_frames=9, counter_depth=12).rstrip(b" "),
              b"Frames in Acquisition (Number):\t9\nCounter Depth (number):\t1\nScanX:\t3\n"
              b"ScanY:\t4\n"]),
))
def test_fuzz_parse_acquisition_header(data):
    try:
        h = parse_acquisition_header(data)
    except HeaderError:
        return
    assert h.n_frames >= 0 and h.counter_depth in (1, 6, 12, 24)
    assert h.scan_shape is None or min(h.scan_shape) >= 1
    h.assembly_size, h.frames_per_trigger, h.thresholds  # noqa: B018 - must not raise


_DECODERS = [FrameDecoder(parse_frame_header(h)) for h in _VALID_HEADERS]


@_SETTINGS
@given(st.sampled_from(range(len(_DECODERS))), st.integers(-3, 3),
       st.sampled_from([1, 7, 4096]), st.integers(0, 2**32 - 1))
def test_fuzz_decode(which, delta, step, seed):
    dec = _DECODERS[which]
    size = max(0, dec.pixel_bytes + delta * step)
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    try:
        img = dec.decode(data)
    except PixelDataError:
        assert size != dec.pixel_bytes
        return
    assert size == dec.pixel_bytes
    assert img.shape == dec.image_shape
    if dec.header.raw and dec.header.counter_depth in (1, 6, 12):
        assert img.max() < 2 ** {1: 1, 6: 8, 12: 16}[dec.header.counter_depth]

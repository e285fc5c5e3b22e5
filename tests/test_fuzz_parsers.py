"""Property-based fuzzing of the parsers and decoders (issue 7): the short, deterministic run.

Every target of ``benchmarks/fuzz_parsers.py`` (MPX prefix, MQ1 size peek and header, HDR,
FrameDecoder for every pixel type and layout, MibFile on mutated real and encoder-made files, the
ZeroMQ wire format) gets a few hundred hypothesis examples: a valid seed input mutated by a drawn
list of operations. Each must return or raise a documented ProtocolError subclass, and its peak
allocation (tracemalloc) must stay below the target's bound. Derandomised, so CI is not flaky;
the dedicated run (100,000 inputs) is ``python benchmarks/fuzz_parsers.py``.

Below the property tests: regression tests with the minimal inputs of the bugs fuzzing found.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamclust.adapters.eds_file import EDSRecordingError, read_eds_recording
from streamclust.adapters.errors import FramingError, HeaderError, PixelDataError, WireFormatError
from streamclust.adapters.framing import parse_mpx_prefix
from streamclust.adapters.mib import (
    FrameDecoder,
    MibFile,
    parse_acquisition_header,
    parse_frame_header,
    peek_header_size,
)
from streamclust.adapters.wire import MAX_HEADER_BYTES, decode_array_message
from streamclust.simulators.eds_recording import write_eds_recording
from streamclust.simulators.mib_encode import FrameEncoder

_HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_parsers.py"
_spec = importlib.util.spec_from_file_location("streamclust_fuzz_parsers", _HARNESS)
fz = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fz  # dataclasses look their module up there
_spec.loader.exec_module(fz)

# examples per target: the whole file stays well under 30 s on a shared 2-core machine
EXAMPLES = 200
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)
# the targets run in-process here; eds_file is left to the dedicated run's killable worker
# because the HDF5 C library can loop forever on a damaged file (see docs/fuzzing.md)
IN_PROCESS_TARGETS = ["mpx_prefix", "peek_header_size", "frame_header", "acquisition_header",
                      "frame_decode", "mib_file", "wire"]

op_strategy = st.tuples(
    st.sampled_from(fz.OPS), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.booleans(), st.binary(min_size=1, max_size=64),
)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    cases = fz.build_cases(tmp_path_factory.mktemp("fuzz"), quick=True)
    # run every seed once untraced first: on a fresh machine (no Numba cache) the first decode
    # compiles its kernel, and the compiler's own allocations are not the decoder's
    for name in IN_PROCESS_TARGETS:
        for case in cases[name]:
            fz.run_one(case, case.seed, trace=False)
    return cases


@pytest.fixture(scope="module")
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


@pytest.fixture
def quiet_files(caplog):
    # MibFile logs skipped partial records and frame-count mismatches: expected here
    caplog.set_level(logging.ERROR, logger="streamclust")


@pytest.mark.parametrize("target", IN_PROCESS_TARGETS)
@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_target(target, targets, traced, quiet_files, data):
    cases = targets[target]
    case = data.draw(st.sampled_from(cases), label="case")
    seed = case.seed
    if case.structured is not None and data.draw(st.booleans(), label="structured"):
        # the fields of the structured mutation's integer drawn separately: hypothesis then
        # explores each choice (key, action, value, fit the buffer) instead of one opaque number
        r = (data.draw(st.integers(0, 255), label="key")
             | data.draw(st.integers(0, 7), label="action") << 8
             | data.draw(st.integers(0, len(fz.JSON_VALUES) - 1), label="value") << 12
             | data.draw(st.integers(0, 1), label="fit") << 20)
        seed = case.structured(seed, r)
    ops = data.draw(st.lists(op_strategy, max_size=4), label="ops")
    inp = fz.mutate(seed, ops, case.hot)
    out = fz.run_one(case, inp)
    assert out.documented, f"{case.name}: undocumented {out.exc_name}: {out.exc_msg}"
    assert not out.over_bound, f"{case.name}: peak {out.peak} B over the bound {out.bound} B"


def test_seeds_are_accepted(targets, traced, quiet_files):
    # the seeds must pass (or fail only where the case's bound rejects them on purpose):
    # otherwise the fuzzer would only ever exercise rejection paths
    for name in IN_PROCESS_TARGETS:
        for case in targets[name]:
            out = fz.run_one(case, case.seed)
            assert (out.exc_name is None) == case.seed_ok, (
                f"{case.name}: {out.exc_name} {out.exc_msg}")
            assert not out.over_bound, case.name


def test_mutation_ops_change_and_stay_deterministic():
    seed = b"MQ1,000001,00768,04,0512,0512,U16,   2x2,0F," + bytes(20)
    hot = ((0, 45),)
    for name in fz.OPS:
        op = (name, 12345, 678, True, b"\xff")
        once = fz.mutate(seed, [op], hot)
        assert once == fz.mutate(seed, [op], hot)
        if name not in ("refill",):
            assert once != seed or name == "zero_run", name


# ---------------------------------------------------------------------------------------------
# boundary numbers in length fields
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [b"0000000000", b"9999999999", b"0000000001", b"-000000001",
                                    b"00000000 1", b"\xd9\xa2" + b"0" * 8])
def test_mpx_length_boundaries(length):
    prefix = b"MPX," + length + b","
    try:
        payload = parse_mpx_prefix(prefix, max_payload=1 << 20)
    except FramingError:
        return
    assert 0 <= payload <= 1 << 20


@pytest.mark.parametrize("size", [b"00000", b"00063", b"65537", b"99999", b"0076a"])
def test_mq1_header_size_boundaries(size):
    data = b"MQ1,000001," + size + b"," + bytes(60)
    with pytest.raises(HeaderError):
        peek_header_size(data)


def test_mq1_header_claiming_65536_bytes_in_a_short_buffer():
    # the largest legal header size over 100 bytes: rejected without reading past the buffer
    data = b"MQ1,000001,65536,01,0256,0256,U16,   1x1,01," + bytes(60)
    with pytest.raises(HeaderError, match="only"):
        parse_frame_header(data)


def test_max_pixel_bytes_rejects_before_decoding():
    enc = FrameEncoder(image_shape=(256, 256), counter_depth=12, layout="1x1")
    msg = enc.encode(1, np.zeros((256, 256), np.uint16))
    with pytest.raises(HeaderError, match="allowed"):
        parse_frame_header(msg, max_pixel_bytes=enc.pixel_bytes - 1)
    assert parse_frame_header(msg, max_pixel_bytes=enc.pixel_bytes).pixel_bytes == enc.pixel_bytes


@pytest.mark.parametrize("value", [b"9999999999", b"-1", b"1e9", b"9" * 5000, b""])
def test_hdr_frame_count_boundaries(value):
    text = b"HDR,\r\nFrames in Acquisition (Number):\t" + value + b"\r\nCounter Depth (number):\t6\r\nEnd"
    try:
        header = parse_acquisition_header(text)
    except HeaderError:
        return
    assert header.n_frames == int(value)


@pytest.mark.parametrize("pixels", [b"", b"\x00", bytes(65535), bytes(65537)])
def test_decoder_wrong_size(pixels):
    enc = FrameEncoder(image_shape=(256, 256), counter_depth=12, raw=True, layout="1x1")
    header = parse_frame_header(enc.encode(1, np.zeros((256, 256), np.uint16)))
    with pytest.raises(PixelDataError):
        FrameDecoder(header).decode(pixels)


def test_mib_file_with_a_changed_length_field_is_rejected(tmp_path):
    enc = FrameEncoder(image_shape=(256, 256), counter_depth=6, layout="1x1")
    msg = bytearray(enc.encode(1, np.zeros((256, 256), np.uint8)) * 2)
    second = enc.message_size
    msg[second + 11:second + 16] = b"00384"[:5] if enc.header_size != 384 else b"00768"
    path = tmp_path / "a.mib"
    path.write_bytes(bytes(msg))
    with MibFile(path) as f, pytest.raises(HeaderError) as info:
        f.read_all()
    assert info.value.offset == second


# ---------------------------------------------------------------------------------------------
# regressions: minimal inputs of the bugs the fuzzer found
# ---------------------------------------------------------------------------------------------

def _wire_header(**overrides) -> dict:
    head = {"stream": "x", "version": 1, "scan_id": "s", "sequence": 1, "dtype": "<u2",
            "shape": [1]}
    head.update(overrides)
    return head


def test_regression_deeply_nested_json_header():
    # was RecursionError out of json.loads; now a counted bad_json drop
    raw = b"[" * 50_000
    assert len(raw) <= MAX_HEADER_BYTES
    with pytest.raises(WireFormatError) as info:
        decode_array_message([raw, b""])
    assert info.value.kind == "bad_json"


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**62, 2**62], [0, 10**30]])
def test_regression_zero_size_shape_with_a_huge_dimension(shape):
    # was numpy's plain ValueError out of reshape (the claimed size, 0, matched the empty buffer)
    with pytest.raises(WireFormatError) as info:
        decode_array_message([json.dumps(_wire_header(shape=shape)).encode(), b""])
    assert info.value.kind == "bad_shape"


def test_regression_eds_number_beyond_float_range():
    # was OverflowError out of math.isfinite(10**400)
    head = _wire_header(stream="eds", position=0, live_time_s=10**400, real_time_s=1.0,
                        energy_offset_kev=0.0, channel_width_kev=0.01, scan_shape=[1])
    with pytest.raises(WireFormatError) as info:
        decode_array_message([json.dumps(head).encode(), b"\x00\x00"])
    assert info.value.kind == "bad_value"


def _eds_file(tmp_path) -> Path:
    path = tmp_path / "eds.h5"
    write_eds_recording(path, np.ones((2, 3, 16), np.uint16), scan_shape=(2, 3),
                        energy_offset_kev=0.0, channel_width_kev=0.01, live_time_s=0.01)
    return path


def test_regression_damaged_hdf5_content_is_an_eds_recording_error(tmp_path):
    # was h5py's OSError ("Can't synchronously read data") escaping read_eds_recording: the
    # attribute/dataset reads of a damaged file are now wrapped; truncations hit the same paths
    path = _eds_file(tmp_path)
    good = path.read_bytes()
    damaged = tmp_path / "damaged.h5"
    errors = 0
    for cut in range(0, len(good), max(1, len(good) // 24)):
        damaged.write_bytes(good[:cut])
        try:
            read_eds_recording(damaged)
        except EDSRecordingError:
            errors += 1
    assert errors >= 20


def test_eds_max_bytes_bounds_the_spectra(tmp_path):
    path = _eds_file(tmp_path)
    assert read_eds_recording(path, max_bytes=2 * 3 * 16 * 2).spectra.shape == (2, 3, 16)
    with pytest.raises(EDSRecordingError, match="exceeds"):
        read_eds_recording(path, max_bytes=2 * 3 * 16 * 2 - 1)

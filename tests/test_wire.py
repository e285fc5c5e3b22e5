"""The JSON-header + raw-buffer wire format, over real ZeroMQ sockets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamclust.adapters.errors import WireFormatError
from streamclust.adapters.wire import (MAX_HEADER_BYTES, decode_array_message, encode_array_message, recv_array,
                                       send_array)

DTYPES = ["|b1", "|i1", "|u1"] + [f"{o}{k}{n}" for o in "<>" for k, sizes in
                                   (("i", (2, 4, 8)), ("u", (2, 4, 8)), ("f", (2, 4, 8)), ("c", (8, 16)))
                                   for n in sizes]
SHAPES = [(), (0,), (7,), (3, 5), (2, 3, 4), (1, 1, 1, 1), (0, 4)]


def frame_header(**extra):
    head = {"stream": "frame", "scan_id": "t", "position": 0, "sequence": 1, "merlin_sequence": 1}
    head.update(extra)
    return head


@pytest.fixture
def push_pull():
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.linger = 0
    push.connect(f"tcp://127.0.0.1:{port}")
    pull.rcvtimeo = 5000
    yield push, pull
    push.close(linger=0)
    pull.close(linger=0)


def sample(dtype: str, shape: tuple) -> np.ndarray:
    n = int(np.prod(shape))
    base = np.arange(n) % 7 - 3
    if np.dtype(dtype).kind == "b":
        return (base > 0).reshape(shape).astype(dtype)
    if np.dtype(dtype).kind == "u":
        base = np.abs(base)
    arr = base.astype(dtype).reshape(shape)
    if np.dtype(dtype).kind == "c":
        arr = np.asarray(arr + 1j * arr).astype(dtype)
    return arr


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype_and_shape_over_tcp(push_pull, dtype):
    push, pull = push_pull
    for shape in SHAPES:
        arr = sample(dtype, shape)
        send_array(push, frame_header(), arr)
        header, got = recv_array(pull)
        assert header["dtype"] == np.dtype(dtype).str
        assert header["shape"] == list(shape)
        assert got.dtype == np.dtype(dtype)
        assert got.shape == shape
        np.testing.assert_array_equal(got, arr)


def test_large_array_goes_zero_copy_and_arrives_intact(push_pull):
    push, pull = push_pull
    arr = np.random.default_rng(0).integers(0, 4096, size=(512, 512), dtype=np.uint16)
    parts = encode_array_message(frame_header(), arr)
    assert np.shares_memory(np.frombuffer(parts[1], np.uint8), arr)  # zero-copy encode
    send_array(push, frame_header(), arr)
    header, got = recv_array(pull)
    np.testing.assert_array_equal(got, arr)
    assert not got.flags.writeable


def test_non_contiguous_input_is_sent_in_c_order(push_pull):
    push, pull = push_pull
    arr = np.arange(24, dtype="<i4").reshape(4, 6)[:, ::2].T
    send_array(push, frame_header(), arr)
    _, got = recv_array(pull)
    np.testing.assert_array_equal(got, arr)


def test_encode_rejects_object_and_string_dtypes():
    with pytest.raises(TypeError, match="dtype"):
        encode_array_message(frame_header(), np.array(["a", "b"]))
    with pytest.raises(TypeError, match="dtype"):
        encode_array_message(frame_header(), np.array([object()], dtype=object))


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(dtype=st.sampled_from(DTYPES), shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0,
                                                                          max_side=5)))
def test_round_trip_property(arr):
    header, got = decode_array_message(encode_array_message(frame_header(), arr))
    assert got.shape == arr.shape and got.dtype == arr.dtype
    np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


# -- malformed messages: each kind -----------------------------------------------------------
def good_parts():
    head = frame_header(sequence=42)
    head.update(version=1, dtype="<u2", shape=[2, 2])
    return head, np.arange(4, dtype="<u2").tobytes()


def with_header(**changes):
    head, buf = good_parts()
    for k, v in changes.items():
        if v is ...:
            del head[k]
        else:
            head[k] = v
    return [json.dumps(head).encode(), buf]


MALFORMED = {
    "part_count": [b'{"stream": "frame"}'],
    "header_too_large": [b" " * (MAX_HEADER_BYTES + 1), b""],
    "bad_json": [b"{not json", b""],
    "bad_json_utf8": [b"\xff\xfe", b""],
    "bad_json_array": [b"[1, 2]", b""],
    "missing_key": with_header(dtype=...),
    "missing_stream_key": with_header(merlin_sequence=...),
    "bad_version": with_header(version=2),
    "bad_value": with_header(position=-1),
    "bad_value_bool": with_header(position=True),
    "bad_sequence": with_header(sequence=0),
    "bad_dtype": with_header(dtype="O"),
    "bad_dtype_native": with_header(dtype="=u2"),
    "bad_dtype_noncanonical": with_header(dtype="|u2"),
    "bad_shape": with_header(shape=[2, -2]),
    "bad_shape_type": with_header(shape="2x2"),
    "too_large": with_header(shape=[1 << 40, 1 << 20]),
    "size_mismatch": with_header(shape=[2, 3]),
    "wrong_stream": with_header(stream="eds"),
    # JSON true and 1.0 compare equal to 1: the version must be the integer itself
    "bad_version_bool": with_header(version=True),
    "bad_version_float": with_header(version=1.0),
    # the 1-D fast path (spectra) checks what the general one does
    "bad_shape_1d_negative": with_header(shape=[-4]),
    "bad_shape_1d_bool": with_header(shape=[True]),
    "bad_shape_1d_float": with_header(shape=[4.0]),
    "size_mismatch_1d": with_header(shape=[5]),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_each_malformed_kind_is_rejected_with_its_kind(push_pull, name):
    push, pull = push_pull
    push.send_multipart(MALFORMED[name])
    kind = {"bad_json_utf8": "bad_json", "bad_json_array": "bad_json", "missing_stream_key": "missing_key",
            "bad_value_bool": "bad_value", "bad_sequence": "bad_value", "bad_dtype_native": "bad_dtype",
            "bad_dtype_noncanonical": "bad_dtype", "bad_shape_type": "bad_shape",
            "wrong_stream": "wrong_stream", "bad_version_bool": "bad_version", "bad_version_float": "bad_version",
            "bad_shape_1d_negative": "bad_shape", "bad_shape_1d_bool": "bad_shape", "bad_shape_1d_float": "bad_shape",
            "size_mismatch_1d": "size_mismatch"}.get(name, name)
    with pytest.raises(WireFormatError) as info:
        recv_array(pull, max_bytes=1 << 20, expect_stream="frame")
    assert info.value.kind == kind
    assert info.value.reason == "bad_message"
    if kind in ("part_count", "header_too_large", "bad_json") or name == "bad_sequence":
        assert info.value.sequence is None  # not known (or not trustworthy) yet
    else:
        assert info.value.sequence == 42
        assert "sequence 42" in str(info.value)


def test_claimed_size_is_never_allocated_without_a_bound():
    # no max_bytes: a header claiming 2**60 bytes must fail on the size check, not allocate
    parts = with_header(shape=[1 << 30, 1 << 30])
    with pytest.raises(WireFormatError) as info:
        decode_array_message(parts, max_bytes=None)
    assert info.value.kind == "size_mismatch"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=64))
def test_random_bytes_only_ever_raise_wire_format_error(head, buf):
    try:
        decode_array_message([head, buf])
    except WireFormatError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["stream", "version", "scan_id", "position", "sequence", "dtype",
                                        "shape", "merlin_sequence", "scan_shape", "totals", "of_stream"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-5, 1 << 70), st.floats(),
                                 st.text(max_size=6), st.lists(st.integers(-3, 1 << 40), max_size=4),
                                 st.sampled_from(["frame", "eds", "end", "<u2", "|u1", ">f8", "<c16"]))),
       st.binary(max_size=64))
def test_random_headers_only_ever_raise_wire_format_error(head, buf):
    try:
        header, arr = decode_array_message([json.dumps(head).encode(), buf], max_bytes=1 << 16)
    except WireFormatError:
        return
    assert arr.nbytes == len(buf)


def test_a_cached_dtype_does_not_let_a_different_one_through():
    # "<u2" is validated once and then looked up; its neighbours must still be judged on their own
    ok = with_header(shape=[4])
    for _ in range(2):
        header, array = decode_array_message(ok)
        assert array.dtype == np.dtype("<u2") and array.tolist() == [0, 1, 2, 3]
    big = with_header(dtype=">u2", shape=[4])
    assert decode_array_message(big)[1].tolist() == [0, 256, 512, 768]
    for bad in ("|u2", "=u2", "<u2 ", "u2"):
        with pytest.raises(WireFormatError) as info:
            decode_array_message(with_header(dtype=bad, shape=[4]))
        assert info.value.kind == "bad_dtype"


def test_headers_are_parsed_as_json_loads_would():
    _, buf = good_parts()
    head = json.loads(with_header()[0])
    text = json.dumps(head)
    assert decode_array_message([f"  {text}\n".encode(), buf])[0] == head  # whitespace around: fine
    for bad in (text + "x", text + text, "\ufeff" + text):
        with pytest.raises(WireFormatError) as info:
            decode_array_message([bad.encode(), buf])
        assert info.value.kind == "bad_json"


def test_bytes_parts_from_a_copying_receive_decode_like_frames(push_pull):
    push, pull = push_pull
    parts = encode_array_message(frame_header(), np.arange(12, dtype="<i4").reshape(3, 4))
    push.send_multipart(parts)
    copied = pull.recv_multipart(copy=True)
    assert all(type(p) is bytes for p in copied)
    header, array = decode_array_message(copied)
    assert array.shape == (3, 4) and array.tolist() == np.arange(12).reshape(3, 4).tolist()
    assert not array.flags.writeable

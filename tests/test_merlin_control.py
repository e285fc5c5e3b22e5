"""The Merlin control port: byte-exact requests and replies, error codes, timeouts."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from streamclust.adapters.errors import ControlError, FramingError
from streamclust.adapters.framing import frame_message, parse_mpx_prefix
from streamclust.adapters.merlin_control import (
    ControlReply,
    MerlinControl,
    encode_control_request,
    parse_control_reply,
)
from streamclust.simulators.merlin import ArraySource, MerlinServer
from streamclust.simulators.merlin_control import PARAMETERS, DetectorSettings


@pytest.fixture
def server():
    frames = np.zeros((4, 256, 256), np.uint16)
    with MerlinServer(ArraySource(frames), data_port=0, control_port=0, layout="1x1") as s:
        yield s


def raw_request(address, payload: bytes) -> bytes:
    """Send one framed request with a bare socket and return the reply payload."""
    with socket.create_connection(address, timeout=5.0) as s:
        s.sendall(frame_message(payload))
        buf = b""
        while len(buf) < 15 or len(buf) < 15 + parse_mpx_prefix(buf[:15]):
            chunk = s.recv(4096)
            assert chunk, "server closed the control connection"
            buf += chunk
        assert len(buf) == 15 + parse_mpx_prefix(buf[:15])
        return buf[15:]


@pytest.mark.parametrize("request_,reply", [
    (b"GET,COUNTERDEPTH", b"GET,COUNTERDEPTH,12,0"),
    (b"GET,COUNTERDEPTH,0", b"GET,COUNTERDEPTH,12,0"),  # the ",0" form some clients send
    (b"SET,NUMFRAMESTOACQUIRE,100", b"SET,NUMFRAMESTOACQUIRE,0"),
    (b"SET,COUNTERDEPTH,5", b"SET,COUNTERDEPTH,3"),
    (b"SET,FILEFORMAT,1", b"SET,FILEFORMAT,3"),
    (b"SET,NUMFRAMESTOACQUIRE,many", b"SET,NUMFRAMESTOACQUIRE,3"),
    (b"SET,IMAGEX,128", b"SET,IMAGEX,2"),  # read-only
    (b"GET,WARPDRIVE", b"GET,WARPDRIVE,2"),
    (b"CMD,SELFDESTRUCT", b"CMD,SELFDESTRUCT,2"),
    (b"CMD,RESET,0", b"CMD,RESET,0"),
    (b"GET,DETECTORSTATUS", b"GET,DETECTORSTATUS,0,0"),
    (b"GET,IMAGEY", b"GET,IMAGEY,256,0"),
    (b"FROB,X", b"FROB,X,2"),
])
def test_reply_forms_byte_exact(server, request_, reply):
    assert raw_request(server.control_address, request_) == reply


def test_set_then_get_round_trip(server):
    with MerlinControl(*server.control_address) as ctl:
        ctl.set("ACQUISITIONTIME", 0.5)
        ctl.set("THRESHOLD0", 12.5)
        ctl.set("CONTINUOUSRW", True)
        assert float(ctl.get("ACQUISITIONTIME")) == 0.5
        assert float(ctl.get("THRESHOLD0")) == 12.5
        assert ctl.get_int("CONTINUOUSRW") == 1
        assert "sim" in ctl.get("SOFTWAREVERSION")
    assert server.settings.dwell_s == pytest.approx(0.0005)


def test_trailing_zero_client_form(server):
    with MerlinControl(*server.control_address, trailing_zero=True) as ctl:
        assert ctl.status() == 0
        ctl.reset()


@pytest.mark.parametrize("verb,name,value,code", [
    ("GET", "NOSUCHTHING", None, 2),
    ("SET", "COUNTERDEPTH", 7, 3),
    ("SET", "TRIGGERSTART", 9, 3),
    ("SET", "SOFTWAREVERSION", "1.0", 2),
    ("CMD", "LAUNCH", None, 2),
])
def test_errors_raise_control_error(server, verb, name, value, code):
    with MerlinControl(*server.control_address) as ctl:
        with pytest.raises(ControlError) as info:
            ctl.request(verb, name, value)
        assert info.value.code == code
        assert name in str(info.value)
        assert ctl.status() == 0  # the connection survives an error reply


def test_busy_while_acquiring(server):
    with MerlinControl(*server.control_address) as ctl:
        ctl.set("TRIGGERSTART", 5)  # soft trigger: armed, waits for SOFTTRIGGER
        ctl.start_acquisition()
        assert ctl.status() == 1
        with pytest.raises(ControlError) as info:
            ctl.start_acquisition()
        assert info.value.code == 1
        with pytest.raises(ControlError) as info:
            ctl.set("COUNTERDEPTH", 6)
        assert info.value.code == 1
        ctl.abort()
        assert server.wait_until_idle(5.0)
        assert ctl.status() == 0
        ctl.set("COUNTERDEPTH", 6)


def test_parse_reply_rejects_malformed():
    with pytest.raises(FramingError):
        parse_control_reply(b"GET,X")
    with pytest.raises(FramingError):
        parse_control_reply(b"HELLO,X,0")
    with pytest.raises(FramingError):
        parse_control_reply(b"SET,X,zero")
    with pytest.raises(FramingError):
        parse_control_reply(b"\xff\xfe")
    assert parse_control_reply(b"GET,SOFTWAREVERSION,0.77,0") == ControlReply("GET", "SOFTWAREVERSION", "0.77", 0)


def test_encode_request_validates():
    assert encode_control_request("cmd", "softtrigger", trailing_zero=True) == b"MPX,0000000018,CMD,SOFTTRIGGER,0"
    with pytest.raises(ValueError):
        encode_control_request("SET", "X")
    with pytest.raises(ValueError):
        encode_control_request("PUT", "X")
    with pytest.raises(ValueError):
        encode_control_request("SET", "X", "a,b")


class SilentServer:
    """Accepts a connection and never answers (or answers with a given byte string)."""

    def __init__(self, answer: bytes | None = None):
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5.0)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(4096)
            if self.answer is not None:
                conn.sendall(self.answer)
            self.done.wait(5.0)

    def close(self):
        self.done.set()
        self.thread.join(5.0)
        self.listener.close()


def test_silent_detector_times_out():
    silent = SilentServer()
    try:
        with MerlinControl(*silent.listener.getsockname()[:2], timeout=0.3) as ctl:
            with pytest.raises(TimeoutError, match="no reply"):
                ctl.status()
    finally:
        silent.close()


def test_oversized_reply_is_a_framing_error():
    liar = SilentServer(answer=b"MPX,9999999999,GET,")
    try:
        with MerlinControl(*liar.listener.getsockname()[:2], timeout=2.0) as ctl:
            with pytest.raises(FramingError, match="more than"):
                ctl.status()
    finally:
        liar.close()


def test_reply_to_another_request_is_rejected():
    wrong = SilentServer(answer=frame_message(b"GET,IMAGEX,256,0"))
    try:
        with MerlinControl(*wrong.listener.getsockname()[:2], timeout=2.0) as ctl:
            with pytest.raises(FramingError, match="does not answer"):
                ctl.status()
    finally:
        wrong.close()


def test_every_parameter_is_gettable():
    settings = DetectorSettings()
    for name in PARAMETERS:
        reply = settings.handle(f"GET,{name}".encode(), busy=False)[0]
        assert reply.startswith(f"GET,{name},".encode()) and reply.endswith(b",0")

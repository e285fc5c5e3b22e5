"""Ingest throughput: simulated Merlin server -> loopback TCP -> bare drain vs MerlinReceiver.

For each stream (quad 12-bit U16, raw 1-bit quad R64) this prints, measured in the same run:

The simulated server runs in its own process (as the detector PC is its own machine), so it does
not compete with the receiver for the GIL; both share this machine's cores.

* ``drain``: a bare client that only ``recv_into``s one buffer (the baseline; it also measures
  how fast the simulated server can send: the server must not be the limit);
* ``receiver``: :class:`MerlinReceiver` receiving *and decoding* every frame (``copy=True`` new
  image per frame, and ``copy=False`` reusing one image);
* the ratio receiver / drain, and the stage costs (frame decode alone, header formatting alone).

Goals: receiver >= 0.9x drain, >= 2,000 frames/s quad 12-bit, >= 12,500 frames/s raw 1-bit.

Run::

    .venv/bin/python benchmarks/bench_ingest.py            # default sizes
    .venv/bin/python benchmarks/bench_ingest.py --quick    # smaller, for a smoke run
    .venv/bin/python benchmarks/bench_ingest.py --profile  # cProfile of the consumer thread
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing as mp
import pstats
import socket
import time

import numpy as np

from streamclust.adapters.framing import MPX_PREFIX_SIZE
from streamclust.adapters.merlin import MerlinReceiver
from streamclust.adapters.merlin_control import MerlinControl
from streamclust.adapters.mib import FrameDecoder, parse_frame_header
from streamclust.simulators.merlin import ArraySource, MerlinServer
from streamclust.simulators.mib_encode import FrameEncoder, encode_acquisition_header

STREAMS = {
    "quad 12-bit U16": dict(layout="2x2", counter_depth=12, raw=False),
    "raw 1-bit quad R64": dict(layout="2x2", counter_depth=1, raw=True),
}


def make_source(depth: int, n_distinct: int = 32, seed: int = 0) -> ArraySource:
    rng = np.random.default_rng(seed)
    # sparse counts, like diffraction patterns: mostly 0, some bright pixels
    frames = rng.poisson(0.3, (n_distinct, 512, 512))
    frames = np.minimum(frames, 2**depth - 1).astype(np.uint16 if depth == 12 else np.uint8)
    return ArraySource(frames)


def _serve(conn, stream: dict) -> None:
    """Child process: the simulated detector, so it does not share the receiver's GIL."""
    source = make_source(stream["counter_depth"])
    with MerlinServer(source, data_port=0, control_port=0, headless=True, **stream) as server:
        conn.send((server.data_address, server.control_address))
        conn.recv()  # wait for "stop"


class RemoteServer:
    """A MerlinServer in its own process; acquisitions sized through the real control port."""

    def __init__(self, stream: dict):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, stream), daemon=True)
        self._proc.start()
        self.data_address, self.control_address = self._conn.recv()
        self.control = MerlinControl(*self.control_address, timeout=10.0).connect()

    def set_frames(self, n: int) -> None:
        self.control.set("NUMFRAMESTOACQUIRE", n)

    def wait_until_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.control.status() != 0:
            if time.monotonic() > deadline:
                raise TimeoutError("server still acquiring")
            time.sleep(0.01)

    def stop(self) -> None:
        self.control.close()
        self._conn.send("stop")
        self._proc.join(10.0)


def start_server(source, n_frames, **stream) -> RemoteServer:
    server = RemoteServer(stream)
    # warm the server's pixel cache (and Numba here) with a first acquisition nobody times
    server.set_frames(source.n_positions)
    with MerlinReceiver(*server.data_address, timeout=30.0) as rx:
        for _ in rx.frames():
            pass
    server.wait_until_idle(10.0)
    server.set_frames(n_frames)
    return server


def expected_bytes(n_frames: int, **stream) -> tuple[int, int]:
    hdr = MPX_PREFIX_SIZE + len(encode_acquisition_header(n_frames=n_frames, counter_depth=stream["counter_depth"],
                                                          layout=stream["layout"], raw=stream["raw"]))
    enc = FrameEncoder(image_shape=(512, 512), counter_depth=stream["counter_depth"], raw=stream["raw"],
                       layout=stream["layout"])
    return hdr, MPX_PREFIX_SIZE + enc.message_size


def drain(server: RemoteServer, n_frames: int, **stream) -> float:
    hdr, msg = expected_bytes(n_frames, **stream)
    total = hdr + n_frames * msg
    buf = bytearray(4 * 2**20)
    view = memoryview(buf)
    with socket.create_connection(server.data_address, timeout=10.0) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
        got = 0
        t0 = None
        while got < total:
            k = s.recv_into(view, min(len(buf), total - got))
            if k == 0:
                raise RuntimeError(f"server closed after {got} of {total} bytes")
            if t0 is None and got + k > hdr:
                t0 = time.perf_counter()
            got += k
        t1 = time.perf_counter()
    server.wait_until_idle(10.0)
    return n_frames / (t1 - t0)


def receive(server: RemoteServer, n_frames: int, copy: bool, profile: bool = False) -> tuple[float, dict]:
    prof = cProfile.Profile() if profile else None
    with MerlinReceiver(*server.data_address, timeout=10.0) as rx:
        it = rx.frames(copy=copy)
        first = next(it)
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        count = 1
        checksum = int(first.image[0, 0])
        for f in it:
            count += 1
            checksum += int(f.image[0, 0])
        t1 = time.perf_counter()
        if prof:
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(12)
        stats = rx.stats.as_dict()
    server.wait_until_idle(10.0)
    if count != n_frames or not stats["complete"]:
        raise RuntimeError(f"received {count} of {n_frames} frames: {stats}")
    return (count - 1) / (t1 - t0), stats


def stage_rates(source, **stream) -> dict:
    enc = FrameEncoder(image_shape=(512, 512), counter_depth=stream["counter_depth"], raw=stream["raw"],
                       layout=stream["layout"])
    image = np.empty((512, 512), source.frame_dtype)
    source.frame_into(0, image)
    message = enc.encode(1, image)
    fh = parse_frame_header(message)
    dec = FrameDecoder(fh)
    aligned = np.empty(fh.pixel_bytes + 64, np.uint8)
    off = (-aligned.ctypes.data) % 64
    pixels = aligned[off:off + fh.pixel_bytes]
    pixels[:] = np.frombuffer(message, np.uint8, offset=fh.header_size)
    out = np.empty(fh.image_shape, fh.image_dtype)
    rates = {}
    for name, fn in (("decode (new image)", lambda: dec.decode(pixels)),
                     ("decode (into out)", lambda: dec.decode(pixels, out=out)),
                     ("header format", lambda: enc.header(7)),
                     ("header parse (full)", lambda: parse_frame_header(message))):
        fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            fn()
            n += 1
        rates[name] = n / (time.perf_counter() - t0)
    return rates


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames")
    parser.add_argument("--profile", action="store_true", help="cProfile the consumer (receiver, copy=True)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (best is shown)")
    args = parser.parse_args(argv)
    sizes = {"quad 12-bit U16": 1000 if args.quick else 6000, "raw 1-bit quad R64": 5000 if args.quick else 40000}
    goals = {"quad 12-bit U16": 2000, "raw 1-bit quad R64": 12500}
    print("Merlin ingest over loopback (best of %d interleaved rounds)" % args.repeat)
    for name, stream in STREAMS.items():
        n = sizes[name]
        source = make_source(stream["counter_depth"])
        server = start_server(source, n, **stream)
        try:
            # interleaved rounds, so that load from other processes affects all three alike
            runs = [(drain(server, n, **stream), receive(server, n, True)[0], receive(server, n, False)[0])
                    for _ in range(args.repeat)]
            d, r_copy, r_view = (max(col) for col in zip(*runs))
            if args.profile:
                receive(server, n, True, profile=True)
        finally:
            server.stop()
        _, msg = expected_bytes(n, **stream)
        print(f"\n{name}: {n} frames of {msg} bytes")
        print(f"  bare drain (baseline, = server send rate) {d:10.0f} frames/s  {d * msg / 1e9:6.2f} GB/s")
        print(f"  receiver + decode, new image each        {r_copy:10.0f} frames/s  ratio {r_copy / d:5.2f}x drain")
        print(f"  receiver + decode, reused image          {r_view:10.0f} frames/s  ratio {r_view / d:5.2f}x drain")
        print(f"  goal >= {goals[name]} frames/s and >= 0.9x drain: "
              f"{'met' if max(r_copy, r_view) >= goals[name] and max(r_copy, r_view) >= 0.9 * d else 'NOT met'}")
        for stage, rate in stage_rates(source, **stream).items():
            print(f"  stage {stage:<22} {rate:10.0f} /s")


if __name__ == "__main__":
    main()

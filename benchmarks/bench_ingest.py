"""Ingest throughput: receive + decode + join, against a bare socket drain of the same stream.

Two processes stand in for the instruments, as on a real microscope (the detector PC and the EDS
system are other machines; here they share this machine's cores, not our GIL):

* a simulated Merlin (:class:`~streamclust.simulators.merlin.MerlinServer`) sending quad frames as
  fast as it can;
* a simulated EDS system (:class:`~streamclust.simulators.eds.EDSPublisher`, PUSH) sending one
  2048-channel spectrum for each of the same positions.

Measured in the same run, in interleaved rounds so that load from other processes hits all alike:

* ``drain``: a bare client that only ``recv_into``s the Merlin stream into one buffer (the
  baseline; it is also how fast the simulated server sends, so the server is never the limit);
* ``receive``: :class:`MerlinReceiver` receiving and decoding every frame, nothing else;
* ``EDS alone``: the spectra of the same positions received without frames or join (what the
  EDS half of ingest costs; ingest can be no faster than the slower of its two streams);
* ``ingest``: receive + decode + join with the EDS spectra (:func:`join_streams`) into batches of
  positions, frames and spectra: what the analysis gets. Every batch is checked for completeness
  and the joiner's accounting invariants must hold.

Streams: quad 12-bit (``U16``) and raw 1-bit (``R64``). Goals: ingest >= 0.9x drain,
>= 2,000 frames/s quad 12-bit, >= 12,500 frames/s raw 1-bit.

Run::

    NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ingest.py            # default sizes
    NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ingest.py --quick    # a smoke run
    NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ingest.py --json     # + one JSON line
    NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ingest.py --profile  # cProfile, all threads
    NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ingest.py --threads  # + CPU by thread

With ``--json`` the last stdout line is one JSON object with ``ingest_u16_fps``, ``drain_u16_fps``,
``receive_u16_fps``, ``ingest_raw1_fps``, ``drain_raw1_fps``, ``receive_raw1_fps``, the ratios
``ingest_u16_ratio`` and ``ingest_raw1_ratio`` (ingest / drain), the CPU time this process spent
a frame or position (``cpu_us_*``: all its threads; unlike the rates, barely moved by other
processes' load), every round's ingest rate and CPU (``ingest_*_fps_rounds``,
``cpu_us_ingest_*_rounds``), the load average and the sizes. ``--threads`` adds
``cpu_us_by_thread_*``: one more ingest run's CPU a position by thread (Linux).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing as mp
import os
import pstats
import socket
import threading
import time

import numpy as np

from streamclust.adapters.eds import SpectrumReceiver
from streamclust.adapters.framing import MPX_PREFIX_SIZE
from streamclust.adapters.join import join_streams
from streamclust.adapters.merlin import MerlinReceiver
from streamclust.adapters.merlin_control import MerlinControl
from streamclust.adapters.mib import FrameDecoder, parse_frame_header
from streamclust.simulators.eds import ArraySpectrumSource, EDSPublisher
from streamclust.simulators.merlin import ArraySource, MerlinServer
from streamclust.simulators.mib_encode import FrameEncoder, encode_acquisition_header

STREAMS = {
    "u16": ("quad 12-bit U16", dict(layout="2x2", counter_depth=12, raw=False)),
    "raw1": ("raw 1-bit quad R64", dict(layout="2x2", counter_depth=1, raw=True)),
}
GOALS = {"u16": 2000, "raw1": 12500}
N_CHANNELS = 2048
BATCH = 256


def make_source(depth: int, n_distinct: int = 32, seed: int = 0) -> ArraySource:
    rng = np.random.default_rng(seed)
    # sparse counts, like diffraction patterns: mostly 0, some bright pixels
    frames = rng.poisson(0.3, (n_distinct, 512, 512))
    frames = np.minimum(frames, 2**depth - 1).astype(np.uint16 if depth == 12 else np.uint8)
    return ArraySource(frames)


def _serve_merlin(conn, stream: dict) -> None:
    """Child process: the simulated detector PC."""
    source = make_source(stream["counter_depth"])
    with MerlinServer(source, data_port=0, control_port=0, headless=True, **stream) as server:
        conn.send((server.data_address, server.control_address))
        conn.recv()  # wait for "stop"


def _serve_eds(conn, n_positions: int) -> None:
    """Child process: the simulated EDS system; publishes a scan on each request."""
    rng = np.random.default_rng(1)
    spectra = rng.poisson(0.02, (n_positions, N_CHANNELS)).astype(np.uint16)
    with EDSPublisher(ArraySpectrumSource(spectra), hwm=100000, random_state=0) as pub:
        conn.send(pub.endpoint)
        while True:
            msg = conn.recv()
            if msg == "stop":
                return
            conn.send(pub.publish_scan(int(msg), timeout=600.0))


class _Child:
    def __init__(self, target, *args):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()

    def stop(self) -> None:
        self.conn.send("stop")
        self.proc.join(10.0)


class RemoteMerlin(_Child):
    """A MerlinServer in its own process; acquisitions sized through the real control port."""

    def __init__(self, stream: dict):
        super().__init__(_serve_merlin, stream)
        self.data_address, self.control_address = self.conn.recv()
        self.control = MerlinControl(*self.control_address, timeout=10.0).connect()

    def set_frames(self, n: int) -> None:
        self.control.set("NUMFRAMESTOACQUIRE", n)

    def wait_until_idle(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.control.status() != 0:
            if time.monotonic() > deadline:
                raise TimeoutError("server still acquiring")
            time.sleep(0.01)

    def stop(self) -> None:
        self.control.close()
        super().stop()


class RemoteEDS(_Child):
    def __init__(self, n_positions: int):
        super().__init__(_serve_eds, n_positions)
        self.endpoint = self.conn.recv()

    def publish(self, n: int) -> None:
        self.conn.send(n)

    def result(self) -> dict:
        return self.conn.recv()


def expected_bytes(n_frames: int, stream: dict) -> tuple[int, int]:
    hdr = MPX_PREFIX_SIZE + len(encode_acquisition_header(n_frames=n_frames, counter_depth=stream["counter_depth"],
                                                          layout=stream["layout"], raw=stream["raw"]))
    enc = FrameEncoder(image_shape=(512, 512), counter_depth=stream["counter_depth"], raw=stream["raw"],
                       layout=stream["layout"])
    return hdr, MPX_PREFIX_SIZE + enc.message_size


def drain(server: RemoteMerlin, n_frames: int, stream: dict) -> tuple[float, float]:
    """Bare drain of the Merlin stream: frames/s from the first frame to the last, and the CPU
    microseconds this process spent a frame."""
    hdr, msg = expected_bytes(n_frames, stream)
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
            if t0 is None and got + k > hdr + msg:
                t0, got0, c0 = time.perf_counter(), got + k, time.process_time()
            got += k
        t1, c1 = time.perf_counter(), time.process_time()
    server.wait_until_idle()
    n = (total - got0) / msg
    return n / (t1 - t0), (c1 - c0) / n * 1e6


def _timed_count(it) -> tuple[int, float, float]:
    """Exhaust ``it``; the clock starts at its first item (connection set-up is not timed).
    Returns (items, items/s, CPU microseconds of all threads of this process an item)."""
    next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    count = 1
    for _ in it:
        count += 1
    t1, c1 = time.perf_counter(), time.process_time()
    n = max(count - 1, 1)
    return count, n / (t1 - t0), (c1 - c0) / n * 1e6


def receive(server: RemoteMerlin, n_frames: int) -> tuple[float, float]:
    """MerlinReceiver + decode only (what the frames thread of the join does): frames/s and CPU
    microseconds (all threads of this process) a frame."""
    with MerlinReceiver(*server.data_address, timeout=10.0) as rx:
        count, rate, cpu_us = _timed_count(rx.frames())
        complete = rx.stats.complete
    server.wait_until_idle()
    if count != n_frames or not complete:
        raise RuntimeError(f"received {count} of {n_frames} frames")
    return rate, cpu_us


def ingest(server: RemoteMerlin, eds: RemoteEDS, n_frames: int) -> tuple[float, dict]:
    """Receive + decode + join with the EDS stream; positions/s from the first batch to the last."""
    with SpectrumReceiver(eds.endpoint, max_buffer=8192) as spectra_rx:
        eds.publish(n_frames)
        with MerlinReceiver(*server.data_address, timeout=10.0) as rx:
            frames = rx.frames(timeout=10.0)
            # Both simulated instruments run free (no shared scan clock), so on a loaded machine
            # the EDS stream can run thousands of positions ahead of the frames: let the joiner
            # hold them (4 KiB each) rather than evict them, so every position is joined.
            stream = join_streams(frames, spectra_rx.spectra(timeout=10.0), n_frames,
                                  batch_size=BATCH, timeout_s=10.0, max_pending=n_frames + 1)
            rows = 0
            t0 = None
            checksum = 0
            for batch in stream:
                if not (batch.has_frame.all() and batch.has_spectrum.all()):
                    raise RuntimeError("incomplete batch in a lossless benchmark")
                # touch the data as analysis would (one pixel and one channel a row)
                checksum += int(batch.frames[:, 0, 0].sum()) + int(batch.spectra[:, 0].sum())
                if t0 is None:
                    t0, c0 = time.perf_counter(), time.process_time()
                    first = len(batch)
                rows += len(batch)
            t1, c1 = time.perf_counter(), time.process_time()
            stats = stream.stats
            stats["frame_blocks_allocated"] = frames.out_allocator.n_allocated
            stream.joiner.check_invariants()
            complete = rx.stats.complete
        eds.result()
    _let_the_publisher_see_the_receiver_go()
    server.wait_until_idle()
    if rows != n_frames or stats["joined"] != n_frames or not complete:
        raise RuntimeError(f"joined {stats['joined']} of {n_frames} positions: {stats}")
    stats["cpu_us_per_position"] = (c1 - c0) / (rows - first) * 1e6
    return (rows - first) / (t1 - t0), stats


def _let_the_publisher_see_the_receiver_go() -> None:
    """Pause (untimed) after a SpectrumReceiver closes, before the next one is published to.

    A PUSH socket round-robins over its peers and drops what it queued for a peer that goes away:
    until the publisher's I/O thread has processed the last receiver's disconnect, the first
    spectra of the next scan can go to the dead pipe (seen: 2-101 of 40,000 spectra lost,
    ``lost_in_transport`` > 0, before and after the EDS receive path was reworked).
    """
    time.sleep(0.2)


def eds_only(eds: RemoteEDS, n: int) -> tuple[float, float]:
    """The EDS stream alone (SpectrumReceiver, no frames, no join): spectra/s and CPU us a spectrum."""
    with SpectrumReceiver(eds.endpoint, max_buffer=8192) as spectra_rx:
        eds.publish(n)
        count, rate, cpu_us = _timed_count(spectra_rx.spectra(timeout=10.0))
        eds.result()
        # lost_in_transport > 0: never reached this receiver; received > delivered: lost in it
        report = dict(spectra_rx.end_report(), delivered=spectra_rx.stats["delivered"])
    _let_the_publisher_see_the_receiver_go()
    if count != n:
        raise RuntimeError(f"received {count} of {n} spectra: {report}")
    return rate, cpu_us


def stage_rates(stream: dict) -> dict:
    """Per-frame costs of the stages alone (one thread, no sockets)."""
    source = make_source(stream["counter_depth"])
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
    block = np.empty((BATCH, *fh.image_shape), fh.image_dtype)
    rates = {}
    for name, fn in (("decode (into out)", lambda: dec.decode(pixels, out=out)),
                     ("copy image into batch", lambda: block.__setitem__(3, out)),
                     ("header parse (full)", lambda: parse_frame_header(message))):
        fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            fn()
            n += 1
        rates[name] = n / (time.perf_counter() - t0)
    return rates


class _ThreadCPU:
    """CPU seconds of each thread of this process while it runs (Linux: ``/proc/self/task``).

    Sampled every 20 ms, so a thread that lives less long may be missed; ingest threads live for
    the whole run. Threads are named from ``threading.enumerate()`` (native ids); the rest (the
    ZeroMQ I/O thread) by id.
    """

    def __init__(self):
        self.available = os.path.isdir("/proc/self/task")
        self._seen: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK") if self.available else 100

    def _sample(self) -> None:
        for t in threading.enumerate():
            if t.native_id:
                self._names[t.native_id] = t.name
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            self._seen[int(tid)] = (int(fields[11]) + int(fields[12])) / self._tick

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> "_ThreadCPU":
        if self.available:
            self._sample()
            self._base = dict(self._seen)
            self._thread = threading.Thread(target=self._run, daemon=True, name="bench-sampler")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self._sample()

    def per_item_us(self, n: int) -> dict:
        """Microseconds of CPU an item, by thread name (threads above 0.5 us only)."""
        out: dict = {}
        for tid, cpu in self._seen.items():
            name = self._names.get(tid, "other (ZeroMQ I/O)")
            if name == "bench-sampler":
                continue
            out[name] = out.get(name, 0.0) + (cpu - self._base.get(tid, 0.0)) / n * 1e6
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.5}


def _profile_all_threads(fn):
    """Run ``fn`` with cProfile in every thread started meanwhile, print the merged top entries."""
    profiles = []

    def hook(*_):
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()

    threading.setprofile(hook)
    main = cProfile.Profile()
    main.enable()
    try:
        return fn()
    finally:
        main.disable()
        threading.setprofile(None)
        for p in profiles:
            p.disable()
        st = pstats.Stats(main)
        for p in profiles:
            st.add(p)
        st.sort_stats("tottime").print_stats(25)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames (smoke run)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds (best is shown)")
    parser.add_argument("--only", choices=sorted(STREAMS), help="one stream only")
    parser.add_argument("--profile", action="store_true", help="cProfile one ingest run (all threads)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--threads", action="store_true",
                        help="CPU a position by thread, from one extra ingest run")
    args = parser.parse_args(argv)
    sizes = {"u16": 1500 if args.quick else 8000, "raw1": 8000 if args.quick else 40000}
    result: dict = {"load_avg_1min": os.getloadavg()[0], "repeat": args.repeat, "cpus": os.cpu_count()}
    print(f"Merlin ingest over loopback, best of {args.repeat} interleaved rounds; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for key, (name, stream) in STREAMS.items():
        if args.only and key != args.only:
            continue
        n = sizes[key]
        server = RemoteMerlin(stream)
        eds = RemoteEDS(n)
        try:
            # warm-up (JIT, server pixel cache, sockets) that nobody times
            server.set_frames(min(n, 512))
            ingest(server, eds, min(n, 512))
            server.set_frames(n)
            if args.profile:
                rate, stats = _profile_all_threads(lambda: ingest(server, eds, n))
                print(f"profiled ingest: {rate:.0f} pos/s; {stats['frame_blocks_allocated']} frame blocks "
                      f"of {BATCH} allocated for {n} positions")
            threads = None
            if args.threads:
                with _ThreadCPU() as tc:
                    ingest(server, eds, n)
                threads = tc.per_item_us(n) if tc.available else None
            runs = []
            for _ in range(args.repeat):
                d, r, (i, st), e = drain(server, n, stream), receive(server, n), ingest(server, eds, n), \
                    eds_only(eds, n)
                runs.append((d[0], r[0], i, e[0], d[1], r[1], st["cpu_us_per_position"], e[1]))
            d, r, i, e = (max(col) for col in list(zip(*runs))[:4])
            dc, rc, ic, ec = (min(col) for col in list(zip(*runs))[4:])
        finally:
            server.stop()
            eds.stop()
        _, msg = expected_bytes(n, stream)
        print(f"\n{name}: {n} positions, frames of {msg} bytes + {N_CHANNELS}-channel uint16 spectra, "
              f"batches of {BATCH}")
        print(f"  bare drain (baseline, = server send rate) {d:9.0f} frames/s  {d * msg / 1e9:5.2f} GB/s"
              f"          CPU {dc:6.1f} us/frame")
        print(f"  receive + decode                          {r:9.0f} frames/s  {r / d:5.2f}x drain"
              f"  CPU {rc:6.1f} us/frame")
        print(f"  ingest = receive + decode + join          {i:9.0f} pos/s     {i / d:5.2f}x drain"
              f"  CPU {ic:6.1f} us/position (EDS receive included)")
        print(f"  EDS spectra alone (SpectrumReceiver)      {e:9.0f} spectra/s          "
              f"  CPU {ec:6.1f} us/spectrum")
        print(f"  goal >= {GOALS[key]} /s and >= 0.9x drain: "
              f"{'met' if i >= GOALS[key] and i >= 0.9 * d else 'NOT met'}")
        print(f"  ingest by round: {', '.join(f'{run[2]:.0f}' for run in runs)} pos/s")
        if threads:
            print("  CPU by thread (one more ingest run, us/position): "
                  + ", ".join(f"{name} {us:.1f}" for name, us in threads.items()))
            result[f"cpu_us_by_thread_{key}"] = threads
        for stage, rate in stage_rates(stream).items():
            print(f"  stage alone: {stage:<24} {rate:9.0f} /s")
        result.update({f"drain_{key}_fps": round(d, 1), f"receive_{key}_fps": round(r, 1),
                       f"ingest_{key}_fps": round(i, 1), f"ingest_{key}_ratio": round(i / d, 3),
                       f"receive_{key}_ratio": round(r / d, 3), f"n_{key}": n,
                       f"cpu_us_drain_{key}": round(dc, 1), f"cpu_us_receive_{key}": round(rc, 1),
                       f"cpu_us_ingest_{key}": round(ic, 1), f"eds_only_{key}_sps": round(e, 1),
                       f"cpu_us_eds_only_{key}": round(ec, 1),
                       f"ingest_{key}_fps_rounds": [round(run[2], 1) for run in runs],
                       f"cpu_us_ingest_{key}_rounds": [round(run[6], 1) for run in runs]})
    result["load_avg_1min_end"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()

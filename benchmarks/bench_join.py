"""Throughput of the scan joiner and of the ZeroMQ frame bridge, each against a baseline in the same run.

1. ScanJoiner: 512x512 uint16 frames + 2048-channel uint32 spectra, arriving shuffled within a window,
   joined into batches of 64, versus the floor for the same data movement: ``np.stack`` of the same
   arrays in batches of 64.
2. FrameBridge over tcp loopback (PUSH -> ZmqFrameSource PULL, header validation included) versus a
   bare pyzmq PUSH/PULL moving the same buffers zero-copy with no header work.

Usage::

    .venv/bin/python benchmarks/bench_join.py [--positions 4096] [--frames 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import threading
import time
from types import SimpleNamespace as NS

import numpy as np
import zmq

from streamclust.adapters.join import ScanJoiner
from streamclust.adapters.zmq_frames import FrameBridge, ZmqFrameSource

FRAME = (512, 512)
CHANNELS = 2048
BATCH = 64
POOL = 32  # distinct arrays cycled through, so the benchmark does not need GBs of RAM


def make_pool(rng):
    frames = [rng.integers(0, 4096, FRAME, dtype=np.uint16) for _ in range(POOL)]
    spectra = [rng.poisson(2.0, CHANNELS).astype(np.uint32) for _ in range(POOL)]
    return frames, spectra


def arrival_order(n, rng, window=256):
    """Position order shuffled within windows: late and out of order, like a real stream."""
    order = np.arange(n)
    for i in range(0, n, window):
        rng.shuffle(order[i:i + window])
    return order


def bench_joiner(n, frames, spectra, rng):
    f_order, s_order = arrival_order(n, rng), arrival_order(n, rng)
    joiner = ScanJoiner(n, batch_size=BATCH, max_pending=4096, timeout_s=60.0)
    rows = 0
    t0 = time.perf_counter()
    for fp, sp in zip(f_order, s_order):
        joiner.add_frame(fp, frames[fp % POOL])
        joiner.add_spectrum(sp, spectra[sp % POOL])
        for b in joiner.poll():
            rows += len(b)
    for b in joiner.flush():
        rows += len(b)
    dt = time.perf_counter() - t0
    assert rows == n and joiner.check_invariants()
    return n / dt


def bench_stack(n, frames, spectra):
    rows = 0
    t0 = time.perf_counter()
    for start in range(0, n, BATCH):
        idx = range(start, min(start + BATCH, n))
        fb = np.stack([frames[p % POOL] for p in idx])
        sb = np.stack([spectra[p % POOL] for p in idx])
        rows += fb.shape[0] + 0 * sb.shape[0]
    dt = time.perf_counter() - t0
    assert rows == n
    return n / dt


def bench_bridge(n, frames):
    items = (NS(sequence=i + 1, image=frames[i % POOL]) for i in range(n))
    bridge = FrameBridge(items, push="tcp://127.0.0.1:0", push_hwm=64).start()
    endpoint = bridge.wait_for_listen()["push"][0]
    got = 0
    with ZmqFrameSource(endpoint, hwm=64) as source:
        t0 = time.perf_counter()
        for f in source.frames(timeout=10):
            got += 1
        dt = time.perf_counter() - t0
    bridge.join(30)
    assert got == n, (got, n)
    return n / dt


def bench_bare(n, frames):
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    pull.rcvhwm = 64
    port = pull.bind_to_random_port("tcp://127.0.0.1")

    def send():
        push = ctx.socket(zmq.PUSH)
        push.linger = 1000
        push.sndhwm = 64
        push.connect(f"tcp://127.0.0.1:{port}")
        for i in range(n):
            push.send_multipart([b"h", frames[i % POOL]], copy=False)
        push.close()

    th = threading.Thread(target=send)
    th.start()
    t0 = time.perf_counter()
    for _ in range(n):
        parts = pull.recv_multipart(copy=False)
        np.frombuffer(parts[1].buffer, np.uint16)
    dt = time.perf_counter() - t0
    th.join()
    pull.close()
    return n / dt


def best(fn, repeat, *args):
    return max(fn(*args) for _ in range(repeat))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    frames, spectra = make_pool(rng)
    mib = (np.prod(FRAME) * 2 + CHANNELS * 4) / 2**20

    join_rate = best(bench_joiner, args.repeat, args.positions, frames, spectra, rng)
    stack_rate = best(bench_stack, args.repeat, args.positions, frames, spectra)
    print(f"ScanJoiner  {FRAME[0]}x{FRAME[1]} uint16 + {CHANNELS} ch, batch {BATCH}: "
          f"{join_rate:9.0f} positions/s ({join_rate * mib:7.0f} MiB/s)")
    print(f"np.stack baseline (same arrays, batch {BATCH}):          "
          f"{stack_rate:9.0f} positions/s ({stack_rate * mib:7.0f} MiB/s)")
    print(f"  joiner / np.stack = {join_rate / stack_rate:.2f}")

    fmib = np.prod(FRAME) * 2 / 2**20
    bridge_rate = best(bench_bridge, args.repeat, args.frames, frames)
    bare_rate = best(bench_bare, args.repeat, args.frames, frames)
    print(f"FrameBridge PUSH -> ZmqFrameSource, tcp loopback: {bridge_rate:9.0f} frames/s "
          f"({bridge_rate * fmib:7.0f} MiB/s)")
    print(f"bare pyzmq PUSH/PULL, same buffers, zero-copy:    {bare_rate:9.0f} frames/s "
          f"({bare_rate * fmib:7.0f} MiB/s)")
    print(f"  bridge / bare = {bridge_rate / bare_rate:.2f}")


if __name__ == "__main__":
    main()

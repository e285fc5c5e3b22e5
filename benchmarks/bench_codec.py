"""Throughput of the Merlin MIB codec: decode, encode and header parsing, per pixel type and layout.

Every figure is printed as an absolute rate (frames/s) and as a ratio against a baseline measured
in the same process on the same bytes: a plain copy of the pixel bytes
(``np.frombuffer(...).copy()``, i.e. memcpy). A ratio of 0.5 means decoding costs two memcpys.

Targets (from the live receiver's requirements, which include the socket receive):
quad 12-bit >= 2,000 frames/s, raw 1-bit quad >= 12,500 frames/s.

Run::

    .venv/bin/python benchmarks/bench_codec.py            # all cases, ~1 s each
    .venv/bin/python benchmarks/bench_codec.py --quick    # shorter timings
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone

import numpy as np

from streamclust.adapters.mib import FrameDecoder, parse_frame_header
from streamclust.simulators.mib_encode import FrameEncoder

CASES = [
    # (label, counter_depth, raw, layout, image_shape)
    ("quad U08 1-bit", 1, False, "2x2", (512, 512)),
    ("quad U08 6-bit", 6, False, "2x2", (512, 512)),
    ("quad U16 12-bit", 12, False, "2x2", (512, 512)),
    ("quad U32 24-bit", 24, False, "2x2", (512, 512)),
    ("quad R64 1-bit", 1, True, "2x2", (512, 512)),
    ("quad R64 6-bit", 6, True, "2x2", (512, 512)),
    ("quad R64 12-bit", 12, True, "2x2", (512, 512)),
    ("quad R64 24-bit", 24, True, "2x2", (512, 512)),
    ("quad 2x2G U16 12-bit", 12, False, "2x2G", (514, 514)),
    ("quad 2x2G R64 1-bit", 1, True, "2x2G", (514, 514)),
    ("single U16 12-bit", 12, False, "1x1", (256, 256)),
    ("single R64 1-bit", 1, True, "1x1", (256, 256)),
]
DTYPES = {1: np.uint8, 6: np.uint8, 12: np.uint16, 24: np.uint32}


def rate(fn, seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after one warm-up call)."""
    fn()
    n = 0
    start = time.perf_counter()
    while True:
        for _ in range(16):
            fn()
        n += 16
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.2 s a measurement")
    parser.add_argument("--seconds", type=float, default=0.6)
    args = parser.parse_args(argv)
    seconds = 0.2 if args.quick else args.seconds
    rng = np.random.default_rng(0)
    stamp = datetime(2024, 1, 1, tzinfo=timezone.utc)

    print(f"{'case':24s} {'bytes':>8s} {'memcpy/s':>10s} | {'decode/s':>10s} {'ratio':>6s} | "
          f"{'encode/s':>10s} {'ratio':>6s} | {'hdr parse/s':>11s} {'hdr enc/s':>10s}")
    for label, depth, raw, layout, shape in CASES:
        enc = FrameEncoder(image_shape=shape, counter_depth=depth, raw=raw, layout=layout)
        img = rng.integers(0, 2 ** depth, size=shape).astype(DTYPES[depth])
        if layout == "2x2G":
            img[256:258, :] = 0
            img[:, 256:258] = 0
        message = enc.encode(1, img, stamp)
        header = parse_frame_header(message)
        decoder = FrameDecoder(header)
        out = np.empty(header.image_shape, header.image_dtype)
        pixels = memoryview(message)[header.header_size:]
        assert (decoder.decode(pixels) == img).all()
        pix_out = np.empty(enc.pixel_bytes, np.uint8)

        base = rate(lambda: np.frombuffer(pixels, np.uint8).copy(), seconds)
        dec = rate(lambda: decoder.decode(pixels, out=out), seconds)
        encr = rate(lambda: enc.pixels(img, out=pix_out), seconds)
        hparse = rate(lambda: parse_frame_header(message), seconds)
        henc = rate(lambda: enc.header(1, stamp), seconds)
        print(f"{label:24s} {enc.pixel_bytes:8d} {base:10.0f} | {dec:10.0f} {dec / base:6.2f} | "
              f"{encr:10.0f} {encr / base:6.2f} | {hparse:11.0f} {henc:10.0f}")


if __name__ == "__main__":
    main()

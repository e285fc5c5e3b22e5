"""PositionStore's exact compact mode ("counts"): bit-exact vectors, projections, escapes, re-sends."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from streamclust.decomposition.position_store import PositionStore


def _counts(rng: np.random.Generator, n: int, f: int) -> np.ndarray:
    """Reduced-frame-like counts: mostly small, a few bright bins far above one byte."""
    lam = rng.gamma(0.8, 6.0, size=f)
    lam[:5] = [900.0, 4000.0, 60000.0, 3e5, 2.5e7]  # direct-beam-like bins; the last beyond 2**24
    return rng.poisson(lam, size=(n, f)).astype(np.float32)


@pytest.fixture()
def scan():
    rng = np.random.default_rng(3)
    raw = _counts(rng, 300, 64)
    c = rng.uniform(0.01, 3.0, 64).astype(np.float32)
    c[7] = 1.0
    x_warm = raw * c  # exactly the engine's float32 product
    x_warm[10, :] = rng.normal(size=64).astype(np.float32)  # an imputed row: not counts at all
    x_warm[11, 3] = 2.5 * c[3]  # a half count (flat-field corrected value, say)
    return raw, c, x_warm


@pytest.mark.parametrize("code_dtype", ["uint8", "uint16"])
def test_counts_store_is_bit_exact(scan, code_dtype):
    raw, c, x = scan
    full = PositionStore(400, 64, mode="full")
    counts = PositionStore(400, 64, mode="counts", code_dtype=code_dtype)
    counts.set_scale(c)
    pos = np.random.default_rng(0).permutation(400)[:300]
    for s in range(0, 300, 64):
        full.add(pos[s:s + 64], x[s:s + 64])
        counts.add(pos[s:s + 64], x[s:s + 64])
    np.testing.assert_array_equal(counts.seen, full.seen)
    np.testing.assert_array_equal(counts.vectors(pos), x)  # bit for bit, escapes included
    np.testing.assert_array_equal(counts.vectors(pos), full.vectors(pos))
    # escapes: the imputed row, the half count, and every value above the code range
    escaped = raw > np.iinfo(code_dtype).max
    escaped[10, :] = escaped[11, 3] = True
    assert counts.n_escapes_ == int(np.count_nonzero(escaped))
    assert counts.data.dtype == np.dtype(code_dtype)
    rng = np.random.default_rng(1)
    D, V, mean = rng.uniform(0.5, 2.0, 64), np.linalg.qr(rng.normal(size=(64, 5)))[0], rng.normal(size=64)
    a = full.project(D, V, mean)
    b = counts.project(D, V, mean)
    spread = np.abs(a - a.mean(0)).max()
    np.testing.assert_allclose(b, a, atol=2e-5 * spread)
    some = np.sort(pos[:37])
    np.testing.assert_allclose(counts.project(D, V, mean, some), full.project(D, V, mean, some), atol=2e-5 * spread)
    assert counts.residual(x[:3]).tolist() == [0.0, 0.0, 0.0]


def test_counts_store_costs_a_byte_a_feature_plus_escapes(scan):
    raw, c, x = scan
    counts = PositionStore(300, 64, mode="counts")
    counts.set_scale(c)
    counts.add(np.arange(300), x)
    esc = counts.n_escapes_
    assert counts.nbytes == 300 * 64 + 300 + 300 * 8 + 12 * esc
    assert counts.nbytes_per_position == 64 + 1 + 8 + int(np.ceil(12 * esc / 300))
    # the escape matrix shares the stored arrays (no hidden second copy of the escapes)
    E = counts._escape_matrix()
    val = counts._esc_chunks[0][2]
    assert np.shares_memory(E.data, val) and E.nnz == esc
    assert PositionStore(10, 64, mode="full").nbytes_per_position == 64 * 4 + 1


def test_resent_positions_replace_their_escapes(scan):
    raw, c, x = scan
    counts = PositionStore(50, 64, mode="counts")
    counts.set_scale(c)
    counts.add(np.arange(20), x[:20])
    n0 = counts.n_escapes_
    # re-send positions 10 (the imputed row: 64 escapes) and 11 with plain small counts
    small = (np.full((2, 64), 3.0, dtype=np.float32) * c)
    assert counts.add(np.array([10, 11]), small) == 2
    np.testing.assert_array_equal(counts.vectors(np.array([10, 11])), small)
    row11 = raw[11] > 255
    row11[3] = True  # the half count
    assert counts.n_escapes_ == n0 - 64 - int(np.count_nonzero(row11))
    np.testing.assert_array_equal(counts.vectors(np.arange(10)), x[:10])
    # a batch holding one position twice: the last row wins, as in the float stores
    twice = np.stack([x[10], small[0]])
    counts.add(np.array([30, 30]), twice)
    np.testing.assert_array_equal(counts.vectors(np.array([30])), small[:1])
    q = pickle.loads(pickle.dumps(counts))
    np.testing.assert_array_equal(q.vectors(q.seen_positions), counts.vectors(counts.seen_positions))


def test_counts_store_errors(scan):
    raw, c, x = scan
    counts = PositionStore(50, 64, mode="counts")
    with pytest.raises(ValueError, match="64 entries"):
        counts.set_scale(c[:10])
    with pytest.raises(ValueError, match="finite"):
        counts.set_scale(np.full(64, np.nan))
    counts.set_scale(c)
    counts.add(np.arange(5), x[:5])
    counts.set_scale(c.copy())  # the same scale again is fine
    with pytest.raises(ValueError, match="cannot change"):
        counts.set_scale(c * 2)
    with pytest.raises(ValueError, match="position 50"):
        counts.add(np.array([50]), x[:1])
    with pytest.raises(ValueError, match="code_dtype"):
        PositionStore(5, 4, mode="counts", code_dtype="int8")
    with pytest.raises(ValueError, match="mode"):
        PositionStore(5, 4, mode="sparse")
    # without a scale every non-count value escapes, but nothing is lost
    plain = PositionStore(50, 64, mode="counts")
    plain.add(np.arange(5), x[:5])
    np.testing.assert_array_equal(plain.vectors(np.arange(5)), x[:5])
